"""Criteo TSV parsing: today's reader (Arrow's CSV reader) against the hand-written
numpy parser it replaced, interleaved in one run, and a check that both build the same
cache.

1. Writes a synthetic Criteo-format TSV (``bench/profiling.py``'s generator: Zipf
   categorical values over the Kaggle cardinalities as 8-digit hex, a few percent
   missing values, some negative integers) of ``--lines`` lines, with ``--malformed``
   malformed lines spread through it, in a temporary directory.
2. Loads the previous parser from git (``--old-rev``, ``dlrm_runtime/criteo.py`` at
   that revision) as a separate module.
3. Parses the file ``--rounds`` times with each, alternating which goes first, and
   reports lines/s (wall clock and per second of process CPU time, the latter steadier
   on a shared machine), the medians and their ratio.
4. Builds the binary cache with each and checks that the records are byte for byte
   the same and that both count the same lines, samples and malformed lines.

    python bench/criteo_parse.py                       # 3 M lines (~750 MB), a few minutes
    python bench/criteo_parse.py --lines 300000 --rounds 2   # quick

Writes ``bench/results/criteo_parse.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.profiling import KAGGLE_CARDINALITIES, write_synthetic_tsv  # noqa: E402
from dlrm_runtime.data import criteo  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "criteo_parse.json"
TARGET_LINES_PER_S = 1_000_000
OLD_REV = "7919e50"
"""The last revision with the hand-written numpy parser."""
MALFORMED = (b"1\t2\t3\n", b"1\t" + b"\t".join([b"0x1f"] * 13) + b"\t" * 26 + b"\n",
             b"7" + b"\t" * 39 + b"\n", b"0\t" + b"1" * 40 + b"\t" * 38 + b"\n")
"""Malformed lines: too few fields, ``0x`` integers, a bad label, a 40-digit integer
(which the old parser accepted: the bench counts it as malformed only for the new one)."""


def load_old_parser(rev: str, workdir: Path) -> ModuleType:
    """``dlrm_runtime/criteo.py`` at git revision ``rev``, imported as ``criteo_old``."""
    source = subprocess.run(["git", "show", f"{rev}:dlrm_runtime/criteo.py"], cwd=ROOT,
                            check=True, capture_output=True).stdout
    path = workdir / "criteo_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("criteo_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["criteo_old"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_input(path: Path, lines: int, malformed: int) -> None:
    """``lines`` synthetic lines with ``malformed`` of :data:`MALFORMED` spread evenly."""
    segments = malformed + 1
    with open(path, "wb") as out:
        for i in range(segments):
            part = path.with_suffix(f".{i}")
            write_synthetic_tsv(part, lines // segments + (i < lines % segments), seed=i)
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            part.unlink()
            if i < malformed:
                out.write(MALFORMED[i % len(MALFORMED)])


def parse_once(module: ModuleType, path: Path, workers: int, chunk_bytes: int) -> dict[str, Any]:
    reader = module.CriteoReader(path, KAGGLE_CARDINALITIES, workers=workers,
                                 chunk_bytes=chunk_bytes)
    wall, cpu = time.perf_counter(), time.process_time()
    samples = sum(len(chunk) for chunk in reader)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report = reader.report()
    return {"lines": report.lines, "samples": samples, "malformed": report.malformed,
            "seconds": round(wall, 3), "lines_per_s": report.lines / wall,
            "lines_per_cpu_s": report.lines / cpu}


def same_cache(old: ModuleType, path: Path, workdir: Path, workers: int) -> dict[str, Any]:
    """Build the cache with both parsers; compare records and counts."""
    a = old.build_cache(path, workdir / "old.cache", KAGGLE_CARDINALITIES)
    b = criteo.build_cache(path, workdir / "new.cache", KAGGLE_CARDINALITIES, workers=workers)
    ha, hb = a.header, b.header
    # the old parser kept 40-digit integers; drop that line from its records to compare
    extra = ha.samples - hb.samples
    records_equal = False
    if extra >= 0:
        keep = np.ones(len(a), dtype=bool)
        if extra:
            dense = np.asarray(a.records["dense"])
            keep &= ~(dense > np.float32(43.7)).any(axis=1)  # above log(2**63)
        records_equal = bool(np.array_equal(np.asarray(a.records)[keep].view(np.uint8),
                                            np.asarray(b.records).view(np.uint8)))
    return {"records_identical": records_equal, "old": {"samples": ha.samples, "lines": ha.lines,
                                                        "malformed": ha.malformed},
            "new": {"samples": hb.samples, "lines": hb.lines, "malformed": hb.malformed},
            "old_kept_beyond_64_bit_lines": extra}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pyarrow

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": model, "cpus": os.cpu_count(), "numpy": np.__version__,
            "pyarrow": pyarrow.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=3_000_000, help="lines of the synthetic TSV")
    parser.add_argument("--malformed", type=int, default=8,
                        help="malformed lines spread through the file")
    parser.add_argument("--rounds", type=int, default=3, help="parses per parser, interleaved")
    parser.add_argument("--workers", type=int, default=criteo.default_workers(),
                        help="threads of the new reader (the old one runs with its default, 1)")
    parser.add_argument("--chunk-mb", type=float, default=criteo.DEFAULT_CHUNK_BYTES / 2 ** 20,
                        help="MiB of text per block (both parsers)")
    parser.add_argument("--old-rev", default=OLD_REV, help="git revision of the old parser")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temporary files go (a new temporary directory)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)

    chunk_bytes = int(args.chunk_mb * 2 ** 20)
    info = machine()
    info["load_average_1m_before"] = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="criteo_parse.", dir=args.workdir))
    try:
        old = load_old_parser(args.old_rev, workdir)
        tsv = workdir / "day.tsv"
        tick = time.perf_counter()
        write_input(tsv, args.lines, args.malformed)
        generate = time.perf_counter() - tick
        size = tsv.stat().st_size
        print(f"{args.lines:,} lines ({size / 1e6:.0f} MB) written in {generate:.1f} s",
              file=sys.stderr)
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for name in order:
                module, workers = (old, 1) if name == "old" else (criteo, args.workers)
                result = parse_once(module, tsv, workers, chunk_bytes)
                runs[name].append(result)
                print(f"round {r + 1} {name}: {result['lines_per_s']:,.0f} lines/s "
                      f"({result['lines_per_cpu_s']:,.0f} per CPU-s)", file=sys.stderr)
        check = same_cache(old, tsv, workdir, args.workers)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    summary = {name: {"lines_per_s": round(median(name, "lines_per_s")),
                      "lines_per_cpu_s": round(median(name, "lines_per_cpu_s")),
                      "best_lines_per_s": round(max(run["lines_per_s"] for run in runs[name]))}
               for name in runs}
    ratio = summary["new"]["lines_per_s"] / summary["old"]["lines_per_s"]
    ratio_cpu = summary["new"]["lines_per_cpu_s"] / summary["old"]["lines_per_cpu_s"]
    info["load_average_1m_after"] = os.getloadavg()[0]
    doc = {
        "command": " ".join(["python bench/criteo_parse.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": info,
        "note": ("the machine was shared with other processes (see the load averages); "
                 "wall-clock rates depend on that load, the ratio and the per-CPU-second "
                 "rates less so"),
        "config": {"lines": args.lines, "text_mb": round(size / 1e6, 1),
                   "malformed": args.malformed, "rounds": args.rounds,
                   "chunk_mb": args.chunk_mb, "threads": {"old": 1, "new": args.workers},
                   "old_rev": args.old_rev, "generate_seconds": round(generate, 1)},
        "old": {"parser": "hand-written numpy parser", **summary["old"], "runs": runs["old"]},
        "new": {"parser": "pyarrow.csv.read_csv per block + numpy", **summary["new"],
                "runs": runs["new"]},
        "ratio_new_over_old": round(ratio, 2),
        "ratio_per_cpu_s": round(ratio_cpu, 2),
        "target_lines_per_s": TARGET_LINES_PER_S,
        "target_met": summary["new"]["lines_per_s"] >= TARGET_LINES_PER_S,
        "same_cache": check,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"old {summary['old']['lines_per_s']:,} lines/s, new {summary['new']['lines_per_s']:,} "
          f"lines/s (x{ratio:.2f}; per CPU-s x{ratio_cpu:.2f}); target {TARGET_LINES_PER_S:,}: "
          f"{'met' if doc['target_met'] else 'not met'}; caches identical: "
          f"{check['records_identical']}; written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
