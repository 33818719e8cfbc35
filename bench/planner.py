"""Planner benchmark: the ILP planner, with default options, against the greedy
baselines on every workload.

    .venv/bin/python bench/planner.py                          # all workloads, label "after"
    .venv/bin/python bench/planner.py --label before           # record a reference run
    .venv/bin/python bench/planner.py --only gen800_128x80 --time-limit 10
    .venv/bin/python bench/planner.py --compare                # print before vs after only
    .venv/bin/python bench/planner.py --compare main after     # any two labelled runs

Prints a table and stores the run under its label in bench/results/planner.json
(other labels' runs are kept, so a "before" and an "after" run sit side by side;
``--compare`` prints them per workload). Every plan is costed by the same (default
analytic) cost model; ``ratio`` is the best baseline's slowest-device time over the
ILP plan's (above 1: the ILP plan is faster) and ``better`` the ILP plan's saving,
1 - ILP / best baseline. ``stop`` is why the planner stopped (``gap reached``,
``stalled``, ``time limit``, ``optimal``; absent in runs of planners that did not
report it). Baselines that cannot place every table (their rule: whole tables, in
HBM or a 20 % cache over DRAM) are reported as infeasible, as on
``criteo_terabyte_4x4``; ``criteo_terabyte_4x24`` is memory-constrained too (the
tables exceed the total HBM) with feasible baselines. ``memory_bound`` marks the
workloads whose tables do not fit the total usable HBM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import workloads  # noqa: E402
from planner import BASELINES, InfeasibleError, PlanOptions, plan  # noqa: E402

TARGET_WALL_S = 5.0
"""Issue 16: every workload planned with default options in at most 5 s."""


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def run(name: str, options: PlanOptions) -> dict:
    tables, topology = workloads()[name]
    start = time.perf_counter()
    result = plan(tables, topology, options=options)
    wall = time.perf_counter() - start
    baselines = {}
    for baseline in BASELINES:
        try:
            p = plan(tables, topology, options=PlanOptions(baseline=baseline))
            baselines[baseline] = p.solve.objective_ms
        except InfeasibleError:
            baselines[baseline] = None
    feasible = [v for v in baselines.values() if v is not None]
    best = min(feasible) if feasible else None
    kinds: dict[str, int] = {}
    for t in result.tables:
        key = f"{t.sharding.value}/{t.shards[0].tier.value}"
        kinds[key] = kinds.get(key, 0) + 1
    solve = result.solve
    bound = solve.lower_bound_ms
    return {
        "workload": name,
        "tables": len(tables.tables),
        "devices": topology.world_size,
        "time_limit_s": options.time_limit_s,
        "ilp_objective_ms": solve.objective_ms,
        "lower_bound_ms": _finite(bound),
        "gap": _finite(solve.gap),
        "stop_reason": getattr(getattr(solve, "stop_reason", None), "value", None),
        "solve_seconds": solve.solve_seconds,
        "wall_seconds": wall,
        "baselines_ms": baselines,
        "best_baseline_ms": best,
        "best_baseline_over_ilp": best / solve.objective_ms if best else None,
        "ilp_better_by": 1 - solve.objective_ms / best if best else None,
        "memory_bound": sum(t.weight_bytes for t in tables.tables)
        > topology.usable_hbm_bytes * topology.world_size,
        "choices": kinds,
    }


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def compare(doc: dict, first: str = "before", second: str = "after") -> str:
    """Per workload: objective, bound, gap, wall and stop reason of two labelled runs."""
    runs = doc.get("runs", {})
    if first not in runs or second not in runs:
        return f"no {first!r} and {second!r} runs to compare (have {sorted(runs)})"
    a = {r["workload"]: r for r in runs[first]["rows"]}
    b = {r["workload"]: r for r in runs[second]["rows"]}
    lines = [f"{'workload':<22} {'objective ms':>25} {'bound ms':>25} {'gap':>17} "
             f"{'wall s':>15}  stop ({second})",
             f"{'':<22} {first:>12} {second:>12} {first:>12} {second:>12} {first:>8} {second:>8} "
             f"{first:>7} {second:>7}"]
    for name in a:
        if name not in b:
            continue
        x, y = a[name], b[name]
        lines.append(
            f"{name:<22} {x['ilp_objective_ms']:>12.5g} {y['ilp_objective_ms']:>12.5g} "
            f"{x['lower_bound_ms'] or 0:>12.5g} {y['lower_bound_ms'] or 0:>12.5g} "
            f"{_pct(x['gap']):>8} {_pct(y['gap']):>8} {x['wall_seconds']:>7.1f} "
            f"{y['wall_seconds']:>7.1f}  {y.get('stop_reason') or ''}"
            f"{'' if y['ilp_objective_ms'] <= x['ilp_objective_ms'] * (1 + 1e-9) else '  (objective worse)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="workload names (default: all)")
    parser.add_argument("--time-limit", type=float,
                        help="planning budget in s (default: PlanOptions' default)")
    parser.add_argument("--label", default="after",
                        help="name of this run in the results file (default: %(default)s)")
    parser.add_argument("--compare", nargs="*", metavar="LABEL",
                        help="only print two runs of the results file side by side (default: "
                             "before after)")
    parser.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "planner.json"))
    args = parser.parse_args(argv)
    out = Path(args.output)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.setdefault("runs", {})
    doc.pop("rows", None)  # the format before runs were labelled
    if args.compare is not None:
        print(compare(doc, *(args.compare or ("before", "after"))[:2]))
        return 0
    commit = _commit()
    options = PlanOptions()
    if args.time_limit is not None:
        options = replace(options, time_limit_s=args.time_limit)
    names = args.only or list(workloads())
    rows = []
    print(f"{'workload':<22} {'tables':>6} {'dev':>5} {'ILP ms':>10} {'bound ms':>10} {'gap':>7} "
          f"{'wall s':>7} {'stop':<11} {'best baseline':>14} {'ratio':>6} {'better':>7}")
    load_before = os.getloadavg()[0]
    for name in names:
        row = run(name, options)
        rows.append(row)
        best = row["best_baseline_ms"]
        print(f"{name:<22} {row['tables']:>6} {row['devices']:>5} {row['ilp_objective_ms']:>10.4f} "
              f"{row['lower_bound_ms'] or 0:>10.4f} {_pct(row['gap']):>7} {row['wall_seconds']:>7.1f} "
              f"{row['stop_reason'] or '':<11} "
              f"{best if best is None else round(best, 4)!s:>14} "
              f"{'' if best is None else format(row['best_baseline_over_ilp'], '.3f'):>6} "
              f"{'' if best is None else format(row['ilp_better_by'], '.1%'):>7}"
              f"{' (memory-bound)' if row['memory_bound'] else ''}",
              flush=True)
    slow = [r["workload"] for r in rows if r["wall_seconds"] > TARGET_WALL_S]
    print(f"target: every workload in <= {TARGET_WALL_S:g} s wall: "
          + ("met" if not slow else f"not met ({', '.join(slow)})"))
    doc["machine"] = platform.platform()
    doc["cpus"] = os.cpu_count()
    doc["runs"][args.label] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "options": {"time_limit_s": options.time_limit_s,
                    "gap": getattr(options, "gap", None),
                    "stall_s": getattr(options, "stall_s", None)},
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    print(f"written {out}")
    print(compare(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
