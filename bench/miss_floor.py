"""The floor of a row cache's miss path on this machine: the row moves of one table's
lookup in ``bench/store_training.py``'s steady state, done with bare numpy (no policy,
no checks, no store layers), against the same lookups through ``storage.RowCache``.

    .venv/bin/python bench/miss_floor.py [--tables 8] [--rows 1000000] [--dim 64]
        [--slots 100000] [--batch 20480] [--misses 3300] [--steps 30] [--exponent 1.05]

Per table and step, the sketch: searches the batch's ids in a dense int32 index, copies
the victims' rows out of the slots, writes them to a redo area (a dense row -> slot
index over it), reads the missed rows from the redo area or the table, installs them in
the victims' slots with the index updated, and records the batch's recency keys: the
moves a real miss path cannot avoid. Between tables, unrelated memory traffic evicts
the CPU caches, as a training step's other tables and MLPs do. The cache side runs
``RowCache.lookup`` on Zipf(``--exponent``) batches (``bench/cache.py``'s) over a store of the same shape, full, with
every row dirty (as in training); its misses per lookup are reported beside it.

Writes ``bench/results/miss_floor.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cache import zipf_batches  # noqa: E402
from storage import RowCache, TableStore  # noqa: E402

PHASES = ("probe", "victims_out", "redo_write", "read", "install", "keys")


class Sketch:
    """One table's arrays for the bare-numpy miss path."""

    def __init__(self, rng: np.random.Generator, args: argparse.Namespace) -> None:
        self.rng, self.args = rng, args
        self.table = np.ones((args.rows, args.dim), np.float32)
        self.slots = np.ones((args.slots, args.dim), np.float32)
        self.index = np.full(args.rows, -1, np.int32)
        self.slot_row = rng.choice(args.rows, args.slots, replace=False)
        self.index[self.slot_row] = np.arange(args.slots, dtype=np.int32)
        self.key = np.zeros(args.slots, np.int64)
        self.redo_index = np.full(args.rows, -1, np.int32)
        self.redo = np.ones((args.rows, args.dim), np.float32)
        self.redo_count = 0

    def step(self, seconds: dict[str, float]) -> None:
        args, rng = self.args, self.rng
        ids = rng.integers(0, args.rows, args.batch)
        missing = np.sort(rng.choice(args.rows, args.misses, replace=False))
        victims = rng.choice(args.slots, args.misses, replace=False)
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[phase] += now - clock
            clock = now

        slots = self.index[ids]
        lap("probe")
        out = self.slots[victims]
        evicted = self.slot_row[victims]
        lap("victims_out")
        at = self.redo_index[evicted]
        new = at < 0
        fresh = int(np.count_nonzero(new))
        at[new] = np.arange(self.redo_count, self.redo_count + fresh)
        self.redo_count += fresh
        self.redo_index[evicted] = at
        self.redo[at] = out
        lap("redo_write")
        held_at = self.redo_index[missing]
        held = held_at >= 0
        rows = np.empty((missing.size, args.dim), np.float32)
        rows[held] = self.redo[held_at[held]]
        rows[~held] = self.table[missing[~held]]
        lap("read")
        self.slots[victims] = rows
        self.index[evicted] = -1
        self.index[missing] = victims
        self.slot_row[victims] = missing
        lap("install")
        self.key[np.maximum(slots, 0)] = ids
        lap("keys")


def churn(buffer: np.ndarray, rng: np.random.Generator) -> None:
    """Unrelated memory traffic: what runs between two tables' lookups."""
    buffer[rng.integers(0, buffer.size, 300_000)] += 1


def cache_side(args: argparse.Namespace, workdir: Path, rng: np.random.Generator,
               buffer: np.ndarray) -> tuple[float, float]:
    """ms per table and lookup through RowCache, and distinct misses per lookup."""
    store = TableStore.create(workdir / "store")
    caches, batches = [], []
    for t in range(args.tables):
        store.add_table(f"t{t}", num_rows=args.rows, dim=args.dim, seed=t)
        caches.append(RowCache(store, f"t{t}", slots=args.slots, background=False))
        batches.append([torch.from_numpy(ids)
                        for ids in zipf_batches(args, args.steps + 60, seed=10 + t)])
    for step in range(60):  # fill the caches: every miss evicts from here on
        for cache, own in zip(caches, batches):
            cache.mark_dirty(cache.lookup(own[step]))
    before = sum(cache.stats().misses for cache in caches)
    seconds = 0.0
    for step in range(60, 60 + args.steps):
        for cache, own in zip(caches, batches):
            churn(buffer, rng)
            start = time.perf_counter()
            slots = cache.lookup(own[step])
            seconds += time.perf_counter() - start
            cache.mark_dirty(slots)  # trained rows: every victim is written back
    misses = sum(cache.stats().misses for cache in caches) - before
    for cache in caches:
        cache.close()
    store.close()
    lookups = args.steps * args.tables
    return seconds / lookups * 1e3, misses / lookups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--slots", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=20_480, help="ids per table and step")
    parser.add_argument("--misses", type=int, default=3_300,
                        help="distinct rows the sketch misses per table and step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--exponent", type=float, default=1.05, help="Zipf exponent of the ids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "miss_floor.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    buffer = np.ones(20_000_000, np.float64)  # 160 MB of unrelated memory

    sketches = [Sketch(rng, args) for _ in range(args.tables)]
    seconds = dict.fromkeys(PHASES, 0.0)
    warm = dict.fromkeys(PHASES, 0.0)
    for step in range(5 + args.steps):
        for sketch in sketches:
            churn(buffer, rng)
            sketch.step(warm if step < 5 else seconds)
    del sketches
    lookups = args.steps * args.tables
    floor = {phase: s / lookups * 1e3 for phase, s in seconds.items()}
    floor_ms = sum(floor.values())

    workdir = Path(tempfile.mkdtemp(prefix="miss-floor-"))
    try:
        cache_ms, misses = cache_side(args, workdir, rng, buffer)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    doc = {
        "benchmark": "miss_floor",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg()},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "floor_ms_per_table_step": floor_ms,
        "floor_phases_ms": floor,
        "row_cache_ms_per_table_step": cache_ms,
        "row_cache_misses_per_lookup": misses,
        "row_cache_over_floor": cache_ms / floor_ms,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print("bare numpy, ms per table and step: "
          + ", ".join(f"{phase} {ms:.3f}" for phase, ms in floor.items())
          + f"; total {floor_ms:.2f} ({args.misses:,} misses)")
    print(f"RowCache.lookup: {cache_ms:.2f} ms per table and step ({misses:,.0f} misses a "
          f"lookup), {cache_ms / floor_ms:.2f}x the floor")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
