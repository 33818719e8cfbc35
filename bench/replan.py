"""Re-planning benchmark: the 800-table workload on 16 devices, planned, then its pooling
factors drift (log-normal, sigma 0.5) and its access flattens (Zipf exponent - 0.2);
re-planned from the old plan under migration budgets.

    .venv/bin/python bench/replan.py

Prints a table and writes bench/results/replan.json: per budget the slowest device when
staying (the old placement re-costed), of the fresh plan (no budget) and what it moves,
of the re-plan and what it moves, and the gain against staying.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import generated_tables, topology  # noqa: E402
from planner import AccessProfile, PlanOptions, TablesSpec, plan, replan  # noqa: E402

BUDGETS_GB = (0.0, 1.0, 10.0, None)


def drifted(tables: TablesSpec, seed: int = 1) -> TablesSpec:
    rng = np.random.default_rng(seed)
    return replace(tables, tables=tuple(
        replace(t, pooling_factor=round(t.pooling_factor * float(np.exp(rng.normal(0.0, 0.5))), 3),
                access=AccessProfile(zipf=round(max(0.5, (t.access.zipf or 1.0) - 0.2), 3)))
        for t in tables.tables))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-limit", type=float, default=60.0,
                        help="planning budget of each call (default: 60, as the CLI)")
    parser.add_argument("-o", "--output",
                        default=str(Path(__file__).parent / "results" / "replan.json"))
    args = parser.parse_args(argv)
    tables, kind = generated_tables(800), topology(16)
    options = PlanOptions(time_limit_s=args.time_limit)
    old = plan(tables, kind, options=options)
    new_tables = drifted(tables)
    rows = []
    print(f"{'budget GB':>9} {'stay ms':>9} {'fresh ms':>9} {'fresh GB':>9} {'replan ms':>9} "
          f"{'moved GB':>9} {'gain':>6} {'wall s':>7}")
    for gb in BUDGETS_GB:
        start = time.perf_counter()
        result = replan(old, new_tables, kind, options=options,
                        max_migrate_bytes=None if gb is None else int(gb * 1e9))
        wall = time.perf_counter() - start
        fresh = result.fresh.solve.objective_ms if result.fresh is not None else None
        row = {"budget_gb": gb, "stay_ms": result.stay.solve.objective_ms, "fresh_ms": fresh,
               "fresh_migrated_bytes": result.fresh_migrated_bytes,
               "replan_ms": result.plan.solve.objective_ms,
               "migrated_bytes": result.migrated_bytes, "gain_ms": result.gain_ms,
               "gain": result.gain, "kept_old": result.kept_old, "wall_seconds": wall,
               "load_average_1min": os.getloadavg()[0]}
        rows.append(row)
        print(f"{'none' if gb is None else gb:>9} {row['stay_ms']:>9.3f} {fresh or 0.0:>9.3f} "
              f"{(row['fresh_migrated_bytes'] or 0) / 1e9:>9.2f} {row['replan_ms']:>9.3f} "
              f"{row['migrated_bytes'] / 1e9:>9.3f} {row['gain']:>6.1%} {wall:>7.1f}", flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                               "workload": "gen800 on 2 hosts x 8 x 80 GB, drifted (seed 1)",
                               "old_objective_ms": old.solve.objective_ms,
                               "note": "shared machine: other processes ran meanwhile",
                               "rows": rows}, indent=1) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
