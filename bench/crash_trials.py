"""Crash trials of training with cached tables: SIGKILLs of one rank or of every rank,
at named points of the checkpoint protocol and at random instants, in 1 and 2
processes; every relaunch (``--resume``) must resume from the step the run had
committed, and every run must end bit for bit where an uninterrupted run ends
(runtime checkpoint and every table-store array).

    .venv/bin/python bench/crash_trials.py [--trials 40] [--per-run 8] [--steps 8]
        [--every 1] [--seed 0] [--out bench/results/crash_trials.json]

``--trials`` kills that land (before the run ends) per process count, in runs of up
to ``--per-run`` kills each (the run is then relaunched until it completes and
compared). Named points: ``saved`` (rank 0's
runtime checkpoint written, stores not prepared), ``prepared`` (this rank's stores
prepared, no decision yet), ``decided`` (rank 0 wrote the decision record, stores not
committed), ``committed`` (this rank's stores committed, older checkpoints not yet
removed), at a checkpoint the run has still ahead. Random kills land uniformly over the
span of an uninterrupted run's training still ahead (checkpoints every ``--every``
steps, so many land inside a checkpoint). The survivors
of a one-rank kill are killed a moment later (0-50 ms), as torchrun stops them.
Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrm_runtime.checkpoint import FAULT_POINTS  # noqa: E402
from tests.dlrm_runtime import tiered_trials as trials  # noqa: E402


def _kills(rng: random.Random, count: int, world: int, span: float) -> list:
    out = []
    for _ in range(count):
        rank = rng.choice([*range(world), None])
        if rng.random() < 0.5:  # at a checkpoint still ahead (see trials.chain)
            out.append(trials.Kill(point=rng.choice(FAULT_POINTS), step=None, rank=rank))
        else:  # over the span still ahead
            out.append(trials.Kill(after_s=rng.uniform(0.0, span), step=-1, rank=rank))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40, help="kills per process count")
    parser.add_argument("--per-run", type=int, default=8, help="kills per run before it "
                                                               "is let to complete")
    parser.add_argument("--steps", type=int, default=8, help="steps of every run")
    parser.add_argument("--every", type=int, default=1, help="steps between checkpoints")
    parser.add_argument("--worlds", default="1,2", help="process counts to try")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "crash_trials.json"),
                        help="JSON results file")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="crash-trials-"))
    results = []
    try:
        for world in (int(w) for w in args.worlds.split(",")):
            reference = work / f"reference-{world}"
            span = trials.reference(reference, args.steps, args.every, world)
            done = 0
            run = 0
            while done < args.trials:  # kills that landed (the run had not ended yet)
                count = min(args.per_run, args.trials - done)
                kills = _kills(rng, count, world, span)
                out = work / f"run-{world}-{run}"
                began = time.monotonic()
                error = None
                try:
                    launches = trials.chain(out, kills, args.steps, args.every, world, rng)
                    differ = trials.differences(reference, out)
                except (AssertionError, RuntimeError, TimeoutError) as exc:
                    launches, differ, error = [], [], f"{type(exc).__name__}: {exc}"
                passed = error is None and not differ
                for i, kill in enumerate(kills):
                    after = launches[i] if i < len(launches) else None
                    if after is None or after.kill is None:
                        break  # the run completed before this kill was used
                    results.append({
                        "world": world, "run": run, "kill": kill.describe(),
                        "point": kill.point, "rank": kill.rank,
                        "killed": bool(after and after.killed),
                        "committed_before": after.committed_before if after else None,
                        "passed": passed})
                landed_here = sum(1 for r in results if r["world"] == world
                                  and r["run"] == run and r["killed"])
                print(f"{world} process(es), run {run}: {landed_here} of {count} kills landed, "
                      f"{len(launches)} launches, {time.monotonic() - began:.1f} s: "
                      f"{'passed' if passed else 'FAILED ' + (error or str(differ[:3]))}",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
                done += max(1, landed_here)  # at least 1: the loop always ends
                run += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = [r for r in results if r["killed"]]  # a trial: a kill that landed
    passed = sum(r["passed"] for r in results)
    summary = {"trials": len(results), "passed": passed,
               "by_point": {p: sum(r["point"] == p for r in results) for p in FAULT_POINTS},
               "random_instants": sum(r["point"] is None for r in results)}
    doc = {"benchmark": "crash_trials", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "settings": vars(args), "summary": summary, "trials": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{passed} of {len(results)} trials (kills that landed) passed; written to "
          f"{args.out}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
