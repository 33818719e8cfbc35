"""Hit rates of the row-cache policies on Zipf traces (``storage.replay``).

For each Zipf exponent and cache size this replays one trace through LRU, LFU,
the profile-warmed LFU (profile = counts of a *different* sample of the same
distribution), the lookahead policy (the next K batches visible), the lookahead
policy with the same profile, and reports the references:

- static top-k: a cache pinned to the truly hottest rows of the generating
  distribution, replayed on this trace (the issue's definition and its ceiling for
  a policy without knowledge of future batches);
- the trace's own top-k (an oracle that knows the trace's counts: shown, not a target);
- Belady's offline MIN (cold start, as in the issue's table).

Checks, per row: profile >= static top-k - 1 pp, and whether the lookahead policies
close >= 50 % of the gap from static top-k to Belady (when that gap is positive).

    python bench/storage_hitrate.py                # 200k rows, 1M accesses, ~3 min
    python bench/storage_hitrate.py --profile-accesses 1000000 --lookahead-batches 4
    python bench/storage_hitrate.py --rows 20000 --accesses 100000 --jobs 1

Writes ``bench/results/storage_hitrate.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(ROOT))

from storage import belady_hit_rate, replay, static_topk_hit_rate  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "storage_hitrate.json"
POLICY_COLUMNS = ("lru", "lfu", "profile", "lookahead", "lookahead+profile", "belady")


@dataclass(frozen=True, slots=True)
class Workload:
    """What one trace is generated from."""

    rows: int
    accesses: int
    profile_accesses: int
    exponent: float
    seed: int


@dataclass(frozen=True, slots=True)
class Task:
    """One policy on one trace and one cache size (the unit of parallel work)."""

    workload: Workload
    cache_rows: int
    policy: str
    lookahead: int


def zipf_probabilities(rows: int, exponent: float) -> np.ndarray:
    """P(rank k) proportional to (k+1)^-exponent, k = 0..rows-1, hottest first."""
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


@functools.lru_cache(maxsize=2)
def traces(workload: Workload) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(trace, profile, hottest)``: Zipf ids (ranks sampled by inverse CDF, mapped
    through a random permutation of the rows), the per-row counts of a second,
    independent sample of the same distribution, and the rows hottest first."""
    rng = np.random.default_rng([workload.seed, round(workload.exponent * 1000)])
    permutation = rng.permutation(workload.rows)
    cdf = np.cumsum(zipf_probabilities(workload.rows, workload.exponent))

    def sample(size: int) -> np.ndarray:
        ranks = np.searchsorted(cdf, rng.random(size), side="right")
        return permutation[np.minimum(ranks, workload.rows - 1)]

    trace = sample(workload.accesses)
    profile = np.bincount(sample(workload.profile_accesses), minlength=workload.rows)
    return trace, profile, permutation


def run_task(task: Task) -> tuple[Task, float, float]:
    """``(task, hit rate, seconds)``."""
    trace, profile, _ = traces(task.workload)
    rows = task.workload.rows
    start = time.perf_counter()
    if task.policy == "belady":
        rate = belady_hit_rate(trace, rows, task.cache_rows)
    else:
        policy, _, warm = task.policy.partition("+")
        rate = replay(trace, num_rows=rows, cache_rows=task.cache_rows, policy=policy,
                      profile=profile if (policy == "profile" or warm) else None,
                      lookahead=task.lookahead if policy == "lookahead" else 0).hit_rate
    return task, rate, time.perf_counter() - start


def gap_closed(rate: float, static: float, belady: float) -> float | None:
    """Share of the gap static top-k -> Belady that ``rate`` closes; None if no gap."""
    return (rate - static) / (belady - static) if belady > static else None


def verdict(share: float | None) -> str:
    """Table cell for a gap-closing check."""
    if share is None:
        return "n/a (no gap)"
    return f"{'yes' if share >= 0.5 else 'NO'} {100 * share:4.0f}%"


def evaluate(w: Workload, frac: float, size: int,
             done: dict[tuple[Workload, int, str], tuple[float, float]]) -> dict[str, Any]:
    """One result row: hit rates, references, checks and replay seconds."""
    trace, _, hottest = traces(w)
    rates = {p: done[(w, size, p)][0] for p in POLICY_COLUMNS}
    static = float(np.isin(trace, hottest[:size]).mean())
    oracle = static_topk_hit_rate(trace, w.rows, size)
    closed = {p: gap_closed(rates[p], static, rates["belady"])
              for p in ("lookahead", "lookahead+profile")}
    checks = {
        "profile_within_1pp_of_static_topk": rates["profile"] - static >= -0.01,
        "lookahead_closes_half_gap":
            None if closed["lookahead"] is None else closed["lookahead"] >= 0.5,
        "lookahead_profile_closes_half_gap":
            None if closed["lookahead+profile"] is None else closed["lookahead+profile"] >= 0.5,
    }
    return {"exponent": w.exponent, "cache_fraction": frac, "cache_rows": size,
            "hit_rate": rates, "static_topk": static, "trace_topk": oracle,
            "gap_closed": closed, "checks": checks,
            "seconds": {p: round(done[(w, size, p)][1], 2) for p in POLICY_COLUMNS}}


def format_row(row: dict[str, Any]) -> str:
    """One line of the printed table (hit rates in %)."""
    pct = {p: 100 * r for p, r in row["hit_rate"].items()}
    margin = pct["profile"] - 100 * row["static_topk"]
    ok = "yes" if row["checks"]["profile_within_1pp_of_static_topk"] else "NO"
    return (f"{row['exponent']:5.2f} {100 * row['cache_fraction']:4.0f}% {row['cache_rows']:>7} "
            f"{pct['lru']:6.2f} {pct['lfu']:6.2f} {pct['profile']:6.2f} {pct['lookahead']:6.2f} "
            f"{pct['lookahead+profile']:6.2f} {100 * row['static_topk']:6.2f} "
            f"{100 * row['trace_topk']:6.2f} {pct['belady']:6.2f} | {ok:>4} "
            f"{margin:+5.2f}pp {verdict(row['gap_closed']['lookahead']):>12} "
            f"{verdict(row['gap_closed']['lookahead+profile']):>13}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="table rows (default 200000)")
    parser.add_argument("--accesses", type=int, default=1_000_000,
                        help="trace length (default 1000000)")
    parser.add_argument("--profile-accesses", type=int, default=None,
                        help="size of the profile's sample (default 3 x --accesses: at 1M, rows at "
                             "the 20 %% edge are seen about once and cannot be ranked)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.8, 1.05, 1.2])
    parser.add_argument("--cache-fractions", type=float, nargs="+", default=[0.01, 0.05, 0.2],
                        help="cache sizes as fractions of --rows")
    parser.add_argument("--lookahead-batches", type=int, default=32,
                        help="K: batches the lookahead policy sees (default 32)")
    parser.add_argument("--batch-size", type=int, default=4096, help="ids per batch")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.accesses < 1 or args.lookahead_batches < 1 or args.batch_size < 1:
        parser.error("--rows, --accesses, --lookahead-batches and --batch-size must be >= 1")
    if not all(0 < f <= 1 for f in args.cache_fractions):
        parser.error("--cache-fractions must be in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    lookahead = args.lookahead_batches * args.batch_size
    workloads = [Workload(args.rows, args.accesses, args.profile_accesses or 3 * args.accesses,
                          e, args.seed) for e in args.exponents]
    sizes = [max(1, round(f * args.rows)) for f in args.cache_fractions]
    tasks = [Task(w, c, p, lookahead) for w in workloads for c in sizes for p in POLICY_COLUMNS]
    # longest first (small caches miss more), so the workers finish together
    tasks.sort(key=lambda t: t.cache_rows)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = {(t.workload, t.cache_rows, t.policy): (rate, secs)
                for t, rate, secs in pool.map(run_task, tasks)}

    print(f"Zipf traces: {args.rows} rows, {args.accesses} accesses, profile from another "
          f"sample of {workloads[0].profile_accesses}, lookahead {args.lookahead_batches} x "
          f"{args.batch_size} = {lookahead} ids, seed {args.seed}. Hit rates in %.")
    header = (f"{'zipf':>5} {'cache':>13} {'LRU':>6} {'LFU':>6} {'prof':>6} {'look':>6} "
              f"{'look+p':>6} {'topk':>6} {'oracle':>6} {'MIN':>6} | {'prof>=topk-1':>13} "
              f"{'look closes':>12} {'look+p closes':>13}")
    print(header)
    print("-" * len(header))
    rows_out = []
    for w in workloads:
        for frac, size in zip(args.cache_fractions, sizes):
            row = evaluate(w, frac, size, done)
            rows_out.append(row)
            print(format_row(row))

    wall = time.perf_counter() - started
    policy_secs = {p: round(sum(r["seconds"][p] for r in rows_out), 1) for p in POLICY_COLUMNS}
    summary = {name: {"met": sum(r["checks"][name] is True for r in rows_out),
                      "missed": sum(r["checks"][name] is False for r in rows_out),
                      "not_applicable": sum(r["checks"][name] is None for r in rows_out)}
               for name in rows_out[0]["checks"]}
    print("topk = the truly hottest rows pinned (the reference); oracle = the trace's own "
          "top-k (storage.replay.static_topk_hit_rate); MIN = Belady (cold start).")
    for name, counts in summary.items():
        print(f"  {name}: met {counts['met']}, missed {counts['missed']}, "
              f"n/a {counts['not_applicable']}")
    print(f"replay seconds per policy (summed over rows): {policy_secs}")
    print(f"wall time {wall:.1f} s with {args.jobs} worker(s)")

    doc = {
        "benchmark": "storage_hitrate",
        "config": {"rows": args.rows, "accesses": args.accesses,
                   "profile_accesses": workloads[0].profile_accesses, "seed": args.seed,
                   "exponents": args.exponents, "cache_fractions": args.cache_fractions,
                   "lookahead_batches": args.lookahead_batches, "batch_size": args.batch_size,
                   "lookahead_ids": lookahead, "jobs": args.jobs},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "results": rows_out,
        "checks_summary": summary,
        "replay_seconds_per_policy": policy_secs,
        "wall_seconds": round(wall, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
