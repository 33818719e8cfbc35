"""Criteo reading and access profiling: parse + cache speed, then profiling speed.

1. Writes a synthetic Criteo-format TSV (label, 13 integers, 26 hex values; Zipf
   categorical values over the Kaggle data set's cardinalities, a few percent missing
   values, some negative integers) of ``--lines`` lines.
2. Parses it into the binary cache (``dlrm_runtime.data.criteo.build_cache``) and reports
   lines/s and MB/s, with one thread and with ``--workers`` threads; then reads every
   batch of the cache back (``CriteoClicks``, the second epoch's path): samples/s.
3. Counts row accesses of the 26 tables from the cache (``count_accesses``) and runs
   the whole ``profile_tables`` (counting + the profiles): samples/s (target
   >= 1 M samples/s for ``profile_tables``).

    python bench/profiling.py                   # 2 M lines (~500 MB of text), ~3-5 min
    python bench/profiling.py --lines 200000    # quick

Every rate is the median of ``--repeats`` runs (best beside it, and the rate per
second of process CPU time, steadier when other processes share the machine). Files
go to a temporary directory (``--workdir``) that is removed afterwards. Writes
``bench/results/profile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on sys.path, where this file would shadow the
# standard library's ``profile`` (which ``cProfile`` imports) and bench/planner.py the
# planner package: put the repository root there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dlrm_runtime.data.criteo import (
    NUM_DENSE,
    NUM_SPARSE,
    CriteoCache,
    CriteoClicks,
    build_cache,
    splitmix64,
)
from dlrm_runtime.data import ZipfSampler
from dlrm_runtime.data import count_accesses, profile_tables
from planner import TablesSpec, parse_tables

RESULTS = ROOT / "bench" / "results" / "profiling.json"
TARGET_PROFILE_SAMPLES_PER_S = 1_000_000
KAGGLE_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                        8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                        286181, 105, 142572)
"""Distinct values of C1..C26 in the Kaggle display-advertising data (DLRM's table sizes)."""
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def kaggle_tables(dim: int = 16) -> TablesSpec:
    return parse_tables({"tables": [
        {"name": f"C{i + 1}", "num_embeddings": n, "embedding_dim": dim, "pooling_factor": 1.0}
        for i, n in enumerate(KAGGLE_CARDINALITIES)]})


def write_synthetic_tsv(path: Path, lines: int, seed: int = 0, zipf: float = 1.1,
                        missing: float = 0.05, block: int = 200_000) -> None:
    """Criteo-format lines: categorical ranks Zipf(``zipf``) over each table's
    cardinality, hashed to 32-bit hex values; integers log-normal below 10**6 (I2
    negative in 5 % of lines); each categorical value missing with probability
    ``missing``, each integer with 4 times that."""
    rng = np.random.default_rng(seed)
    samplers = [ZipfSampler(n, zipf) for n in KAGGLE_CARDINALITIES]
    with open(path, "wb") as f:
        for lo in range(0, lines, block):
            n = min(block, lines - lo)
            labels = (rng.random(n) < 0.25).astype(np.int64)
            dense = np.floor(rng.lognormal(1.5, 1.8, (n, NUM_DENSE)))
            dense = np.minimum(dense, 999_999).astype(np.int64)
            dense_missing = rng.random((n, NUM_DENSE)) < 4 * missing
            negative = np.zeros((n, NUM_DENSE), dtype=bool)
            negative[:, 1] = rng.random(n) < 0.05
            ranks = np.stack([s.ranks(rng.random(n)) for s in samplers], axis=1).astype(np.uint64)
            values = splitmix64(ranks + (np.arange(NUM_SPARSE, dtype=np.uint64) << np.uint64(40)))
            values &= np.uint64(0xFFFFFFFF)
            cat_missing = rng.random((n, NUM_SPARSE)) < missing
            f.write(_format_lines(labels, dense, dense_missing, negative, values, cat_missing))


_FILL = 0xFF
"""Filler byte of the fixed-width layout, removed before writing."""


def _format_lines(labels: np.ndarray, dense: np.ndarray, dense_missing: np.ndarray,
                  negative: np.ndarray, values: np.ndarray, cat_missing: np.ndarray) -> bytes:
    """Tab-separated lines, built vectorised: every field is laid out at a fixed width
    padded with a filler byte, then the filler is dropped."""
    n = labels.shape[0]
    dense_w, hex_w = 7, 8  # '-' and 6 digits; 8 hex digits
    width = 2 + NUM_DENSE * (dense_w + 1) + NUM_SPARSE * (hex_w + 1)
    out = np.full((n, width), _FILL, dtype=np.uint8)
    out[:, 0] = ord("0") + labels
    out[:, 1] = ord("\t")
    col = 2
    powers = 10 ** np.arange(5, -1, -1, dtype=np.int64)  # 6 digits, most significant first
    for j in range(NUM_DENSE):
        v = dense[:, j]
        digits = (v[:, None] // powers) % 10
        shown = (v[:, None] >= powers) | (powers == 1)  # no leading zeros; 0 is "0"
        shown &= ~dense_missing[:, j, None]
        field = np.where(shown, ord("0") + digits, _FILL).astype(np.uint8)
        sign = np.where(negative[:, j] & ~dense_missing[:, j] & (v > 0), ord("-"), _FILL)
        out[:, col] = sign
        out[:, col + 1:col + dense_w] = field
        out[:, col + dense_w] = ord("\t")
        col += dense_w + 1
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    text = _HEX[((values[..., None] >> shifts) & np.uint64(15)).astype(np.int64)]  # [n, 26, 8]
    text[cat_missing] = _FILL
    for j in range(NUM_SPARSE):
        out[:, col:col + hex_w] = text[:, j]
        out[:, col + hex_w] = ord("\t") if j < NUM_SPARSE - 1 else ord("\n")
        col += hex_w + 1
    flat = out.ravel()
    return flat[flat != _FILL].tobytes()


def timed(fn: Callable[[], object], repeats: int, work: float) -> dict[str, Any]:
    """Rates (``work`` per second) over ``repeats`` runs of ``fn``: wall clock and
    process CPU time (the latter is steadier on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(work / (time.perf_counter() - t))
        cpu.append(work / max(time.process_time() - c, 1e-9))
    return {"median": statistics.median(wall), "best": max(wall), "runs": wall,
            "cpu_median": statistics.median(cpu)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="threads for the second parse row")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-profile-", dir=args.workdir))
    tables = kaggle_tables()
    try:
        tsv, cache_path = work / "train.tsv", work / "train.cache"
        t = time.perf_counter()
        write_synthetic_tsv(tsv, args.lines, zipf=args.zipf)
        gen_s = time.perf_counter() - t
        mb = tsv.stat().st_size / 1e6
        print(f"wrote {args.lines:,} lines ({mb:,.0f} MB) in {gen_s:.1f} s")

        parse = timed(lambda: build_cache(tsv, cache_path, tables), args.repeats, args.lines)
        parse_threads = timed(lambda: build_cache(tsv, cache_path, tables, workers=args.workers),
                              args.repeats, args.lines)
        cache = CriteoCache.open(cache_path)
        data = CriteoClicks(cache)
        batches = data.num_batches(args.batch_size)
        read = timed(lambda: [data.batch(i, args.batch_size) for i in range(batches)],
                     args.repeats, batches * args.batch_size)
        count = timed(lambda: count_accesses(cache, tables), args.repeats, len(cache))
        prof = timed(lambda: profile_tables(cache, tables), args.repeats, len(cache))
        profiled = profile_tables(cache, tables)

        rows = [
            ("parse text + write cache", "lines/s", parse),
            (f"  same, {args.workers} threads", "lines/s", parse_threads),
            (f"read cache as batches of {args.batch_size}", "samples/s", read),
            ("count 26 tables from cache", "samples/s", count),
            ("profile_tables from cache", "samples/s", prof),
        ]
        print(f"\n{'step':<34} {'unit':>10} {'median':>12} {'best':>12} {'per CPU s':>12}")
        for name, unit, r in rows:
            print(f"{name:<34} {unit:>10} {r['median']:>12,.0f} {r['best']:>12,.0f} "
                  f"{r['cpu_median']:>12,.0f}")
        print(f"parse: {parse['median'] * mb / args.lines:,.1f} MB of text/s (median)")
        met = prof["median"] >= TARGET_PROFILE_SAMPLES_PER_S
        print(f"\nprofiling target >= {TARGET_PROFILE_SAMPLES_PER_S:,} samples/s "
              f"(profile_tables, median wall): {'met' if met else 'NOT met'}")
        print(f"cache: {len(cache):,} samples, {cache.header.malformed} malformed lines, "
              f"{cache.path.stat().st_size / 1e6:,.0f} MB")
        print("\nmeasured share of lookups served by the hottest k rows (first 4 tables):")
        for spec in profiled.tables[:4]:
            pts = list(zip(spec.access.hot_rows, spec.access.share))[::4]
            print(f"  {spec.name} ({spec.num_embeddings:,} rows): "
                  + ", ".join(f"{k}:{s:.3f}" for k, s in pts))

        result = {
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "numpy": np.__version__,
                        "load_average_1m": os.getloadavg()[0]},
            "config": {"lines": args.lines, "text_mb": round(mb, 1), "zipf": args.zipf,
                       "repeats": args.repeats, "workers": args.workers,
                       "batch_size": args.batch_size, "table_sizes": list(KAGGLE_CARDINALITIES)},
            "generate_seconds": round(gen_s, 2),
            "parse_lines_per_s": parse,
            "parse_threads_lines_per_s": parse_threads,
            "parse_mb_per_s": parse["median"] * mb / args.lines,
            "read_batches_samples_per_s": read,
            "count_samples_per_s": count,
            "profile_samples_per_s": prof,
            "profile_target_samples_per_s": TARGET_PROFILE_SAMPLES_PER_S,
            "profile_target_met": met,
            "profile_points_per_table": [len(t.access.hot_rows) for t in profiled.tables],
            "tables": profiled.to_json(),
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
