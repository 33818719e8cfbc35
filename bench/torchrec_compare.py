"""Our plans against TorchRec 1.8's planner, both costed under our analytic model.

For each workload, TorchRec's ``EmbeddingShardingPlanner`` plans an
``EmbeddingBagCollection`` on the meta device for a TorchRec ``Topology`` built from
ours (same devices per host, usable HBM, DRAM per rank, bandwidths, per-rank batch,
pooling factors as constraints). Its plan is imported with
``planner.from_torchrec`` and re-costed under ``AnalyticCostModel``; our planner plans
the same tables with its default options. TorchRec may use only the sharding types
and kernels this toolkit can cost (table-, row-, column-, table-row-wise,
data-parallel; fused, fused_uvm_caching, dense, and fused_uvm once the host tier
exists).

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
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workloads import workloads  # noqa: E402
from planner import (  # noqa: E402
    GB,
    AnalyticCostModel,
    DType,
    PlanOptions,
    TablesSpec,
    Tier,
    Topology,
    capacity_overflows,
    from_torchrec,
    plan,
)
from planner.tools import import_torchrec  # noqa: E402

DEFAULT_WORKLOADS = ("criteo_kaggle_8x80", "criteo_terabyte_8x80", "criteo_terabyte_4x4")
SLOW = {"gen800_8x80": "TorchRec's planner took 634 s on it (issue 16); pass it by name to run"}
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
        from torchrec.distributed.planner import Topology as TorchRecTopology
        from torchrec.distributed.planner.storage_reservations import (
            HeuristicalStorageReservation,
        )
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.types import CacheParams
        from torchrec.modules.embedding_configs import DataType

        dtypes = {DType.FP32: DataType.FP32, DType.FP16: DataType.FP16,
                  DType.BF16: DataType.BF16}
        per_ms = GB / 1000  # GB/s -> bytes/ms, TorchRec's bandwidth unit
        trec_topology = TorchRecTopology(
            world_size=topology.world_size,
            compute_device="cuda",
            hbm_cap=topology.usable_hbm_bytes,
            ddr_cap=int(topology.host.dram_gb * GB) // topology.devices_per_host,
            local_world_size=topology.devices_per_host,
            hbm_mem_bw=topology.device.hbm_gbps * per_ms,
            ddr_mem_bw=topology.host.dram_gbps * per_ms,
            hbm_to_ddr_mem_bw=topology.host.h2d_gbps * per_ms,
            intra_host_bw=topology.network.intra_host_gbps * per_ms,
            inter_host_bw=topology.network.inter_host_gbps * per_ms,
        )
        configs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim,
                                      num_embeddings=t.num_embeddings, feature_names=[t.name],
                                      data_type=dtypes[t.dtype])
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


def compare(name: str, tables: TablesSpec, topology: Topology, time_limit_s: float,
            retry_load_factors: tuple[float, ...]) -> dict:
    """Both plans costed under our model. When TorchRec finds no plan at its default
    cache load factor, it is asked again with each of ``retry_load_factors`` (what its
    error message suggests to its users: smaller caches)."""
    model = AnalyticCostModel()
    start = time.perf_counter()
    ours = plan(tables, topology, options=PlanOptions(time_limit_s=time_limit_s))
    ours_s = time.perf_counter() - start
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
        return {"workload": name, "tables": len(tables.tables), "devices": topology.world_size,
                "ours": {"objective_ms": ours.solve.objective_ms, "planning_s": ours_s},
                "torchrec": {"failed_attempts": attempts}}
    theirs_s = time.perf_counter() - start
    theirs = from_torchrec(sharding_plan, tables, topology, cost_model=model)
    kernels: dict[str, int] = {}
    for module in sharding_plan.plan.values():
        for ps in module.values():
            key = f"{ps.sharding_type}/{ps.compute_kernel}"
            kernels[key] = kernels.get(key, 0) + 1
    overflows = [f"{where} {resource.value}: {used / GB:.3f} of {cap / GB:.3f} GB"
                 for resource, where, used, cap in capacity_overflows(theirs, model)]
    return {
        "workload": name,
        "tables": len(tables.tables),
        "devices": topology.world_size,
        "ours": {"objective_ms": ours.solve.objective_ms, "planning_s": ours_s,
                 "lower_bound_ms": ours.solve.lower_bound_ms, "method": ours.solve.method,
                 "sol_status": ours.solve.sol_status},
        "torchrec": {"objective_ms": theirs.solve.objective_ms, "planning_s": theirs_s,
                     "load_factor": load_factor, "failed_attempts": attempts,
                     "sharding_and_kernels": dict(sorted(kernels.items())),
                     "overflows_under_our_model": overflows},
        "ratio_torchrec_over_ours": theirs.solve.objective_ms / ours.solve.objective_ms,
    }


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
                               args.retry_load_factors))
    previous = []
    if args.merge and Path(args.output).exists():
        previous = [r for r in json.loads(Path(args.output).read_text())["results"]
                    if r["workload"] not in args.workloads]
    ran = {r["workload"] for r in previous} | set(args.workloads)
    skipped = {name: why for name, why in SLOW.items() if name not in ran}
    print(f"{'workload':24} {'ours ms':>10} {'TorchRec ms':>12} {'ratio':>6} "
          f"{'ours s':>7} {'TorchRec s':>10}")
    for r in results:
        theirs = r["torchrec"]
        if "objective_ms" not in theirs:
            print(f"{r['workload']:24} {r['ours']['objective_ms']:10.4f}  TorchRec found no plan: "
                  f"{theirs['failed_attempts'][-1]['error'][:80]}")
            continue
        print(f"{r['workload']:24} {r['ours']['objective_ms']:10.4f} {theirs['objective_ms']:12.4f}"
              f" {r['ratio_torchrec_over_ours']:6.2f} {r['ours']['planning_s']:7.1f}"
              f" {theirs['planning_s']:10.1f}")
        if theirs["load_factor"] is not None:
            print(f"  TorchRec planned only with cache load factor {theirs['load_factor']}")
        if theirs["overflows_under_our_model"]:
            print(f"  TorchRec's plan overflows under our model: "
                  f"{'; '.join(theirs['overflows_under_our_model'])}")
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
        "cost_model": "planner:AnalyticCostModel",
        "objective": "predicted ms per step of the slowest device",
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
