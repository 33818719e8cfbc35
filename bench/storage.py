"""Table store I/O: chunk layout, sparse gathers (warm and cold) and durable write-back.

1. Chunk layout: for a few chunk row counts, the bulk write of an imported array
   (through zarr, fsynced) and warm sparse gathers; the best layout (geometric mean
   of both, relative to the best of each) is used for the rest and compared with the
   store's default (64 MiB chunks).
2. Sparse gather, warm (page cache): ``TableStore.gather`` vs zarr's ``oindex`` on
   the same ids (target >= 1 M rows/s). Measured in the steady state of a long-lived
   reader (every page already mapped by the process); the rate of first touches of
   cached pages (one minor page fault each) is printed too.
3. Sparse gather, cold: the store's pages are evicted first with
   ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every chunk file (after fdatasync, with
   the store closed so that no page is mapped), which leaves other processes' page
   cache alone; ``--drop-caches`` uses ``echo 3 > /proc/sys/vm/drop_caches`` instead
   (falling back to fadvise where not permitted). The output says which
   (target >= 80 k rows/s). Also with the next batch prefetched while the current
   one is gathered, as the row cache does.
4. Write-back: distinct dirty rows scattered in batches through the undo journal,
   then ``checkpoint`` (durable), warm (rows read before, as a row cache would
   have) and cold; vs zarr's ``oindex`` assignment of the same rows, which does not
   fsync (target >= 100 k rows/s durable).

    python bench/storage.py                           # 2M x 64 fp32 (512 MB), ~2 min
    python bench/storage.py --rows 10000000           # 2.5 GB
    python bench/storage.py --rows 200000 --layouts 16384 65536   # quick

Every rate is the median of ``--repeats`` runs (the best is printed beside it):
the machine is shared, and other processes' CPU and disk use make single runs
noisy. Writes ``bench/results/storage.json``. Stores go to a temporary directory
(``--workdir``) that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(ROOT))

from storage import TableStore  # noqa: E402
from storage.layout import default_chunk_rows  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "storage.json"
TARGET_WARM_ROWS_PER_S = 1_000_000
TARGET_COLD_ROWS_PER_S = 80_000
TARGET_WRITEBACK_ROWS_PER_S = 100_000
TABLE = "t"


@dataclass(frozen=True, slots=True)
class LayoutResult:
    """One chunk layout: bulk write through zarr and warm sparse gathers (medians)."""

    chunk_rows: int
    chunk_mib: float
    bulk_write_mb_per_s: float
    warm_gather_rows_per_s: float
    score: float = 0.0


@dataclass(frozen=True, slots=True)
class Rates:
    """Repeated measurements of one rate (per second)."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.runs))

    @property
    def best(self) -> float:
        return max(self.runs)

    def to_json(self) -> dict[str, object]:
        return {"median": self.median, "best": self.best, "runs": list(self.runs)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="table rows")
    parser.add_argument("--dim", type=int, default=64, help="row width (elements)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--layouts", type=int, nargs="+", default=[16384, 65536, 262144, 1048576],
                        help="chunk row counts to compare")
    parser.add_argument("--batch", type=int, default=2048, help="ids per gather")
    parser.add_argument("--warm-batches", type=int, default=50, help="gathers per warm run")
    parser.add_argument("--cold-batches", type=int, default=20, help="gathers per cold run")
    parser.add_argument("--zarr-batches", type=int, default=2,
                        help="gathers through zarr's oindex per run (slow)")
    parser.add_argument("--dirty-rows", type=int, default=200_000,
                        help="distinct rows written back per write-back run")
    parser.add_argument("--scatter-batch", type=int, default=16384, help="rows per scatter")
    parser.add_argument("--zarr-write-rows", type=int, default=2048,
                        help="rows written through zarr's oindex assignment (slow)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs per gather measurement (write-back: up to 3)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="evict with /proc/sys/vm/drop_caches (affects every process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where stores are created (default: a temporary directory)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if min(args.rows, args.dim, args.batch, args.warm_batches, args.cold_batches,
           args.dirty_rows, args.scatter_batch, args.zarr_batches, args.zarr_write_rows,
           args.repeats) < 1:
        parser.error("sizes and counts must be >= 1")
    if args.dirty_rows > args.rows:
        parser.error("--dirty-rows must be <= --rows")
    return args


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.inf


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def id_batches(rng: np.random.Generator, rows: int, batch: int, count: int) -> list[np.ndarray]:
    return [rng.integers(0, rows, batch) for _ in range(count)]


def gather_rate(store: TableStore, batches: list[np.ndarray]) -> float:
    seconds = timed(lambda: [store.gather(TABLE, ids) for ids in batches])
    return rate(sum(b.size for b in batches), seconds)


def evict(path: Path, drop_caches: bool) -> str:
    """Empty the page cache of the store's chunk files; returns the method used.

    The store must be closed (mapped pages are not evicted).
    """
    files = sorted((path / TABLE).rglob("c/*/0"))
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            if not drop_caches:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if not drop_caches:
        return "posix_fadvise(DONTNEED) on each chunk file"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "echo 3 > /proc/sys/vm/drop_caches"
    except OSError:
        return evict(path, False) + " (drop_caches not permitted)"


def make_store(path: Path, args: argparse.Namespace, chunk_rows: int,
               values: np.ndarray | None = None) -> float:
    """Create the table (importing ``values``, else the seeded uniform init); returns
    the bulk-write MB/s (zarr writes of whole chunks, then fsync of every file)."""
    init = "uniform" if values is None else values
    with TableStore.create(path, overwrite=True) as store:
        seconds = timed(lambda: store.add_table(TABLE, args.rows, args.dim, dtype=args.dtype,
                                                init=init, seed=args.seed, chunk_rows=chunk_rows))
        nbytes = store.describe(TABLE).weight_bytes
        store.checkpoint(0)
    return rate(nbytes / 1e6, seconds)


def map_all(store: TableStore, rows: int) -> None:
    """Read every row once, so that every page is mapped in this process (steady state)."""
    block = 1 << 18
    for start in range(0, rows, block):
        store.gather(TABLE, np.arange(start, min(rows, start + block)))


def compare_layouts(args: argparse.Namespace, work: Path) -> list[LayoutResult]:
    """Bulk write (import of the same random array, so the RNG is not timed) and warm
    gathers in the steady state, per chunk row count."""
    results = []
    rng = np.random.default_rng(args.seed + 1)
    values = rng.random((args.rows, args.dim), dtype=np.float32)
    for chunk_rows in args.layouts:
        path = work / f"layout-{chunk_rows}"
        writes = Rates(tuple(make_store(path, args, chunk_rows, values)
                             for _ in range(min(3, args.repeats))))
        write = writes.median
        with TableStore.open(path) as store:
            map_all(store, args.rows)
            reads = Rates(tuple(gather_rate(store, id_batches(rng, args.rows, args.batch,
                                                              args.warm_batches))
                                for _ in range(args.repeats)))
            info = store.describe(TABLE)
        chunk_mib = info.weight_bytes / info.num_chunks / 2**20
        results.append(LayoutResult(chunk_rows, chunk_mib, write, reads.median))
        print(f"  {chunk_rows:>7} rows/chunk ({chunk_mib:6.2f} MiB): bulk write {write:6.0f} "
              f"MB/s, warm gather {reads.median / 1e6:5.2f} M rows/s", flush=True)
        shutil.rmtree(path)
    best_write = max(r.bulk_write_mb_per_s for r in results)
    best_read = max(r.warm_gather_rows_per_s for r in results)
    return [LayoutResult(r.chunk_rows, r.chunk_mib, r.bulk_write_mb_per_s,
                         r.warm_gather_rows_per_s,
                         math.sqrt(r.bulk_write_mb_per_s / best_write
                                   * r.warm_gather_rows_per_s / best_read)) for r in results]


def zarr_gather_rate(path: Path, batches: list[np.ndarray], check: TableStore) -> float:
    import zarr

    array = zarr.open_array(path / TABLE / "weight", mode="r")
    got: list[np.ndarray] = []
    seconds = timed(lambda: got.extend(array.oindex[ids] for ids in batches))
    if not np.array_equal(got[0], check.gather(TABLE, batches[0])):  # after timing: warms
        raise RuntimeError("zarr and the store disagree on the same rows")
    return rate(sum(b.size for b in batches), seconds)


def cold_gather(path: Path, args: argparse.Namespace, rng: np.random.Generator, *,
                pipelined: bool) -> tuple[float, str]:
    """Gathers right after eviction; ``pipelined``: ``prefetch`` of the next batch is
    issued before each gather, as the row cache does while a batch computes."""
    method = evict(path, args.drop_caches)
    batches = id_batches(rng, args.rows, args.batch, args.cold_batches)
    with TableStore.open(path) as store:
        if not pipelined:
            return gather_rate(store, batches), method

        def run() -> None:
            store.prefetch(TABLE, batches[0])
            for index, ids in enumerate(batches):
                if index + 1 < len(batches):
                    store.prefetch(TABLE, batches[index + 1])
                store.gather(TABLE, ids)
        return rate(args.batch * len(batches), timed(run)), method


def disk_read_iops(path: Path, args: argparse.Namespace, rng: np.random.Generator,
                   reads: int = 20000, threads: int = 16) -> float:
    """Random 4 KiB preads per second from the evicted chunk files, ``threads`` at a
    time: what the disk gives, the ceiling for cold rows of one page each."""
    evict(path, args.drop_caches)
    files = sorted((path / TABLE).rglob("c/*/0"))
    fds = [os.open(file, os.O_RDONLY) for file in files]
    try:
        for fd in fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        pages = [os.fstat(fd).st_size // 4096 for fd in fds]
        which = rng.integers(0, len(fds), reads).tolist()
        page = [int(rng.integers(0, pages[f])) * 4096 for f in which]

        def worker(first: int) -> None:
            for i in range(first, reads, threads):
                os.pread(fds[which[i]], 4096, page[i])

        with ThreadPoolExecutor(threads) as pool:
            seconds = timed(lambda: list(pool.map(worker, range(threads))))
    finally:
        for fd in fds:
            os.close(fd)
    return rate(reads, seconds)


def write_back(path: Path, args: argparse.Namespace, rng: np.random.Generator, *,
               cold: bool, step: int) -> dict[str, float]:
    """Scatter distinct dirty rows in batches, then checkpoint; rows/s durable.

    Warm: the rows were gathered through the same handle first, as a row cache fills
    itself. Cold: the handle is closed and the files evicted in between.
    """
    ids = rng.choice(args.rows, size=args.dirty_rows, replace=False)
    store = TableStore.open(path, mode="r+")
    try:
        rows = store.gather(TABLE, ids)  # what a row cache would hold
        rows[:, 0] += 1
        if cold:
            store.close()
            evict(path, args.drop_caches)
            store = TableStore.open(path, mode="r+")
        started = time.perf_counter()
        for start in range(0, ids.size, args.scatter_batch):
            store.scatter(TABLE, ids[start:start + args.scatter_batch],
                          rows[start:start + args.scatter_batch])
        scattered = time.perf_counter()
        journal_mb = store.uncommitted_journal_bytes() / 1e6
        store.checkpoint(step)
        done = time.perf_counter()
        if not np.array_equal(store.gather(TABLE, ids[:1000]), rows[:1000]):
            raise RuntimeError("written rows do not read back")
    finally:
        store.close()
    return {"rows_per_s": rate(ids.size, done - started),
            "scatter_seconds": scattered - started, "checkpoint_seconds": done - scattered,
            "journal_mb": journal_mb}


def zarr_write_rate(path: Path, args: argparse.Namespace, rng: np.random.Generator) -> float:
    import zarr

    array = zarr.open_array(path / TABLE / "weight", mode="r+")
    ids = np.sort(rng.choice(args.rows, size=args.zarr_write_rows, replace=False))
    rows = np.asarray(array.oindex[ids])
    rows[:, 0] += 1
    seconds = timed(lambda: array.oindex.__setitem__(ids, rows))
    return rate(ids.size, seconds)


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "MISSED"


def print_row(name: str, ours: Rates, zarr_rate: float | None, target: float | None,
              unit: float, unit_name: str) -> None:
    """One result line: median and best of the store, zarr's rate, ratio, target."""
    ratio = "" if zarr_rate is None else f"{ours.median / zarr_rate:7.0f}x"
    zarr_text = "" if zarr_rate is None else f"{zarr_rate / 1e3:9.2f} k/s"
    goal = ""
    if target is not None:
        goal = f"{target / unit:g} {unit_name} {verdict(ours.median, target)}"
    print(f"  {name:<36} {ours.median / unit:7.2f} {unit_name:<4} (best "
          f"{ours.best / unit:6.2f}) {zarr_text:>13} {ratio:>8}   {goal}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    owned = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="storage-bench-")) if owned else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        doc = run(args, work)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    doc["wall_seconds"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(f"wall time {doc['wall_seconds']} s; wrote {args.output}")


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    row_bytes = args.dim * (4 if args.dtype == "fp32" else 2)
    load = os.getloadavg()[0]
    print(f"table {args.rows} x {args.dim} {args.dtype} ({args.rows * row_bytes / 1e6:.0f} MB), "
          f"gathers of {args.batch} uniform random ids, medians of {args.repeats} runs; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print("1. chunk layout (bulk write of an imported array through zarr + fsync; warm gather)")
    layouts = compare_layouts(args, work)
    best = max(layouts, key=lambda r: r.score)
    default_rows = default_chunk_rows(args.rows, row_bytes)
    print(f"  best: {best.chunk_rows} rows/chunk; the store's default for this table is "
          f"{default_rows} ({'same' if best.chunk_rows == default_rows else 'differs'})")

    path = work / "store"
    make_store(path, args, best.chunk_rows)
    rng = np.random.default_rng(args.seed + 2)
    with TableStore.open(path) as store:
        first_touch = gather_rate(store, id_batches(rng, args.rows, args.batch,
                                                    args.warm_batches))
        map_all(store, args.rows)
        warm = Rates(tuple(gather_rate(store, id_batches(rng, args.rows, args.batch,
                                                         args.warm_batches))
                           for _ in range(args.repeats)))
        zarr_warm = Rates(tuple(zarr_gather_rate(path, id_batches(rng, args.rows, args.batch,
                                                                  args.zarr_batches), store)
                                for _ in range(min(3, args.repeats))))
    cold_runs = [cold_gather(path, args, rng, pipelined=False)
                 for _ in range(min(3, args.repeats))]
    cold = Rates(tuple(r for r, _ in cold_runs))
    cold_method = cold_runs[0][1]
    cold_pipelined = Rates(tuple(cold_gather(path, args, rng, pipelined=True)[0]
                                 for _ in range(min(3, args.repeats))))
    disk_iops = disk_read_iops(path, args, rng)
    evict(path, args.drop_caches)
    with TableStore.open(path) as store:
        zarr_cold = zarr_gather_rate(path, id_batches(rng, args.rows, args.batch, 1), store)

    wb_rng = np.random.default_rng(args.seed + 3)
    wb_repeats = min(3, args.repeats)
    warm_wb = [write_back(path, args, wb_rng, cold=False, step=1 + i) for i in range(wb_repeats)]
    cold_wb = [write_back(path, args, wb_rng, cold=True, step=10 + i) for i in range(wb_repeats)]
    zarr_wb = zarr_write_rate(path, args, wb_rng)
    warm_wb_rate = Rates(tuple(r["rows_per_s"] for r in warm_wb))
    cold_wb_rate = Rates(tuple(r["rows_per_s"] for r in cold_wb))

    print("2.-4. results                          store median     (best)   zarr oindex    "
          "ratio   target")
    mega, kilo = (1e6, "M/s"), (1e3, "k/s")
    print_row("gather, warm (steady state)", warm, zarr_warm.median, TARGET_WARM_ROWS_PER_S,
              *mega)
    print_row("gather, first touch of cached rows", Rates((first_touch,)), None, None, *mega)
    print_row("gather, cold", cold, zarr_cold, TARGET_COLD_ROWS_PER_S, *kilo)
    print_row("gather, cold, next batch prefetched", cold_pipelined, None, None, *kilo)
    print_row("write-back durable, warm", warm_wb_rate, zarr_wb, TARGET_WRITEBACK_ROWS_PER_S,
              *kilo)
    print_row("write-back durable, cold", cold_wb_rate, zarr_wb, TARGET_WRITEBACK_ROWS_PER_S,
              *kilo)
    print_row("disk: random 4 KiB preads, 16 threads", Rates((disk_iops,)), None, None, *kilo)
    mid = warm_wb[len(warm_wb) // 2]
    print(f"  cold = after {cold_method}. write-back: {args.dirty_rows} distinct rows in "
          f"scatters of {args.scatter_batch}, then checkpoint; a warm run spent "
          f"{mid['scatter_seconds']:.2f} s in scatter (journal {mid['journal_mb']:.0f} MB "
          f"fdatasynced per scatter) and {mid['checkpoint_seconds']:.2f} s in checkpoint "
          f"(fdatasync of the chunk files: one 4 KiB page per dirty row). zarr's oindex "
          f"assignment is not fsynced.")
    return {
        "benchmark": "storage",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "load_average_at_start": load},
        "layouts": [asdict(r) for r in layouts],
        "chosen_chunk_rows": best.chunk_rows,
        "default_chunk_rows": default_rows,
        "gather": {"warm_rows_per_s": warm.to_json(),
                   "warm_first_touch_rows_per_s": first_touch,
                   "zarr_oindex_warm_rows_per_s": zarr_warm.to_json(),
                   "warm_ratio_vs_zarr": warm.median / zarr_warm.median,
                   "cold_rows_per_s": cold.to_json(), "cold_method": cold_method,
                   "cold_next_batch_prefetched_rows_per_s": cold_pipelined.to_json(),
                   "zarr_oindex_cold_rows_per_s": zarr_cold,
                   "disk_random_4k_reads_per_s_16_threads": disk_iops},
        "write_back": {"warm": warm_wb, "cold": cold_wb,
                       "warm_rows_per_s": warm_wb_rate.to_json(),
                       "cold_rows_per_s": cold_wb_rate.to_json(),
                       "zarr_oindex_setitem_rows_per_s": zarr_wb},
        "targets": {
            "warm_gather_1M_rows_per_s": warm.median >= TARGET_WARM_ROWS_PER_S,
            "cold_gather_80k_rows_per_s": cold.median >= TARGET_COLD_ROWS_PER_S,
            "write_back_100k_rows_per_s_warm":
                warm_wb_rate.median >= TARGET_WRITEBACK_ROWS_PER_S,
            "write_back_100k_rows_per_s_cold":
                cold_wb_rate.median >= TARGET_WRITEBACK_ROWS_PER_S,
        },
    }


if __name__ == "__main__":
    main()
