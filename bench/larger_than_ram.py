"""A table larger than this machine's RAM, trained from the store with a bounded
resident set (issue 4: "a table larger than this machine's 24 GB trains with peak RSS
under a configured budget").

    .venv/bin/python bench/larger_than_ram.py [--dir /tmp/larger-than-ram] [--rows 100000000]
        [--dim 64] [--cache-rows 250000] [--steps 300] [--batch 4096] [--pooling 4]
        [--budget-gb 4] [--keep]

Builds a table store in ``--dir`` holding one table of ``--rows`` x ``--dim`` fp32
(100M x 64 = 25.6 GB by default), initialised exactly as the in-memory runtime would
(:func:`dlrm_runtime.embeddings.init_table`'s generator, block by block; progress on
stderr), then trains DLRM from a plan that puts that table in the ``store_cache`` tier
(a row cache of ``--cache-rows`` rows) beside three small in-memory tables, for
``--steps`` steps with Zipf 1.05 ids, announcing every next batch for prefetch, and
checkpoints the store at the end. Reports the creation time, samples/s, the hit rate,
and the peak resident set (``VmHWM`` of /proc/self/status, i.e. the process's peak
RSS, creation included) against ``--budget-gb``. The store is deleted at the end
unless ``--keep`` (then a rerun reuses it and skips the creation).

Writes ``bench/results/larger_than_ram.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.store_training import manual_plan  # noqa: E402
from dlrm_runtime import DLRM, ModelConfig, SyntheticClicks, TrainConfig, Trainer  # noqa: E402
from dlrm_runtime.embeddings import device_store_dir, open_store, store_tables  # noqa: E402
from dlrm_runtime.embeddings import embeddings_from_plan  # noqa: E402
from dlrm_runtime.embeddings import tune_malloc  # noqa: E402
from dlrm_runtime.embeddings import placements_from_plan  # noqa: E402
from planner import Plan, Shard, TablePlan, Tier  # noqa: E402


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, RssFile, ...)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def meminfo_gib(field: str) -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return 0.0


def the_plan(args: argparse.Namespace) -> Plan:
    """The big table in ``store_cache`` with ``--cache-rows`` slots; small tables in HBM."""
    tables_doc = {"tables": [
        {"name": "big", "num_embeddings": args.rows, "embedding_dim": args.dim,
         "pooling_factor": args.pooling, "dtype": "fp32", "optimizer": "sgd",
         "access": {"zipf": 1.05}},
        *({"name": f"small{i}", "num_embeddings": 100_000, "embedding_dim": args.dim,
           "pooling_factor": 1.0, "dtype": "fp32", "optimizer": "sgd",
           "access": {"zipf": 1.05}} for i in range(3))]}
    plan = manual_plan(tables_doc, Tier.HBM, 1.0)
    big = TablePlan("big", plan.tables[0].sharding,
                    (Shard(0, 0, args.rows, 0, args.dim, Tier.STORE_CACHE, args.cache_rows),),
                    plan.tables[0].cost)
    return type(plan)(plan.tables_spec, plan.topology, plan.cost_model,
                      (big, *plan.tables[1:]), plan.devices, plan.solve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/larger-than-ram",
                        help="directory of the table store (needs rows x dim x 4 bytes free)")
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cache-rows", type=int, default=250_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pooling", type=float, default=4.0)
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--keep", action="store_true", help="keep the store for a rerun")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "larger_than_ram.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    tune_malloc()
    plan = the_plan(args)
    store_dir = Path(args.dir)
    table_gb = args.rows * args.dim * 4 / 1e9
    ram_gb = meminfo_gib("MemTotal") * 2**30 / 1e9
    print(f"table: {args.rows:,} rows x {args.dim} fp32 = {table_gb:.1f} GB; RAM {ram_gb:.1f} GB; "
          f"cache {args.cache_rows:,} rows ({args.cache_rows * args.dim * 4 / 1e9:.2f} GB); "
          f"RSS budget {args.budget_gb:g} GB")

    existed = store_dir.is_dir() and any(store_dir.iterdir())
    start = time.perf_counter()
    try:
        from tqdm import tqdm

        bar = tqdm(total=args.rows, unit="row", unit_scale=True, desc="creating", disable=existed)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(done - bar.n)

        store = open_store(device_store_dir(store_dir, 0),
                           store_tables(plan.tables_spec, placements_from_plan(plan)),
                           seed=0, progress=progress)
        bar.close()
        store.close()
        created_s = time.perf_counter() - start
        rss_after_create = status_kib("VmHWM")
        print(f"{'opened the existing' if existed else 'created the'} store in {created_s:.1f} s"
              + ("" if existed else f" ({table_gb / created_s:.2f} GB/s)")
              + f"; peak RSS so far {rss_after_create / 2**20:.2f} GiB")

        model = ModelConfig(dense_features=13, bottom_mlp=(128, args.dim), top_mlp=(128, 64, 1))
        train = TrainConfig(batch_size=args.batch, lr=0.05, embedding_lr=0.05,
                            dense_optimizer="sgd")
        embeddings = embeddings_from_plan(plan, torch.device("cpu"), seed=0,
                                          store_dir=str(store_dir), embedding_lr=train.embedding_lr)
        trainer = Trainer(DLRM(model, embeddings, [args.dim] * 4, seed=0), train)
        data = SyntheticClicks(plan.tables_spec, model.dense_features, seed=0)
        losses = []
        try:
            batch = data.batch(0, args.batch)
            bar = tqdm(total=args.steps, desc="training", unit="step")
            train_start = time.perf_counter()
            for step in range(args.steps):
                following = data.batch(step + 1, args.batch)
                embeddings.prefetch(following.sparse)
                losses.append(trainer.step(batch))
                batch = following
                if (step + 1) % 20 == 0:
                    stats = embeddings.cache_stats() or {}
                    bar.set_postfix(hit=f"{stats.get('hit_rate', 0):.1%}",
                                    rss=f"{status_kib('VmRSS') / 2**20:.2f}G")
                bar.update(1)
            train_s = time.perf_counter() - train_start
            bar.close()
            checkpoint_start = time.perf_counter()
            embeddings.checkpoint(args.steps)
            checkpoint_s = time.perf_counter() - checkpoint_start
            stats = embeddings.cache_stats() or {}
        finally:
            embeddings.close()
    finally:
        if not args.keep:
            shutil.rmtree(store_dir, ignore_errors=True)
    peak_gib = status_kib("VmHWM") / 2**20
    doc = {
        "benchmark": "larger_than_ram",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "ram_gb": ram_gb, "torch": torch.__version__, "threads": 1},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "table_gb": table_gb,
        "store_existed": existed,
        "create_s": created_s,
        "create_gb_per_s": None if existed else table_gb / created_s,
        "train_s": train_s,
        "samples_per_s": args.steps * args.batch / train_s,
        "checkpoint_s": checkpoint_s,
        "first_loss": losses[0],
        "last_losses_mean": sum(losses[-20:]) / len(losses[-20:]),
        "hit_rate": stats.get("hit_rate"),
        "cache_counters": stats,
        "peak_rss_gib": peak_gib,
        "peak_rss_after_create_gib": rss_after_create / 2**20,
        "budget_gb": args.budget_gb,
        "within_budget": peak_gib * 2**30 / 1e9 <= args.budget_gb,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"trained {args.steps} steps x {args.batch} samples in {train_s:.1f} s: "
          f"{doc['samples_per_s']:,.0f} samples/s; hit rate {doc['hit_rate']:.1%}; loss "
          f"{losses[0]:.4f} -> {doc['last_losses_mean']:.4f}; checkpoint {checkpoint_s:.1f} s")
    print(f"peak RSS {peak_gib:.2f} GiB ({peak_gib * 2**30 / 1e9:.2f} GB) against a budget of "
          f"{args.budget_gb:g} GB: {'within' if doc['within_budget'] else 'OVER'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
