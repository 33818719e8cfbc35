"""Predicted vs measured step time: does the calibrated cost model tell the truth here?

    .venv/bin/python bench/prediction.py [--steps 300] [--threads 1] [--repeats 1]
        [--workloads demo,criteo26]

1. ``dlrm-plan calibrate --threads T`` measures this machine (gather, copy, store and
   dense rates) once; each workload's topology takes those rates (its device count,
   memory and batch stay).
2. For each workload, several plans are written with ``dlrm-plan``: the ILP plan, the
   baselines, and plans forced onto other shardings and tiers (which cost really
   different amounts), all under the calibrated topology.
3. Each plan is trained with ``dlrm-run --threads T --metrics-log`` in its own process
   (synthetic clicks, batch = the plan's global batch); its ``timing`` record holds the
   measured time per step by phase and the plan's prediction for the same process.
   With ``--repeats N`` every plan runs N times, in rounds over all plans (this
   machine's speed drifts by tens of percent within minutes); the run with the median
   step time stands for the plan.

Reported per plan: measured and predicted ms/step and their error (target: within 25 %),
embedding memory measured vs predicted (predicted never below), and per workload whether
measured and predicted rank the plans the same way (pairs whose predictions differ by
less than 5 % count as ties and are not ranked). A plan the runtime cannot execute is
listed with the reason. Writes ``bench/results/prediction.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


BIN = Path(sys.executable).parent
TIE = 0.05
"""Relative difference of two predictions below which the plans are not ranked."""


@dataclass(frozen=True, slots=True)
class Workload:
    tables: dict
    devices: int
    hbm_gb: float
    batch_per_device: int
    bottom: str
    top: str


def _criteo26() -> dict:
    """26 Criteo-like tables (1k..1M rows, dim 16, one id per lookup, Zipf 1.05)."""
    rows = [int(10 ** (3 + 3 * i / 25)) for i in range(26)]
    return {"tables": [{"name": f"c{i}", "num_embeddings": r, "embedding_dim": 16,
                        "pooling_factor": 1.0, "access": {"zipf": 1.05}}
                       for i, r in enumerate(rows)]}


def workloads() -> dict[str, Workload]:
    demo = json.loads((ROOT / "examples/demo/tables.json").read_text())
    return {
        "demo": Workload(demo, 4, 0.016, 1024, "64,16", "64,1"),
        "criteo26": Workload(_criteo26(), 4, 0.05, 1024, "256,64,16", "256,64,1"),
    }


PLANS = {
    "ilp": [],
    "size": ["--baseline", "size"],
    "greedy": ["--baseline", "greedy"],
    "random": ["--baseline", "random"],
    "row_wise": ["--sharding", "row_wise"],
    "dram_cache": ["--tiers", "dram_cache", "--cache-fractions", "0.05"],
    "store_cache": ["--tiers", "store_cache", "--cache-fractions", "0.05"],
}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def calibrate(threads: int, work: Path) -> dict:
    out = work / "calibrated.json"
    done = _run([str(BIN / "dlrm-plan"), "calibrate", "--threads", str(threads), "--no-network",
                 "--store-dir", str(work), "-o", str(out)])
    if done.returncode:
        raise SystemExit(f"calibrate failed: {done.stderr}")
    return json.loads(out.read_text())


def topology_for(w: Workload, calibrated: dict) -> dict:
    doc = json.loads(json.dumps(calibrated))
    doc["devices_per_host"] = w.devices
    doc["device"]["hbm_gb"] = w.hbm_gb
    doc["batch_size_per_device"] = w.batch_per_device
    doc["reserved_hbm_gb"] = 0.0
    return doc


def make_plan(name: str, plan_args: list[str], work: Path) -> Path | str:
    """The plan file, or why ``dlrm-plan`` could not write it."""
    plan = work / f"{name}.plan.json"
    made = _run([str(BIN / "dlrm-plan"), "--tables", str(work / "tables.json"), "--topology",
                 str(work / "topology.json"), "-o", str(plan), "--time-limit", "20", "-q",
                 *plan_args])
    if made.returncode:
        return f"dlrm-plan: {made.stderr.strip().splitlines()[-1]}"
    return plan


def run_plan(plan: Path, w: Workload, work: Path, steps: int, threads: int,
             attempt: int) -> dict | str:
    """The last timing record of one ``dlrm-run`` of ``plan`` (a fresh store for
    cached tiers), or why it failed."""
    log = work / f"{plan.stem}.{attempt}.jsonl"
    store = work / f"{plan.stem}.{attempt}.store"
    tiers = {s["tier"] for t in json.loads(plan.read_text())["tables"] for s in t["shards"]}
    cached = ["--store-dir", str(store)] if tiers != {"hbm"} else []
    ran = _run([str(BIN / "dlrm-run"), "--plan", str(plan), "--steps", str(steps),
                "--threads", str(threads), "--no-progress", "--eval-batches", "1",
                "--bottom-mlp", w.bottom, "--top-mlp", w.top, "--metrics-log", str(log),
                *cached])
    if ran.returncode:
        return f"dlrm-run: {ran.stderr.strip().splitlines()[-1]}"
    return [json.loads(line) for line in log.read_text().splitlines()
            if '"timing"' in line][-1]


def summarize(name: str, records: list[dict]) -> dict:
    """The run with the median step time stands for the plan; every run's step time
    is kept."""
    records = sorted(records, key=lambda r: r["measured"]["step_ms"])
    record = records[(len(records) - 1) // 2]
    measured, predicted = record["measured"], record["predicted"]
    error = (measured["step_ms"] - predicted["step_ms"]) / predicted["step_ms"]
    planned_bytes = predicted["hbm_bytes"] + predicted["dram_bytes"]
    return {"plan": name, "measured": measured, "predicted": predicted,
            "runs_step_ms": [r["measured"]["step_ms"] for r in records],
            "step_error": error, "within_25pct": abs(error) <= 0.25,
            "memory_ok": max(r["measured"]["embedding_bytes"] for r in records) <= planned_bytes}


def ranking(results: list[dict]) -> dict:
    """Pairs of plans whose predictions differ by more than TIE: how many the
    measurement orders the same way."""
    ok = [r for r in results if "error" not in r]
    agree = total = 0
    disagree = []
    for i, a in enumerate(ok):
        for b in ok[i + 1:]:
            pa, pb = a["predicted"]["step_ms"], b["predicted"]["step_ms"]
            if abs(pa - pb) <= TIE * min(pa, pb):
                continue
            total += 1
            if (pa < pb) == (a["measured"]["step_ms"] < b["measured"]["step_ms"]):
                agree += 1
            else:
                disagree.append([a["plan"], b["plan"]])
    return {"ranked_pairs": total, "same_order": agree, "disagree": disagree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per plan, in rounds over all plans; the median stands")
    parser.add_argument("--workloads", default=",".join(workloads()))
    parser.add_argument("--plans", default=",".join(PLANS))
    parser.add_argument("--output", default=str(ROOT / "bench/results/prediction.json"))
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    chosen = {k: v for k, v in workloads().items() if k in args.workloads.split(",")}
    report: dict = {"machine": f"{platform.node()}, {platform.processor() or platform.machine()}",
                    "steps": args.steps, "threads": args.threads, "repeats": args.repeats,
                    "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        calibrated = calibrate(args.threads, Path(tmp))
        report["calibration"] = {k: calibrated[k] for k in ("device", "host", "store")}
        print(f"calibrated: {json.dumps(report['calibration'])}")
        plans: dict[tuple[str, str], Path | str] = {}
        for wname, w in chosen.items():
            work = Path(tmp) / wname
            work.mkdir()
            (work / "tables.json").write_text(json.dumps(w.tables))
            (work / "topology.json").write_text(json.dumps(topology_for(w, calibrated)))
            for pname in args.plans.split(","):
                plans[(wname, pname)] = make_plan(pname, PLANS[pname], work)
        runs: dict[tuple[str, str], list[dict]] = {key: [] for key in plans}
        failed: dict[tuple[str, str], str] = {k: v for k, v in plans.items() if isinstance(v, str)}
        for attempt in range(args.repeats):  # rounds: a drift of speed hits every plan alike
            for (wname, pname), plan in plans.items():
                if (wname, pname) in failed or isinstance(plan, str):
                    continue
                got = run_plan(plan, chosen[wname], Path(tmp) / wname, args.steps,
                               args.threads, attempt)
                if isinstance(got, str):
                    failed[(wname, pname)] = got
                    continue
                runs[(wname, pname)].append(got)
                print(f"  round {attempt + 1}: {wname} {pname} "
                      f"{got['measured']['step_ms']:.1f} ms", flush=True)
        for wname in chosen:
            results = [{"plan": p, "error": failed[(w, p)]} if (w, p) in failed
                       else summarize(p, runs[(w, p)]) for (w, p) in plans if w == wname]
            for result in results:
                _print(wname, result)
            order = ranking(results)
            print(f"{wname}: {order['same_order']}/{order['ranked_pairs']} ranked pairs in the "
                  f"same order; disagree: {order['disagree']}")
            report["workloads"][wname] = {"results": results, "ranking": order}
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"written to {args.output}")


def _print(workload: str, r: dict) -> None:
    if "error" in r:
        print(f"{workload:>9} {r['plan']:>12}: not run: {r['error']}")
        return
    m, p = r["measured"], r["predicted"]
    print(f"{workload:>9} {r['plan']:>12}: step {m['step_ms']:8.3f} ms measured, "
          f"{p['step_ms']:8.3f} predicted ({r['step_error']:+.0%}); lookup {m['lookup_ms']:.3f}/"
          f"{p['lookup_ms']:.3f}, update {m['update_ms']:.3f}/{p['update_ms']:.3f}, dense "
          f"{m['dense_ms']:.3f}/{p['dense_ms']:.3f}; memory {m['embedding_bytes'] / 1e6:.1f}/"
          f"{(p['hbm_bytes'] + p['dram_bytes']) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
