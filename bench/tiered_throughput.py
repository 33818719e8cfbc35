"""Training samples/s of one plan with cached tables in 1 process and in 2 processes
(torch.distributed, gloo on loopback, one rank per plan device), beside the same plan
with every table in HBM (device memory; here: CPU memory), interleaved repetitions.

    .venv/bin/python bench/tiered_throughput.py [--tables 4] [--rows 200000] [--dim 32]
        [--batch 4096] [--steps 60] [--warmup 20] [--cache-fraction 0.1] [--reps 3]
        [--out bench/results/tiered_throughput.json]

The plan: two devices of one host, tables alternately on device 0 and 1 (table-wise),
in ``store_cache`` (a row cache of ``cache_fraction x rows`` slots over the table
store in ``STORE/device-D``) or in ``hbm``. Zipf 1.05 ids, ``--pooling`` ids per bag,
row-wise Adagrad on the tables, small MLPs (bottom 64-dim, top 64-1), one torch thread
per process. The 2-process runs are forked children with torchrun's environment
variables. Samples/s is the steady rate between step ``--warmup`` and the end (global
batch), from the run's metrics log. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dlrm_runtime import (  # noqa: E402
    ModelConfig,
    TrainConfig,
    init_from_env,
    train,
    train_distributed,
)
from dlrm_runtime.distributed import free_port, shutdown  # noqa: E402
from planner import (  # noqa: E402
    DeviceLoad,
    Plan,
    Shard,
    ShardCost,
    Sharding,
    SolveReport,
    TablePlan,
    Tier,
    parse_tables,
    parse_topology,
)


def make_plan(args: argparse.Namespace, tier: Tier) -> Plan:
    spec = parse_tables({"tables": [
        {"name": f"t{i}", "num_embeddings": args.rows, "embedding_dim": args.dim,
         "pooling_factor": args.pooling, "access": {"zipf": 1.05},
         "optimizer": "rowwise_adagrad"} for i in range(args.tables)]})
    topo = parse_topology({"hosts": 1, "devices_per_host": 2,
                           "device": {"hbm_gb": 80, "hbm_gbps": 2000},
                           "host": {"dram_gb": 512, "dram_gbps": 100, "h2d_gbps": 25},
                           "store": {"read_gbps": 2, "write_gbps": 1},
                           "network": {"intra_host_gbps": 100, "inter_host_gbps": 25},
                           "batch_size_per_device": args.batch // 2, "reserved_hbm_gb": 1})
    cache_rows = max(1, int(args.rows * args.cache_fraction)) if tier is not Tier.HBM else 0
    none = ShardCost(0.0, 0.0, 0.0, 0.0, 0, 0)
    tables = tuple(TablePlan(t.name, Sharding.TABLE_WISE,
                             (Shard(i % 2, 0, args.rows, 0, args.dim, tier, cache_rows),), none)
                   for i, t in enumerate(spec.tables))
    devices = tuple(DeviceLoad(d, 0, 0.0, 0, topo.usable_hbm_bytes) for d in range(2))
    return Plan(spec, topo, "analytic", tables, devices,
                SolveReport("manual", "none", "Optimal", "Optimal", 0.0, 0.0, 0.0, 0.0, 1))


def _child(args: argparse.Namespace, tier: str, world: int, rank: int, port: int,
           store: str, log_path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    if world > 1:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank),
                           "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
    plan = make_plan(args, Tier(tier))
    model = ModelConfig(dense_features=13, bottom_mlp=(64, args.dim), top_mlp=(64, 1))
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=0.05, embedding_lr=0.05,
                         dense_optimizer="sgd", eval_batches=1, log_every=args.warmup // 2 or 1,
                         seed=0, threads=1,
                         store_dir=store if tier != "hbm" else None)
    world_now = init_from_env()
    finished = False
    try:
        lead = world_now == 1 or torch.distributed.get_rank() == 0
        with open(log_path, "w", encoding="utf-8") as log:
            run = train_distributed if world_now > 1 else train
            run(plan, model, config, metrics_log=log if lead else None)
        finished = True
    finally:
        shutdown(synchronize=finished)



def measure(args: argparse.Namespace, tier: str, world: int, store: Path,
            work: Path) -> dict:
    """One run; its steady samples/s (global batch) from step ``warmup`` to the end."""
    context = multiprocessing.get_context("fork")
    port = free_port()
    logs = [work / f"log-{r}.jsonl" for r in range(world)]
    procs = [context.Process(target=_child, args=(args, tier, world, r, port, str(store),
                                                  str(logs[r]))) for r in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + args.timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():  # a rank that failed leaves its peer waiting
            proc.kill()
            proc.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{tier} on {world} process(es) failed (exit codes "
                           f"{[p.exitcode for p in procs]})")
    records = [json.loads(line) for line in logs[0].read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    # the loop reports the cumulative rate since its first step: elapsed = steps x B / rate
    elapsed = {r["step"]: r["step"] * args.batch / r["samples_per_s"] for r in train_records}
    first = min((s for s in elapsed if s >= args.warmup), default=None)
    last = max(elapsed)
    steady = (last - first) * args.batch / (elapsed[last] - elapsed[first])
    hit = train_records[-1].get("cache", {}).get("hit_rate")
    return {"tier": tier, "processes": world, "samples_per_s": steady, "hit_rate": hit,
            "from_step": first, "to_step": last}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, default=4, help="tables (alternating devices)")
    parser.add_argument("--rows", type=int, default=200_000, help="rows per table")
    parser.add_argument("--dim", type=int, default=32, help="embedding dim")
    parser.add_argument("--pooling", type=float, default=8.0, help="ids per bag")
    parser.add_argument("--batch", type=int, default=4096, help="global batch")
    parser.add_argument("--steps", type=int, default=60, help="steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the rate")
    parser.add_argument("--cache-fraction", type=float, default=0.1,
                        help="cache slots per table as a fraction of its rows")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" /
                                             "tiered_throughput.json"), help="JSON results file")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(False)  # import torch's lazy modules once, here
    work = Path(tempfile.mkdtemp(prefix="tiered-throughput-"))
    configs = [("store_cache", 1), ("store_cache", 2), ("hbm", 1), ("hbm", 2)]
    runs: list[dict] = []
    try:
        store = work / "store"  # no checkpoint dir: every run leaves it at its initial rows
        for rep in range(args.reps):
            for tier, world in configs:
                began = time.monotonic()
                result = measure(args, tier, world, store, work)
                result["rep"] = rep
                runs.append(result)
                print(f"rep {rep}: {tier:<11} {world} process(es): "
                      f"{result['samples_per_s']:9,.0f} samples/s"
                      + (f", hit rate {result['hit_rate']:.1%}" if result["hit_rate"] else "")
                      + f" ({time.monotonic() - began:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {f"{tier}/{world}": statistics.median(r["samples_per_s"] for r in runs
                                                   if (r["tier"], r["processes"]) == (tier, world))
              for tier, world in configs}
    def paired(a: tuple[str, int], b: tuple[str, int]) -> float:
        """Median over the repetitions of a / b within each repetition."""
        rate = {(r["rep"], r["tier"], r["processes"]): r["samples_per_s"] for r in runs}
        return statistics.median(rate[(rep, *a)] / rate[(rep, *b)] for rep in range(args.reps))

    ratios = {
        "cached 2 processes / cached 1 process": paired(("store_cache", 2), ("store_cache", 1)),
        "cached 2 processes / hbm 2 processes": paired(("store_cache", 2), ("hbm", 2)),
        "cached 1 process / hbm 1 process": paired(("store_cache", 1), ("hbm", 1)),
        "hbm 2 processes / hbm 1 process": paired(("hbm", 2), ("hbm", 1)),
    }
    load = os.getloadavg()
    doc = {"benchmark": "tiered_throughput",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "threads_per_process": 1,
                       "load_average_after": load},
           "settings": vars(args), "median_samples_per_s": median, "ratios": ratios,
           "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(f"{k}: {v:,.0f} samples/s (median)" for k, v in median.items()))
    print("\n".join(f"{k}: {v:.2f} (median of per-repetition ratios)"
                    for k, v in ratios.items()))
    print(f"load average after: {load}; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
