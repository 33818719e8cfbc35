"""Measured steps of our plans and TorchRec's, in TorchRec's runtime and in ours.

On a CPU topology calibrated on this machine (``dlrm-plan calibrate``, 1 host x 2
devices), one tables spec (12 tables, skewed rows, dims 16-64, pooling 1-20, fixed
seed) is planned three times: (a) our planner with the default AnalyticCostModel,
(b) our planner with TorchRecCostModel, (c) TorchRec 1.8's EmbeddingShardingPlanner
(given the topology as bench/torchrec_compare.py gives it). Every plan is taken as
TorchRec runs it (its row blocks) and trained:

- in TorchRec's DistributedModelParallel on 2 gloo processes: the sharded
  EmbeddingBagCollection alone, a sum of its pooled outputs as the loss, TorchRec's
  fused SGD (the tables' optimizer) applied in backward; no dense part, so the step is
  what the plan's objective prices. One pair of workers builds the three models and
  trains them interleaved (a b c a b c ...); a step's time is the slowest rank's
  (the ranks start each step together at a barrier);
- in ``dlrm-run --nproc-per-node 2`` (the full DLRM with a small MLP and a ``cat``
  interaction, synthetic clicks), runs interleaved the same way; the figure is the
  slowest rank's median step from the metrics log's ``timing`` records, and its
  embedding part (lookup + communication + update) beside the embedding prediction.

Both runtimes draw the same ids (dlrm_runtime's synthetic Zipf stream, seed 0) at the
topology's batch per rank. Predictions: our model's (the slowest rank's ms/step) and
TorchRec's estimators' (the slowest rank's perf as its stats report it). Errors are
(predicted - measured) / measured.

Run: ``python -m bench.torchrec_measured`` (needs ``make install-torchrec``; a few
minutes; ``--quick`` for a smoke run). Writes bench/results/torchrec_measured.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.torchrec_compare import both_models, torchrec_planner  # noqa: E402
from planner import (  # noqa: E402
    AnalyticCostModel,
    Plan,
    PlanOptions,
    TablesSpec,
    TableSpec,
    Topology,
    TorchRecCostModel,
    from_torchrec,
    load_topology,
    plan,
    plan_to_json,
    to_torchrec,
    to_torchrec_sharding_plan,
)

WORLD = 2
PLANS = ("ours_default_model", "ours_torchrec_model", "torchrec")


# ---------------------------------------------------------------- inputs


def tables_spec(num_tables: int = 12, seed: int = 0) -> TablesSpec:
    """Rows log-uniform in 1e3..5e5, dims 16/32/64, pooling log-uniform in 1..20."""
    rng = np.random.default_rng(seed)
    rows = np.exp(rng.uniform(np.log(1e3), np.log(5e5), num_tables)).astype(int)
    dims = rng.choice([16, 32, 64], num_tables)
    pooling = np.exp(rng.uniform(0.0, np.log(20.0), num_tables))
    return TablesSpec(tuple(TableSpec(f"t{i}", int(rows[i]), int(dims[i]),
                                      float(round(pooling[i])))
                            for i in range(num_tables)),
                      f"{num_tables} tables, seed {seed}, rows 1e3..5e5, dims 16-64, pooling 1-20")


def calibrate(path: Path, batch_per_rank: int, quick: bool) -> None:
    """``dlrm-plan calibrate`` of this machine as 1 host x 2 devices, 1 thread each."""
    command = [sys.executable, "-m", "cli.plan", "calibrate", "-o", str(path),
               "--devices", str(WORLD), "--batch-size-per-device", str(batch_per_rank),
               "--threads", "1", *(["--quick"] if quick else ["--rounds", "3"])]
    subprocess.run(command, check=True, cwd=ROOT, env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------- plans


def make_plans(tables: TablesSpec, topology: Topology) -> tuple[dict[str, Plan], dict]:
    """The three plans as TorchRec runs them (re-costed under our model), and for each
    its predictions under both models and what TorchRec's planner rated its own."""
    options = PlanOptions(time_limit_s=30.0)
    trec_model = TorchRecCostModel()
    planned = {"ours_default_model": plan(tables, topology, options=options),
               "ours_torchrec_model": plan(tables, topology, cost_model=trec_model,
                                           options=options)}
    trec_planner, module, sharders = torchrec_planner(tables, topology)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planned["torchrec"] = from_torchrec(trec_planner.plan(module, sharders), tables,
                                            topology)
    from torchrec.distributed.planner.perf_models import NoopPerfModel

    from planner.inputs import torchrec_topology

    own_rating = NoopPerfModel(torchrec_topology(topology)).rate(trec_planner._best_plan)
    plans, predictions = {}, {}
    for name, p in planned.items():
        plans[name] = from_torchrec(to_torchrec(p), tables, topology,
                                    cost_model=AnalyticCostModel())
        scored = both_models(p, tables, topology, trec_model)
        predictions[name] = {
            "our_model_ms": scored["under_ours_ms"],
            "torchrec_model_ms": scored["under_torchrec_ms"],
            "fits_torchrec_storage": scored["fits_torchrec_storage"],
            "tables": {t.name: f"{t.sharding.value} on {sorted({s.device for s in t.shards})}"
                       for t in plans[name].tables},
        }
    predictions["torchrec"]["torchrec_own_rating_ms"] = own_rating
    return plans, predictions


# ---------------------------------------------------------------- TorchRec's runtime


def _dmp_model(tables: TablesSpec, doc: dict):
    """The EmbeddingBagCollection of ``tables`` sharded by ``doc`` (a ``to_torchrec``
    plan for CPU) in DistributedModelParallel; fused tables update in backward with
    TorchRec's exact SGD; data-parallel (``dense`` kernel) tables get a plain SGD."""
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    configs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim,
                                  num_embeddings=t.num_embeddings, feature_names=[t.name])
               for t in tables.tables]
    sharder = EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.05})
    model = DistributedModelParallel(
        EmbeddingBagCollection(tables=configs, device=torch.device("meta")),
        device=torch.device("cpu"), plan=to_torchrec_sharding_plan(doc), sharders=[sharder])
    dense = KeyedOptimizerWrapper(dict(model.named_parameters()),
                                  lambda params: torch.optim.SGD(params, lr=0.05))
    return model, dense


def _features(tables: TablesSpec, step: int, batch_per_rank: int, rank: int):
    """This rank's share of global batch ``step`` of dlrm-run's synthetic stream (seed
    0), as TorchRec's KeyedJaggedTensor."""
    import torch
    from torchrec import KeyedJaggedTensor

    from dlrm_runtime.data import SyntheticClicks
    from dlrm_runtime.distributed import local_batch

    sparse = local_batch(SyntheticClicks(tables, seed=0).batch(step, batch_per_rank * WORLD),
                         rank, WORLD).sparse
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[t.name for t in tables.tables], values=torch.cat(sparse.ids),
        lengths=torch.cat([offsets.diff() for offsets in sparse.offsets]))


def _dmp_worker(rank: int, port: int, tables_doc: dict, docs: dict[str, dict],
                batch_per_rank: int, steps: int, warmup: int, reps: int,
                results: multiprocessing.Queue) -> None:
    """Build the models of every plan, then train them interleaved: for each rep, each
    plan ``warmup + steps`` steps; put (rank, {plan: [[step s] per rep]}, loads)."""
    try:
        import logging

        import torch
        import torch.distributed as dist

        from planner import parse_tables

        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        tables = parse_tables(tables_doc)
        models = {name: _dmp_model(tables, doc) for name, doc in docs.items()}
        batches = [_features(tables, s, batch_per_rank, rank) for s in range(warmup + steps)]
        times: dict[str, list[list[float]]] = {name: [] for name in docs}
        loads = []
        for rep in range(reps):
            for name, (model, dense) in models.items():
                before = os.getloadavg()
                seconds = []
                for features in batches:
                    dist.barrier()  # every rank starts the step together; not timed
                    start = time.perf_counter()
                    loss = model(features).wait().values().sum()
                    loss.backward()  # fused tables apply SGD here; all-to-all and all-reduce
                    dense.step()
                    dense.zero_grad()
                    seconds.append(time.perf_counter() - start)
                times[name].append(seconds[warmup:])
                loads.append({"runtime": "dmp", "plan": name, "rep": rep,
                              "load_before": before, "load_after": os.getloadavg()})
        results.put((rank, times, loads))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, traceback.format_exc(), None))


def measure_dmp(tables: TablesSpec, plans: dict[str, Plan], batch_per_rank: int, steps: int,
                warmup: int, reps: int) -> dict:
    """Per plan: the slowest rank's ms of each step, the median per rep, and the median
    of those."""
    from dlrm_runtime.distributed import free_port

    docs = {name: to_torchrec(p, device="cpu") for name, p in plans.items()}
    context = multiprocessing.get_context("spawn")  # fork after torch's pools ran can hang
    results = context.Queue()
    args = (free_port(), tables.to_json(), docs, batch_per_rank, steps, warmup, reps, results)
    workers = [context.Process(target=_dmp_worker, args=(rank, *args)) for rank in range(WORLD)]
    for w in workers:
        w.start()
    got = dict((rank, (times, loads)) for rank, times, loads in
               (results.get(timeout=1800) for _ in workers))
    for w in workers:
        w.join(timeout=60)
    for rank, (times, _) in got.items():
        if not isinstance(times, dict):
            raise RuntimeError(f"DMP rank {rank} failed:\n{times}")
    out = {}
    for name in plans:
        per_rep = [statistics.median(max(pair) * 1e3 for pair in zip(*(got[r][0][name][rep]
                                                                    for r in range(WORLD))))
                   for rep in range(reps)]
        out[name] = {"median_step_ms": statistics.median(per_rep), "per_rep_ms": per_rep}
    return {"plans": out, "loads": got[0][1]}


# ---------------------------------------------------------------- our runtime


DLRM_ARGS = ("--interaction", "cat", "--bottom-mlp", "32,16", "--top-mlp", "64,1",
             "--threads", "1", "--no-progress")


def _dlrm_run(plan_file: Path, log: Path, steps: int) -> list[dict]:
    """``dlrm-run --nproc-per-node 2`` of ``plan_file``; its per-rank timing records."""
    command = [sys.executable, "-m", "cli.run", "--nproc-per-node", str(WORLD),
               "--plan", str(plan_file), "--steps", str(steps), "--log-every", str(steps),
               "--metrics-log", str(log), *DLRM_ARGS]
    subprocess.run(command, check=True, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in records if r.get("event") == "timing"]


def measure_dlrm_run(plans: dict[str, Plan], steps: int, warmup: int, reps: int) -> dict:
    """Per plan and rep, the slowest rank's median step and embedding part (lookup +
    communication + update, medians), and that rank's prediction; medians over reps."""
    out: dict = {name: {"per_rep_ms": [], "per_rep_embedding_ms": []} for name in plans}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, p in plans.items():
            Path(tmp, f"{name}.plan.json").write_text(json.dumps(plan_to_json(p)))
        for rep in range(reps):
            for name in plans:
                log = Path(tmp, f"{name}.{rep}.jsonl")
                before = os.getloadavg()
                records = _dlrm_run(Path(tmp, f"{name}.plan.json"), log, warmup + steps)
                loads.append({"runtime": "dlrm-run", "plan": name, "rep": rep,
                              "load_before": before, "load_after": os.getloadavg()})
                slowest = max(records, key=lambda r: r["measured"]["median_step_ms"])
                phases = slowest["measured"]["median_phase_ms"]
                predicted = max(records, key=lambda r: r["predicted"]["step_ms"] or 0.0)
                out[name]["per_rep_ms"].append(slowest["measured"]["median_step_ms"])
                out[name]["per_rep_embedding_ms"].append(
                    phases["lookup"] + phases["communication"] + phases["update"])
                pred = predicted["predicted"]
                out[name]["predicted_step_ms"] = pred["step_ms"]
                out[name]["predicted_embedding_ms"] = (pred["lookup_ms"] + pred["communication_ms"]
                                                       + pred["update_ms"])
                out[name]["predicted_dense_ms"] = pred["dense_ms"]
                out[name]["predicted_phase_ms"] = {key: pred[f"{key}_ms"] for key in
                                                   ("lookup", "communication", "update", "dense")}
                out[name].setdefault("per_rep_phase_ms", []).append(phases)
    for name in plans:
        out[name]["median_step_ms"] = statistics.median(out[name]["per_rep_ms"])
        out[name]["median_embedding_ms"] = statistics.median(out[name]["per_rep_embedding_ms"])
    return {"plans": out, "loads": loads}


# ---------------------------------------------------------------- report


def _error(predicted: float | None, measured: float) -> float | None:
    return None if predicted is None else (predicted - measured) / measured


def summarize(predictions: dict, dmp: dict, ours: dict) -> dict:
    """Per plan: measured, predicted and the errors; the faster plan in each runtime."""
    rows = {}
    for name, pred in predictions.items():
        measured = dmp["plans"][name]["median_step_ms"]
        run = ours["plans"][name]
        rows[name] = {
            "dmp_ms": measured,
            "dlrm_run_ms": run["median_step_ms"],
            "dlrm_run_embedding_ms": run["median_embedding_ms"],
            "our_model_ms": pred["our_model_ms"],
            "torchrec_model_ms": pred["torchrec_model_ms"],
            "our_model_error_vs_dmp": _error(pred["our_model_ms"], measured),
            "torchrec_model_error_vs_dmp": _error(pred["torchrec_model_ms"], measured),
            "our_model_error_vs_dlrm_run_embedding": _error(run["predicted_embedding_ms"],
                                                            run["median_embedding_ms"]),
            "torchrec_model_error_vs_dlrm_run_embedding": _error(pred["torchrec_model_ms"],
                                                                 run["median_embedding_ms"]),
            "our_model_error_vs_dlrm_run_step": _error(run["predicted_step_ms"],
                                                       run["median_step_ms"]),
        }
    for name, row in rows.items():  # a rep's runs are adjacent in time: fairer than medians
        for runtime, measured in (("dmp", dmp), ("dlrm_run", ours)):
            row[f"{runtime}_over_torchrec_plan"] = statistics.median(
                a / b for a, b in zip(measured["plans"][name]["per_rep_ms"],
                                      measured["plans"]["torchrec"]["per_rep_ms"]))
    fastest = {runtime: min(rows, key=lambda n: rows[n][f"{runtime}_over_torchrec_plan"])
               for runtime in ("dmp", "dlrm_run")}
    return {"per_plan": rows, "fastest": fastest}


def print_table(summary: dict) -> None:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:+.0%}"

    print(f"{'plan':20} {'DMP ms':>8} {'run ms':>8} {'run emb':>8} {'ours ms':>8} "
          f"{'TR ms':>8} {'ours/DMP':>9} {'TR/DMP':>8} {'ours/emb':>9} {'TR/emb':>8} "
          f"{'DMP x TR':>8} {'run x TR':>8}")
    for name, r in summary["per_plan"].items():
        print(f"{name:20} {r['dmp_ms']:8.2f} {r['dlrm_run_ms']:8.2f} "
              f"{r['dlrm_run_embedding_ms']:8.2f} {r['our_model_ms']:8.2f} "
              f"{r['torchrec_model_ms']:8.2f} {pct(r['our_model_error_vs_dmp']):>9} "
              f"{pct(r['torchrec_model_error_vs_dmp']):>8} "
              f"{pct(r['our_model_error_vs_dlrm_run_embedding']):>9} "
              f"{pct(r['torchrec_model_error_vs_dlrm_run_embedding']):>8} "
              f"{r['dmp_over_torchrec_plan']:8.2f} {r['dlrm_run_over_torchrec_plan']:8.2f}")
    print("errors: (predicted - measured) / measured; emb: dlrm-run's lookup + communication + "
          "update; x TR: median over reps of the run's time over the TorchRec plan's")
    print(f"fastest in DMP: {summary['fastest']['dmp']}; in dlrm-run: "
          f"{summary['fastest']['dlrm_run']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per plan "
                                                            "and runtime (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60,
                        help="timed steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps first (default: %(default)s)")
    parser.add_argument("--batch-per-rank", type=int, default=1024,
                        help="samples per rank and step (default: %(default)s)")
    parser.add_argument("--topology", type=Path,
                        help="a calibrated topology to use (default: calibrate now)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: quick calibration, 1 rep, 10 steps, batch 256, "
                             "written to a temp file unless -o")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.steps, args.warmup, args.batch_per_rank = 1, 10, 3, 256
    output = args.output or (Path(tempfile.gettempdir()) / "torchrec_measured.json" if args.quick
                             else ROOT / "bench" / "results" / "torchrec_measured.json")
    import logging

    logging.disable(logging.WARNING)  # TorchRec warns about meta-device topologies
    load_at_start = os.getloadavg()
    topology_file = args.topology
    if topology_file is None:
        topology_file = Path(tempfile.mkdtemp()) / "cpu2.topology.json"
        print("calibrating ...", file=sys.stderr, flush=True)
        calibrate(topology_file, args.batch_per_rank, args.quick)
    topology = load_topology(topology_file)
    if topology.batch_size_per_device != args.batch_per_rank:
        from dataclasses import replace

        topology = replace(topology, batch_size_per_device=args.batch_per_rank)
    tables = tables_spec()
    plans, predictions = make_plans(tables, topology)
    print("training in DistributedModelParallel ...", file=sys.stderr, flush=True)
    dmp = measure_dmp(tables, plans, args.batch_per_rank, args.steps, args.warmup, args.reps)
    print("training in dlrm-run ...", file=sys.stderr, flush=True)
    ours = measure_dlrm_run(plans, args.steps, args.warmup, args.reps)
    summary = summarize(predictions, dmp, ours)
    print_table(summary)
    import torchrec

    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "command": "python -m bench.torchrec_measured " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "torchrec_version": torchrec.__version__,
        "load_average_1_5_15_min": {"start": load_at_start, "end": os.getloadavg()},
        "setup": {
            "world": WORLD, "batch_per_rank": args.batch_per_rank, "steps": args.steps,
            "warmup_steps": args.warmup, "reps": args.reps, "threads_per_rank": 1,
            "dmp_model": "sharded EmbeddingBagCollection, loss = sum of pooled outputs, "
                         "fused EXACT_SGD (data-parallel tables: torch SGD); the slowest "
                         "rank's time per step, median over steps, median over reps",
            "dlrm_run_model": "dlrm-run " + " ".join(DLRM_ARGS) + "; the slowest rank's "
                              "median step (and lookup + communication + update), median "
                              "over reps",
            "our_model": "planner:AnalyticCostModel on the calibrated topology, the slowest "
                         "rank's ms/step of the plan as TorchRec runs it",
            "torchrec_model": "TorchRec 1.8's EmbeddingPerfEstimator via TorchRecCostModel, "
                              "the slowest rank's perf as its stats report it",
            "error": "(predicted - measured) / measured",
        },
        "topology": json.loads(topology_file.read_text()),
        "tables": tables.to_json(),
        "predictions": predictions,
        "dmp": dmp,
        "dlrm_run": ours,
        "summary": summary,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
