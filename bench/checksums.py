"""Cost of the store's block checksums (CRC-32C per block of rows, storage.sums).

    .venv/bin/python bench/checksums.py [--rows 1000000] [--dim 64] [--batch 3000]
        [--batches 200] [--writes 200000] [--reps 3] [--out bench/results/checksums.json]

1. CRC throughput on 1 MiB blocks: google-crc32c (the store's choice) against
   zlib.crc32, interleaved, median MB/s.
2. The store with and without checksums, side by side (a store without them is the
   same store with ``_txn/sums.json`` removed, as a store made before checksums):
   gathers of random ``--batch``-id batches right after opening (the first reads of a
   block check it: the amortised cost) and once every block was checked; write-back:
   ``--writes`` distinct random rows scattered in batches, then a checkpoint (which
   applies them and replaces the checksums of the changed blocks). Interleaved
   repetitions, medians and with/without ratios. The chunk files are in the page
   cache: this measures CPU cost, not the disk.
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
import zlib
from pathlib import Path

import google_crc32c
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage import TableStore  # noqa: E402


def crc_rates(reps: int) -> dict[str, float]:
    block = np.random.default_rng(0).bytes(1 << 20)
    rates: dict[str, list[float]] = {"google_crc32c": [], "zlib_crc32": []}
    for _ in range(reps * 5):
        for name, fn in (("google_crc32c", google_crc32c.value), ("zlib_crc32", zlib.crc32)):
            start = time.perf_counter()
            for _ in range(64):
                fn(block)
            rates[name].append(64 / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def gather_rates(path: Path, batches: list[np.ndarray]) -> tuple[float, float]:
    """(rows/s over the batches right after opening, rows/s over them again)."""
    out = []
    with TableStore.open(path, mode="r") as store:
        for _ in range(2):
            start = time.perf_counter()
            for ids in batches:
                store.gather("t", ids)
            out.append(sum(b.size for b in batches) / (time.perf_counter() - start))
    return out[0], out[1]


def write_back_rate(path: Path, ids: np.ndarray, batch: int, dim: int, step: int) -> float:
    rows = np.full((batch, dim), float(step), np.float32)
    with TableStore.open(path, mode="r+") as store:
        start = time.perf_counter()
        for begin in range(0, ids.size, batch):
            part = ids[begin:begin + batch]
            store.scatter("t", part, rows[:part.size])
        store.checkpoint(step)
        return ids.size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--writes", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "checksums.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(1)
    work = Path(tempfile.mkdtemp(prefix="checksums-"))
    results: dict[str, dict[str, list[float]]] = {
        side: {"gather_first_rows_per_s": [], "gather_checked_rows_per_s": [],
               "write_back_rows_per_s": []} for side in ("with", "without")}
    try:
        crc = crc_rates(args.reps)
        paths = {"with": work / "with", "without": work / "without"}
        for side, path in paths.items():
            with TableStore.create(path) as store:
                store.add_table("t", args.rows, args.dim)
        (paths["without"] / "_txn" / "sums.json").unlink()
        batches = [rng.integers(0, args.rows, args.batch) for _ in range(args.batches)]
        for rep in range(args.reps):
            order = ("with", "without") if rep % 2 == 0 else ("without", "with")
            for side in order:
                first, checked = gather_rates(paths[side], batches)
                ids = rng.choice(args.rows, args.writes, replace=False)
                written = write_back_rate(paths[side], ids, args.batch, args.dim, rep + 1)
                results[side]["gather_first_rows_per_s"].append(first)
                results[side]["gather_checked_rows_per_s"].append(checked)
                results[side]["write_back_rows_per_s"].append(written)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {side: {k: statistics.median(v) for k, v in m.items()}
               for side, m in results.items()}
    ratios = {k: medians["with"][k] / medians["without"][k] for k in medians["with"]}
    doc = {"benchmark": "checksums", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "loadavg": os.getloadavg()},
           "settings": vars(args), "crc_mb_per_s": crc, "medians": medians,
           "with_over_without": ratios, "reps": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"crc_mb_per_s": crc, "medians": medians, "with_over_without": ratios},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
