"""The row cache's background store work: prefetch reads and write-behind, on one thread.

The table store is not thread-safe, so the cache keeps one rule: the store is used
by one thread at a time. Store operations queued here run in order on one worker
thread; every cache method that reads or writes the store itself first calls
:meth:`StoreWorker.settle`, which waits until the queue is empty. Queued work
therefore overlaps only the caller's own work (its model compute, the optimizer
step on cached rows, lookups that hit).

Two kinds of work:

* a *read* (``prefetch``): the rows the next batch will miss. The finished read
  stays ready until :meth:`StoreWorker.take` hands it to the next lookup that
  misses. Its rows were not resident when it was queued, and every write the cache
  makes to the store later invalidates them (:meth:`StoreWorker.invalidate`), so it
  never holds data older than the store's; writes queued before it run before it.
* a *write* (write-behind of evicted dirty rows): the rows' data is copied out of
  the slots when queued, so the slots can take new rows at once (from a device, the
  copy may still be in flight: the write waits for it). It returns the rows it
  wrote; :meth:`StoreWorker.settle` counts them and invalidates them in a finished
  read. A failed write loses rows the cache no longer holds, so it is sticky:
  :class:`CacheWriteError` from then on, on every call that settles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from storage.errors import CacheWriteError

ReadFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
"""``read(rows) -> (weights, state or None)``, run on the worker thread."""
WriteFn = Callable[[], np.ndarray]
"""``write() -> rows written``, run on the worker thread."""


@dataclass(frozen=True, slots=True)
class Prefetched:
    """Rows read ahead: sorted distinct ``rows``, their ``weights`` (stored dtype) and
    ``state`` ((n, state_width) float32, or None)."""

    rows: np.ndarray
    weights: np.ndarray
    state: np.ndarray | None


@dataclass(slots=True)
class WorkerCounters:
    """Running totals of :class:`StoreWorker` (seconds; rows; bytes)."""

    read_s: float = 0.0
    write_s: float = 0.0
    wait_s: float = 0.0
    hidden_s: float = 0.0
    discarded: int = 0
    bytes_read: int = 0
    written_rows: int = 0


@dataclass(frozen=True, slots=True)
class _Done:
    """What one queued task did: its seconds, whether it wrote, what it read or wrote,
    its error."""

    seconds: float
    wrote: bool
    read: Prefetched | None = None
    error: Exception | None = None
    written: np.ndarray | None = None


class StoreWorker:
    """A FIFO of store operations on one thread; see the module docstring.

    ``threaded=False``: every operation runs at once, in the caller's thread (the same
    results and counters, nothing overlaps): for a cache on the CPU, where the worker
    thread would only compete with the caller for the interpreter lock and the cores
    (bench/store_training.py: 64 against 46 ms of CPU time per step on 2 cores).
    """

    def __init__(self, threaded: bool = True) -> None:
        self._threaded = threaded
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[_Done]] = []
        self._ready: Prefetched | None = None
        self._valid: np.ndarray | None = None
        self._failure: CacheWriteError | None = None
        self.counters = WorkerCounters()

    @property
    def threaded(self) -> bool:
        return self._threaded

    def read(self, read: ReadFn, rows: np.ndarray) -> None:
        """Queue reading ``rows`` (sorted, distinct); a read not yet used is dropped."""
        self._check_failure()
        self.drop()
        if rows.size:
            self._submit(_timed_read, read, rows)

    def write(self, write: WriteFn) -> None:
        """Queue ``write()`` (it must hold copies of the data it writes)."""
        self._check_failure()
        self._submit(_timed_write, write)

    def _submit(self, fn: Callable[..., _Done], *args: object) -> None:
        if not self._threaded:
            done: Future[_Done] = Future()
            done.set_result(fn(*args))
            self._pending.append(done)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="row-cache-store")
        self._pending.append(self._pool.submit(fn, *args))

    def settle(self) -> None:
        """Wait until the queue is empty (the wait is counted); re-raise a failure."""
        self._check_failure()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        start = time.perf_counter()
        done = [future.result() for future in pending]  # tasks catch their own errors
        waited = time.perf_counter() - start
        if self._threaded:
            self.counters.wait_s += waited
            self.counters.hidden_s += max(0.0, sum(d.seconds for d in done) - waited)
        else:  # run inline: the caller waited for all of it
            self.counters.wait_s += sum(d.seconds for d in done)
        read_error: Exception | None = None
        for task in done:
            if task.wrote:
                self.counters.write_s += task.seconds
                if task.error is not None and self._failure is None:
                    self._failure = CacheWriteError(
                        f"a background write-back of the row cache failed ({task.error!r}); "
                        f"the rows it held are lost to this cache: reopen the store with "
                        f"mode='r+' (it rolls back to the last checkpoint) and build a new "
                        f"cache")
                    self._failure.__cause__ = task.error
                if task.written is not None:
                    self.counters.written_rows += task.written.size
                    self.invalidate(task.written)
                continue
            self.counters.read_s += task.seconds
            if task.error is not None:
                read_error = read_error or task.error
            elif task.read is not None:
                self.counters.bytes_read += task.read.weights.nbytes + (
                    0 if task.read.state is None else task.read.state.nbytes)
                self.drop()
                self._ready = task.read
                self._valid = np.ones(task.read.rows.size, dtype=bool)
        self._check_failure()
        if read_error is not None:
            raise read_error

    def _check_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def invalidate(self, rows: np.ndarray) -> None:
        """The cache wrote (or queued writing) ``rows``: forget what was read of them."""
        if self._ready is None or self._valid is None or rows.size == 0:
            return
        self._valid &= ~np.isin(self._ready.rows, rows)

    def take(self) -> tuple[Prefetched, np.ndarray] | None:
        """Settle, then hand over the finished read and its mask of still-valid rows."""
        self.settle()
        if self._ready is None or self._valid is None:
            return None
        taken = (self._ready, self._valid)
        self._ready = self._valid = None
        return taken

    def count_discarded(self, rows: int) -> None:
        self.counters.discarded += rows

    def drop(self) -> None:
        """Forget a finished read that was not used."""
        if self._ready is not None:
            self.counters.discarded += self._ready.rows.size
        self._ready = self._valid = None

    def close(self) -> None:
        """Finish the queued work, drop what was read, stop the thread."""
        try:
            self.settle()
        finally:
            self.drop()
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


def _timed_read(read: ReadFn, rows: np.ndarray) -> _Done:
    start = time.perf_counter()
    try:
        weights, state = read(rows)
    except Exception as exc:  # noqa: BLE001 - handed to the caller by settle()
        return _Done(time.perf_counter() - start, wrote=False, error=exc)
    return _Done(time.perf_counter() - start, wrote=False,
                 read=Prefetched(rows, weights, state))


def _timed_write(write: WriteFn) -> _Done:
    start = time.perf_counter()
    try:
        written = write()
    except Exception as exc:  # noqa: BLE001 - made sticky by settle()
        return _Done(time.perf_counter() - start, wrote=True, error=exc)
    return _Done(time.perf_counter() - start, wrote=True, written=written)
