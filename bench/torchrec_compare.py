"""Our plans against TorchRec 1.8's planner, each plan costed under both models.

For each workload, TorchRec's ``EmbeddingShardingPlanner`` plans an
``EmbeddingBagCollection`` on the meta device for a TorchRec ``Topology`` built from
ours (``planner.inputs.torchrec_cost.torchrec_topology``: same devices per host,
usable HBM, DRAM per rank, bandwidths, per-rank batch, pooling factors as
constraints). Our planner plans the same tables twice: with the default
``AnalyticCostModel`` and with ``TorchRecCostModel`` (TorchRec's own estimators).
Every plan is exported as TorchRec runs it (``to_torchrec``: TorchRec's row blocks)
and re-costed under both models (``from_torchrec``): the objective is the slowest
rank's ms/step; the storage fit is each rank's HBM under TorchRec's storage
estimate against the usable HBM. TorchRec may use only the sharding types and
kernels this toolkit can cost (table-, row-, column-, table-row-wise, data-parallel;
fused, fused_uvm_caching, fused_uvm, dense).

Run: ``python bench/torchrec_compare.py`` (needs ``make install-torchrec``). Prints a
table and writes bench/results/torchrec_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workloads import workloads  # noqa: E402
from planner import (  # noqa: E402
    GB,
    AnalyticCostModel,
    Plan,
    PlanOptions,
    TablesSpec,
    Tier,
    Topology,
    TorchRecCostModel,
    capacity_overflows,
    from_torchrec,
    plan,
    read_plan,
    to_torchrec,
)
from planner.inputs import torchrec_data_type, torchrec_topology  # noqa: E402
from planner.tools import import_torchrec  # noqa: E402

DEFAULT_WORKLOADS = ("criteo_kaggle_8x80", "criteo_terabyte_8x80", "criteo_terabyte_4x4")
SLOW = {"gen800_8x80": "TorchRec's planner took 1127 s on it (2026-12-07); pass it by name "
                       "with --torchrec-plans bench/results/torchrec_plans to reuse that plan"}
SHARDING_TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]


def _kernels() -> list[str]:
    kernels = ["fused", "fused_uvm_caching", "dense"]
    if "host" in {t.value for t in Tier}:
        kernels.append("fused_uvm")
    return kernels


def torchrec_planner(tables: TablesSpec, topology: Topology, load_factor: float | None = None):
    """TorchRec's planner on a TorchRec topology matching ``topology``, the module
    and the sharders: ``planner.plan(module, sharders)`` plans. ``load_factor``: the
    cache size of fused_uvm_caching tables (default: TorchRec's, 0.2)."""
    import_torchrec()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner
        from torchrec.distributed.planner.storage_reservations import (
            HeuristicalStorageReservation,
        )
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.types import CacheParams

        trec_topology = torchrec_topology(topology)
        configs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim,
                                      num_embeddings=t.num_embeddings, feature_names=[t.name],
                                      data_type=torchrec_data_type(t.dtype))
                   for t in tables.tables]
        constraints = {t.name: ParameterConstraints(sharding_types=SHARDING_TYPES,
                                                    compute_kernels=_kernels(),
                                                    pooling_factors=[t.pooling_factor],
                                                    cache_params=None if load_factor is None
                                                    else CacheParams(load_factor=load_factor))
                       for t in tables.tables}
        planner = EmbeddingShardingPlanner(
            topology=trec_topology, batch_size=topology.batch_size_per_device,
            constraints=constraints, debug=False,
            # the usable HBM above already leaves out the topology's reserve
            storage_reservation=HeuristicalStorageReservation(percentage=0.0))
        module = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        return planner, module, [EmbeddingBagCollectionSharder()]


def both_models(p: Plan, tables: TablesSpec, topology: Topology,
                torchrec_model: TorchRecCostModel) -> dict:
    """``p`` as TorchRec runs it, costed under our model and under TorchRec's."""
    exported = to_torchrec(p)
    under_ours = from_torchrec(exported, tables, topology, cost_model=AnalyticCostModel())
    under_torchrec = from_torchrec(exported, tables, topology, cost_model=torchrec_model)
    hbm = [d.hbm_bytes for d in under_torchrec.devices]
    cap = topology.usable_hbm_bytes
    return {
        "under_ours_ms": under_ours.solve.objective_ms,
        "under_torchrec_ms": under_torchrec.solve.objective_ms,
        "torchrec_storage_max_rank_gb": max(hbm) / GB,
        "usable_hbm_gb": cap / GB,
        "fits_torchrec_storage": max(hbm) <= cap,
        "torchrec_storage_overflows": [f"rank {r}: {h / GB:.3f} of {cap / GB:.3f} GB"
                                       for r, h in enumerate(hbm) if h > cap],
        "overflows_under_our_model": [
            f"{where} {resource.value}: {used / GB:.3f} of {c / GB:.3f} GB"
            for resource, where, used, c in capacity_overflows(under_ours, AnalyticCostModel())],
    }


def _with_ratios(out: dict) -> dict:
    """``out`` with TorchRec's plan over ours, under each model."""
    t = out["torchrec"]
    out["torchrec_over_ours_under_ours"] = (
        t["under_ours_ms"] / out["ours_default_model"]["under_ours_ms"])
    out["torchrec_over_ours_under_torchrec"] = (
        t["under_torchrec_ms"] / out["ours_torchrec_model"]["under_torchrec_ms"])
    return out


def _cached_torchrec_plan(plans_dir: Path, name: str, tables: TablesSpec,
                          topology: Topology) -> tuple[Plan, dict] | None:
    """TorchRec's plan of ``name`` saved by an earlier run (``NAME.plan.json``, our plan
    format, and ``NAME.json``: its planning time, own rating, kernels), or None."""
    plan_file, info_file = plans_dir / f"{name}.plan.json", plans_dir / f"{name}.json"
    if not (plan_file.exists() and info_file.exists()):
        return None
    saved = read_plan(plan_file)
    return replace(saved, tables_spec=tables, topology=topology), json.loads(info_file.read_text())


def compare(name: str, tables: TablesSpec, topology: Topology, time_limit_s: float,
            retry_load_factors: tuple[float, ...], run_torchrec: bool = True,
            plans_dir: Path | None = None) -> dict:
    """Our two plans and TorchRec's, each under both models. When TorchRec finds no
    plan at its default cache load factor, it is asked again with each of
    ``retry_load_factors`` (what its error message suggests: smaller caches)."""
    options = PlanOptions(time_limit_s=time_limit_s)
    trec_model = TorchRecCostModel()
    out: dict = {"workload": name, "tables": len(tables.tables), "devices": topology.world_size}
    start = time.perf_counter()
    ours = plan(tables, topology, options=options)
    out["ours_default_model"] = {"planning_s": time.perf_counter() - start,
                                 "objective_ms": ours.solve.objective_ms,
                                 "lower_bound_ms": ours.solve.lower_bound_ms,
                                 "sol_status": ours.solve.sol_status,
                                 **both_models(ours, tables, topology, trec_model)}
    start = time.perf_counter()
    ours_trec = plan(tables, topology, cost_model=TorchRecCostModel(), options=options)
    out["ours_torchrec_model"] = {"planning_s": time.perf_counter() - start,
                                  "objective_ms": ours_trec.solve.objective_ms,
                                  "lower_bound_ms": ours_trec.solve.lower_bound_ms,
                                  "sol_status": ours_trec.solve.sol_status,
                                  **both_models(ours_trec, tables, topology, trec_model)}
    if not run_torchrec:
        out["torchrec"] = {"skipped": SLOW.get(name, "not run")}
        return out
    cached = None if plans_dir is None else _cached_torchrec_plan(plans_dir, name, tables,
                                                                   topology)
    if cached is not None:
        theirs, info = cached
        out["torchrec"] = {**info, "plan_file": str(plans_dir / f"{name}.plan.json"),
                           **both_models(theirs, tables, topology, trec_model)}
        return _with_ratios(out)
    attempts = []
    for load_factor in (None, *retry_load_factors):
        trec_planner, module, sharders = torchrec_planner(tables, topology, load_factor)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sharding_plan = trec_planner.plan(module, sharders)
            break
        except Exception as exc:  # noqa: BLE001 - report TorchRec's failure in the results
            attempts.append({"load_factor": load_factor, "planning_s": time.perf_counter() - start,
                             "error": f"{type(exc).__name__}: {exc}"[:400]})
    else:
        out["torchrec"] = {"failed_attempts": attempts}
        return out
    theirs_s = time.perf_counter() - start
    from torchrec.distributed.planner.perf_models import NoopPerfModel

    own_rating = NoopPerfModel(torchrec_topology(topology)).rate(trec_planner._best_plan)
    theirs = from_torchrec(sharding_plan, tables, topology)
    kernels: dict[str, int] = {}
    for module_plan in sharding_plan.plan.values():
        for ps in module_plan.values():
            key = f"{ps.sharding_type}/{ps.compute_kernel}"
            kernels[key] = kernels.get(key, 0) + 1
    out["torchrec"] = {"planning_s": theirs_s, "load_factor": load_factor,
                       "failed_attempts": attempts, "own_rating_ms": own_rating,
                       "sharding_and_kernels": dict(sorted(kernels.items())),
                       **both_models(theirs, tables, topology, trec_model)}
    return _with_ratios(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="*", default=list(DEFAULT_WORKLOADS),
                        help=f"workloads of bench/workloads.py (default: "
                             f"{' '.join(DEFAULT_WORKLOADS)})")
    parser.add_argument("--time-limit", type=float, default=60.0,
                        help="our planner's time limit, s (default: the CLI's, %(default)s)")
    parser.add_argument("--retry-load-factors", type=lambda t: tuple(float(v) for v in t.split(",")),
                        default=(0.1, 0.05, 0.02, 0.01), metavar="F,..",
                        help="cache load factors to retry TorchRec with when it finds no plan "
                             "at its default 0.2 (default: 0.1,0.05,0.02,0.01)")
    parser.add_argument("--skip-torchrec", nargs="*", default=[], metavar="WORKLOAD",
                        help="workloads to plan with our planner only (TorchRec's planner "
                             "takes ~1000 s on gen800_8x80)")
    parser.add_argument("--torchrec-plans", type=Path, default=None, metavar="DIR",
                        help="reuse TorchRec's plan of a workload saved in DIR (NAME.plan.json "
                             "and NAME.json with its planning time and rating) instead of "
                             "planning again (for gen800_8x80, ~1000 s)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the output file's results of workloads not run now")
    parser.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" /
                                                      "torchrec_compare.json"))
    args = parser.parse_args(argv)
    import_torchrec()
    import torchrec

    torchrec_planner(*workloads()["criteo_kaggle_8x80"])  # imports outside the timings
    available = workloads()
    results = []
    for name in args.workloads:
        tables, topology = available[name]
        print(f"{name}: {len(tables.tables)} tables on {topology.world_size} devices ...",
              file=sys.stderr, flush=True)
        results.append(compare(name, tables, topology, args.time_limit,
                               args.retry_load_factors,
                               run_torchrec=name not in args.skip_torchrec,
                               plans_dir=args.torchrec_plans))
    previous = []
    if args.merge and Path(args.output).exists():
        previous = [r for r in json.loads(Path(args.output).read_text())["results"]
                    if r["workload"] not in args.workloads]
    ran = {r["workload"] for r in previous} | set(args.workloads)
    skipped = {name: why for name, why in SLOW.items() if name not in ran}
    print(f"{'workload':22} {'ours/ours':>10} {'TR/ours':>10} {'ours/TR':>10} "
          f"{'oursTR/TR':>10} {'TR/TR':>10} {'fit':>5} {'ours s':>7} {'oursTR s':>8} {'TR s':>7}")
    for r in results:
        a, b, t = r["ours_default_model"], r["ours_torchrec_model"], r["torchrec"]
        fits = all(x.get("fits_torchrec_storage", True) for x in (a, b, t))
        theirs_ours = f"{t['under_ours_ms']:10.4f}" if "under_ours_ms" in t else f"{'-':>10}"
        theirs_trec = f"{t['under_torchrec_ms']:10.4f}" if "under_ours_ms" in t else f"{'-':>10}"
        theirs_s = f"{t['planning_s']:7.2f}" if "planning_s" in t else f"{'-':>7}"
        print(f"{r['workload']:22} {a['under_ours_ms']:10.4f} {theirs_ours} "
              f"{a['under_torchrec_ms']:10.4f} {b['under_torchrec_ms']:10.4f} {theirs_trec} "
              f"{str(fits):>5} {a['planning_s']:7.2f} {b['planning_s']:8.2f} {theirs_s}")
        for label, x in (("ours (default model)", a), ("ours (TorchRec model)", b),
                         ("TorchRec", t)):
            if x.get("torchrec_storage_overflows"):
                print(f"  {label} overflows TorchRec's storage estimate: "
                      f"{'; '.join(x['torchrec_storage_overflows'])}")
        if "failed_attempts" in t and "under_ours_ms" not in t:
            print(f"  TorchRec found no plan: {t['failed_attempts'][-1]['error'][:80]}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "command": "python bench/torchrec_compare.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
        "torchrec_version": torchrec.__version__,
        "cost_models": ["planner:AnalyticCostModel", "planner:TorchRecCostModel"],
        "objective": "predicted ms per step of the slowest rank, each plan as TorchRec runs "
                     "it (its row blocks) under each model",
        "torchrec_kernels_allowed": _kernels(),
        "results": previous + results,
        "skipped": skipped,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
