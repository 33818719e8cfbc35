"""Re-planning over a ladder of migration budgets: Criteo Terabyte on 1 host x 4 devices
of 24 GB (batch 2048 per device), planned, then every table's access set to Zipf 1.1 and
re-planned from the old plan at budgets from 0 to beyond the fresh plan's migration.
A larger budget must never give a slower plan.

    .venv/bin/python bench/replan_monotone.py

Writes bench/results/replan_monotone.json: per budget the re-plan's slowest device, what
it moves, whether the assignment ILP proved it optimal, and the wall time.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workloads import topology
from planner import AccessProfile, load_tables, plan, replan

BUDGETS_GB = (0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, None)


def main() -> int:
    tables = load_tables(ROOT / "examples" / "criteo_terabyte.tables.json")
    kind = topology(4, hbm_gb=24.0, batch_size_per_device=2048)
    old = plan(tables, kind)
    drifted = replace(tables, tables=tuple(replace(t, access=AccessProfile(zipf=1.1))
                                           for t in tables.tables))
    rows = []
    print(f"{'budget GB':>9} {'replan ms':>10} {'moved GB':>9} {'proven':>6} {'wall s':>6}")
    for gb in BUDGETS_GB:
        start = time.perf_counter()
        result = replan(old, drifted, kind,
                        max_migrate_bytes=None if gb is None else int(gb * 1e9))
        wall = time.perf_counter() - start
        rows.append({"budget_gb": gb, "replan_ms": result.plan.solve.objective_ms,
                     "migrated_bytes": result.migrated_bytes, "optimal": result.optimal,
                     "stay_ms": result.stay.solve.objective_ms,
                     "fresh_ms": None if result.fresh is None else result.fresh.solve.objective_ms,
                     "fresh_migrated_bytes": result.fresh_migrated_bytes,
                     "wall_seconds": wall, "load_average_1min": os.getloadavg()[0]})
        print(f"{'none' if gb is None else gb:>9} {rows[-1]['replan_ms']:>10.5f} "
              f"{result.migrated_bytes / 1e9:>9.2f} {result.optimal!s:>6} {wall:>6.1f}",
              flush=True)
    values = [r["replan_ms"] for r in rows]
    monotone = all(b <= a for a, b in itertools.pairwise(values))
    print(f"non-increasing in the budget: {monotone}")
    out = ROOT / "bench" / "results" / "replan_monotone.json"
    out.write_text(json.dumps({
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "workload": "criteo_terabyte on 1 x 4 x 24 GB, batch 2048; re-planned with zipf 1.1 "
                    "on every table, default options and model",
        "old_objective_ms": old.solve.objective_ms, "non_increasing": monotone,
        "note": "shared machine: other processes ran meanwhile", "rows": rows}, indent=1) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
