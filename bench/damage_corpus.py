"""Damage corpus: a training run with cached tables is killed inside its checkpoint
protocol, one file of its table store is damaged, and the run is resumed. Every case
must either be refused in one line (a store error or checkpoint error, nothing
trained) or end bit for bit where an uninterrupted run ends; a case that trains to
other weights is a failure.

    .venv/bin/python bench/damage_corpus.py [--points saved,prepared,decided,committed]
        [--steps 8] [--every 2] [--at 4] [--out bench/results/damage_corpus.json]

Kills: ``DLRM_CRASH_AT=<point>:<at>`` (see :mod:`dlrm_runtime.checkpoint`), one process.
Damages of ``store/device-0`` (the store of the cached table ``t1`` and of the DRAM
shard of ``t2``): each redo segment of ``t1`` deleted, truncated at several offsets,
one bit flipped in its header and its slots, its generation changed, replaced by
another store's; the whole ``_txn/redo`` directory deleted; a committed chunk file
of ``t1`` with one flipped bit or truncated; the checkpoint marker with a flipped
digit or truncated; the block checksums file truncated.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrm_runtime import RuntimeErrorBase  # noqa: E402
from storage import StoreError  # noqa: E402
from tests.dlrm_runtime import tiered_trials as trials  # noqa: E402
from tests.dlrm_runtime import tiered_worker as worker  # noqa: E402

STORE = Path("store") / "device-0"
SEGMENT = STORE / "_txn" / "redo" / "t1@weight"
CHUNK = STORE / "t1" / "weight" / "c" / "0" / "0"
MARKER = STORE / "_txn" / "checkpoint.json"
SUMS = STORE / "_txn" / "sums.json"


def _flip(path: Path, at: Callable[[int], int], bit: int = 0x08) -> None:
    data = bytearray(path.read_bytes())
    data[at(len(data))] ^= bit
    path.write_bytes(bytes(data))


def _truncate(path: Path, at: Callable[[int], int]) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:at(len(data))])


def _other_store(out: Path, reference: Path) -> None:
    shutil.copy(reference / SEGMENT, out / SEGMENT)


def damages(reference: Path) -> dict[str, tuple[Path, Callable[[Path], None]]]:
    """name -> (file it needs, damage(run_dir))."""
    def on(rel: Path, fn: Callable[[Path], None]) -> tuple[Path, Callable[[Path], None]]:
        return rel, lambda out: fn(out / rel)
    cases = {
        "segment deleted": on(SEGMENT, lambda p: p.unlink()),
        "redo dir deleted": (SEGMENT.parent, lambda out: shutil.rmtree(out / SEGMENT.parent)),
        "segment other store": (SEGMENT, lambda out: _other_store(out, reference)),
        "segment other generation": on(SEGMENT, lambda p: _flip(p, lambda n: 20, 0x01)),
        "chunk bit flip": on(CHUNK, lambda p: _flip(p, lambda n: n // 3)),
        "chunk truncated": on(CHUNK, lambda p: _truncate(p, lambda n: n // 2)),
        "marker digit flipped": on(MARKER, lambda p: p.write_bytes(
            p.read_bytes().replace(b'"generation": ', b'"generation": 1'))),
        "marker truncated": on(MARKER, lambda p: _truncate(p, lambda n: n // 2)),
        "checksums truncated": on(SUMS, lambda p: _truncate(p, lambda n: n // 2)),
    }
    for offset in (0, 100, 255, 256, 300):
        cases[f"segment truncated at {offset}"] = on(
            SEGMENT, lambda p, o=offset: _truncate(p, lambda n: min(o, n)))
    cases["segment truncated to half"] = on(SEGMENT, lambda p: _truncate(p, lambda n: n // 2))
    cases["segment truncated by 1"] = on(SEGMENT, lambda p: _truncate(p, lambda n: n - 1))
    for offset, where in ((0, "magic"), (8, "store id"), (30, "key"), (270, "first slot"),
                          (-1, "last byte")):
        cases[f"segment bit flip in {where}"] = on(
            SEGMENT, lambda p, o=offset: _flip(p, lambda n: o % n))
    return cases


def _resume(out: Path, steps: int, every: int) -> tuple[str, str]:
    """Resume the run in this process: ("refused", message) or ("completed", "")."""
    try:
        worker.run(out, steps, every=every, resume=True)
    except (StoreError, RuntimeErrorBase) as exc:
        return "refused", str(exc)
    return "completed", ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="saved,prepared,decided,committed")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--at", type=int, default=4, help="checkpoint step of the kill")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "damage_corpus.json"))
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="damage-corpus-"))
    results = []
    try:
        trials.warm_imports()
        reference = work / "reference"
        trials.reference(reference, args.steps, args.every, 1)
        # a store of another run whose redo segment exists: killed before a checkpoint
        other = work / "other"
        other.mkdir()
        trials.launch(other, args.steps, args.every, 1,
                      trials.Kill(point="saved", step=args.at, rank=None), rng)
        for point in args.points.split(","):
            for name, (needs, damage) in damages(other).items():
                out = work / "run"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                began = time.monotonic()
                killed = trials.launch(out, args.steps, args.every, 1,
                                       trials.Kill(point=point, step=args.at, rank=None), rng)
                if not (out / needs).exists():
                    results.append({"point": point, "damage": name, "outcome": "not applicable",
                                    "detail": f"{needs} absent after the kill"})
                    continue
                damage(out)
                outcome, message = _resume(out, args.steps, args.every)
                if outcome == "completed":
                    differ = trials.differences(reference, out)
                    outcome = "bit-exact" if not differ else "WRONG"
                    message = "; ".join(differ[:3])
                elif "\n" in message:
                    outcome = "refused, not one line"
                results.append({"point": point, "damage": name, "killed": killed.killed,
                                "outcome": outcome, "detail": message,
                                "seconds": round(time.monotonic() - began, 2)})
                print(f"{point:9s} {name:30s} {outcome}: {message[:150]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    bad = sum(n for k, n in counts.items() if k not in ("bit-exact", "refused",
                                                         "not applicable"))
    doc = {"benchmark": "damage_corpus",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "loadavg": os.getloadavg()},
           "settings": vars(args), "counts": counts, "failures": bad, "cases": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{counts}; written to {args.out}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
