"""How much any plan TorchRec's options allow could beat TorchRec's planner, under
TorchRec 1.8's own estimators: a lower bound over every option its enumerator prices
that this toolkit's runtime and TorchRec export execute.

The options, per table (priced by ``TorchRecCostModel``, i.e. TorchRec's
EmbeddingPerfEstimator and EmbeddingStorageEstimator):

- table-wise; row-wise over all ranks (in TorchRec's blocks of ``ceil(rows / ranks)``
  rows, and in the planner's near-equal split);
  table-row-wise over one host (on one host TorchRec prices it as row-wise, checked
  below); data-parallel at any size;
- column-wise into ``k`` equal blocks for every ``k`` dividing the dimension (TorchRec
  cuts column-wise tables into equal blocks of ``col_wise_shard_dim`` columns), any
  number of them on one rank;
- each with the ``fused`` kernel, and with ``fused_uvm_caching`` at every load factor
  and ``fused_uvm``: these only save HBM. On the workloads here HBM does not bind
  (the memory-free choice below fits), so the bound is the optimum of the aggregate
  ILP without memory constraints (``planner.search.aggregate``: ``G z >=`` total
  work, ``z >=`` each table's largest shard) over the fused options, a relaxation of
  every plan. It also holds for plans with cached or host-tier tables because each
  is no faster than its fused twin in total work and largest shard: checked below
  for every layout at load factors 0.05, 0.1, ..., 1.0 (TorchRec's caching time falls
  as the load factor grows and at 1.0 is still above ``fused``) and for ``fused_uvm``.

Not covered: TorchRec's grid sharding and key-value kernels, which this runtime does
not run; uneven column blocks, which TorchRec does not produce.

Run: ``python bench/torchrec_bound.py`` (needs ``make install-torchrec``); reads the
plans' scores from bench/results/torchrec_compare.json, writes
bench/results/torchrec_bound.json.
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
from planner import OptionSettings, Sharding, ShardOption, Tier, TorchRecCostModel  # noqa: E402
from planner.search import Placement, TableOption, solve_aggregate, table_options  # noqa: E402
from planner.tools import import_torchrec  # noqa: E402

DEFAULT_WORKLOADS = ("criteo_kaggle_8x80", "criteo_terabyte_8x80", "gen800_8x80")
LOAD_FACTORS = tuple(round(0.05 * i, 2) for i in range(1, 21))
WIN = 0.05
"""The target: 5 % faster than TorchRec's plan."""


def _column_option(table, k: int, topology, model) -> TableOption:
    """Column-wise into ``k`` equal blocks, in HBM, shards placed anywhere."""
    rows, width = table.num_embeddings, table.embedding_dim // k
    shard = ShardOption(table, Sharding.COLUMN_WISE, rows, width, k, 1.0, 1.0, Tier.HBM, 0)
    cols = tuple((i * width, (i + 1) * width) for i in range(k))
    return TableOption(table, Sharding.COLUMN_WISE, Tier.HBM, 1.0, Placement.FREE,
                       ((0, rows),), cols, (((rows, width), k, 0, model.cost(shard, topology)),))


def _row_option(table, topology, model) -> TableOption:
    """Row-wise in TorchRec's blocks of ``ceil(rows / ranks)`` rows (the last one shorter,
    empty ones left out: leaving out work only lowers the bound), in HBM."""
    rows, world = table.num_embeddings, topology.world_size
    block = -(-rows // world)
    ranges = tuple((r, min(rows, r + block)) for r in range(0, rows, block))
    sizes = sorted({b - a for a, b in ranges})
    priced = tuple(((n, table.embedding_dim), sum(1 for a, b in ranges if b - a == n), 0,
                    model.cost(ShardOption(table, Sharding.ROW_WISE, n, table.embedding_dim,
                                           world, 1 / world, 1.0, Tier.HBM, 0), topology))
                   for n in sizes)
    return TableOption(table, Sharding.ROW_WISE, Tier.HBM, 1.0, Placement.EVERY_DEVICE, ranges,
                       ((0, table.embedding_dim),), priced)


def fused_options(table, topology, model) -> list[TableOption]:
    """Every fused (HBM) option of ``table`` listed in the module docstring."""
    settings = OptionSettings(tiers=frozenset({Tier.HBM}), column_shards=(),
                              data_parallel_max_bytes=2**62)
    options = table_options(table, topology, model, settings, capacity_bytes=2**62)
    dim = table.embedding_dim
    options += [_column_option(table, k, topology, model)
                for k in range(2, dim + 1) if dim % k == 0]
    if table.num_embeddings >= topology.world_size:
        options.append(_row_option(table, topology, model))
    return options


def slower_tiers_checked(table, topology, model) -> int:
    """Check that every cached and host-tier variant of the table's table-wise,
    row-wise and column-wise (2 blocks) layouts is no faster than its fused twin;
    returns the number of variants checked (AssertionError naming the first that is
    faster)."""
    checked = 0
    layouts = [(Sharding.TABLE_WISE, table.num_embeddings, table.embedding_dim, 1, 1.0)]
    world = topology.world_size
    if table.num_embeddings >= world:
        layouts.append((Sharding.ROW_WISE, -(-table.num_embeddings // world),
                        table.embedding_dim, world, 1 / world))
    if table.embedding_dim % 2 == 0:
        layouts.append((Sharding.COLUMN_WISE, table.num_embeddings, table.embedding_dim // 2,
                        2, 1.0))
    for sharding, rows, cols, n, share in layouts:
        fused = model.cost(ShardOption(table, sharding, rows, cols, n, share, 1.0, Tier.HBM, 0),
                           topology)
        variants = [(Tier.HOST, 0)] + [(Tier.DRAM_CACHE, max(1, round(rows * f)))
                                       for f in LOAD_FACTORS]
        for tier, cache in variants:
            cost = model.cost(ShardOption(table, sharding, rows, cols, n, share, 1.0, tier,
                                          cache), topology)
            assert cost.total_ms >= fused.total_ms * (1 - 1e-12), (
                f"{table.name} {sharding.value} {tier.value}@{cache} is faster than fused")
            checked += 1
    return checked


def bound(name: str) -> dict:
    tables, topology = workloads()[name]
    model = TorchRecCostModel()
    start = time.perf_counter()
    options = [fused_options(t, topology, model) for t in tables.tables]
    checked = sum(slower_tiers_checked(t, topology, model) for t in tables.tables)
    twrw_equals_rw = None
    if topology.hosts == 1:
        t = max(tables.tables, key=lambda t: t.num_embeddings)
        world = topology.world_size
        rows = -(-t.num_embeddings // world)
        rw, twrw = (model.cost(ShardOption(t, s, rows, t.embedding_dim, world, 1 / world, 1.0,
                                           Tier.HBM, 0), topology)
                    for s in (Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE))
        twrw_equals_rw = rw == twrw
    choice = solve_aggregate(options, topology, time_limit_s=120)
    chosen = [options[t][o] for t, o in enumerate(choice.choice)]
    hbm_fits = all(o.max_shard_hbm_bytes <= topology.usable_hbm_bytes for o in chosen) and (
        sum(o.hbm_bytes for o in chosen) <= topology.usable_hbm_bytes * topology.world_size)
    return {
        "workload": name, "tables": len(tables.tables), "devices": topology.world_size,
        "fused_options": sum(map(len, options)),
        "cached_and_host_variants_checked_slower": checked,
        "table_row_wise_on_one_host_priced_as_row_wise": twrw_equals_rw,
        "memory_binds": choice.memory_binds, "chosen_fits_hbm": hbm_fits,
        "lower_bound_ms": choice.lower_bound_ms, "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="*", default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--compare", type=Path,
                        default=ROOT / "bench" / "results" / "torchrec_compare.json")
    parser.add_argument("-o", "--output", type=Path,
                        default=ROOT / "bench" / "results" / "torchrec_bound.json")
    args = parser.parse_args(argv)
    import_torchrec()
    import torchrec

    scores = {r["workload"]: r for r in json.loads(args.compare.read_text())["results"]}
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.workloads:
            print(f"{name} ...", file=sys.stderr, flush=True)
            r = bound(name)
            compared = scores.get(name)
            if compared is not None and "under_torchrec_ms" in compared["torchrec"]:
                theirs = compared["torchrec"]["under_torchrec_ms"]
                ours = compared["ours_torchrec_model"]["under_torchrec_ms"]
                r.update(ours_ms=ours, torchrec_ms=theirs,
                         best_possible_saving=1 - r["lower_bound_ms"] / theirs,
                         our_saving=1 - ours / theirs,
                         five_percent_possible=r["lower_bound_ms"] <= (1 - WIN) * theirs)
            results.append(r)
    print(f"{'workload':22} {'bound ms':>10} {'ours ms':>10} {'TorchRec ms':>11} "
          f"{'most saving':>11} {'ours':>7}")
    for r in results:
        if "torchrec_ms" in r:
            print(f"{r['workload']:22} {r['lower_bound_ms']:10.5f} {r['ours_ms']:10.5f} "
                  f"{r['torchrec_ms']:11.5f} {r['best_possible_saving']:11.2%} "
                  f"{r['our_saving']:7.2%}")
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "command": "python bench/torchrec_bound.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "torchrec_version": torchrec.__version__,
        "cost_model": "planner:TorchRecCostModel",
        "bound": "no plan over the options in bench/torchrec_bound.py's docstring is faster "
                 "(ms per step of the slowest rank, TorchRec 1.8's estimators)",
        "results": results,
    }
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
