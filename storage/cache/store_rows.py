"""The row cache's traffic with the table store: one table's rows read on demand or
taken from the background prefetch (:mod:`storage.cache.worker`), and written back
sorted by row. Counted in the cache's :class:`~storage.cache.stats.Counters`."""

from __future__ import annotations

import numpy as np

from storage.cache.stats import Counters
from storage.cache.worker import StoreWorker
from storage.store import TableStore


class StoreRows:
    """Rows of ``table`` in ``store``, as the cache moves them (numpy, the store's
    dtypes). ``state_width``: the optimizer state columns the cache holds (0: none)."""

    __slots__ = ("_counts", "_dim", "_np_dtype", "_state_width", "_store", "_table",
                 "_worker")

    def __init__(self, store: TableStore, table: str, worker: StoreWorker, counts: Counters,
                 *, dim: int, np_dtype: np.dtype, state_width: int) -> None:
        self._store = store
        self._table = table
        self._worker = worker
        self._counts = counts
        self._dim = dim
        self._np_dtype = np_dtype
        self._state_width = state_width

    @property
    def with_state(self) -> bool:
        return self._state_width > 0

    @property
    def row_bytes(self) -> int:
        """Bytes one row moves: weights plus cached optimizer state."""
        return self._dim * self._np_dtype.itemsize + 4 * self._state_width

    def read(self, rows: np.ndarray, with_state: bool | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """Weights (and state: the cached state by default) of ``rows`` from the store;
        not counted. May run on the prefetch thread."""
        weights = self._store.gather(self._table, rows)
        if self.with_state if with_state is None else with_state:
            return weights, self._store.gather_state(self._table, rows)
        return weights, None

    def fetch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Weights and state of ``rows`` (sorted, distinct): from the prefetch where it
        holds them, the rest in one gather. Consumes the prefetch (unless ``rows`` is empty)."""
        if rows.size == 0:
            state = np.zeros((0, self._state_width), np.float32) if self.with_state else None
            return np.zeros((0, self._dim), dtype=self._np_dtype), state
        taken = self._worker.take()
        if taken is None:
            weights, state = self.read(rows)
            self._counts.store_read += rows.size * self.row_bytes
            return weights, state
        ready, valid = taken
        if ready.rows.size == rows.size and np.array_equal(ready.rows, rows) and valid.all():
            # the usual case: this lookup misses exactly the rows announced for it
            self._counts.prefetched_rows += rows.size
            return ready.weights, ready.state
        at = np.minimum(np.searchsorted(ready.rows, rows), max(ready.rows.size - 1, 0))
        hit = (ready.rows[at] == rows) & valid[at]
        used = int(hit.sum())
        self._counts.prefetched_rows += used
        self._worker.count_discarded(ready.rows.size - used)
        weights = np.empty((rows.size, self._dim), dtype=self._np_dtype)
        weights[hit] = ready.weights[at[hit]]
        state = None
        if self.with_state and ready.state is not None:
            state = np.empty((rows.size, self._state_width), dtype=np.float32)
            state[hit] = ready.state[at[hit]]
        rest = ~hit
        if rest.any():
            more_weights, more_state = self.read(rows[rest])
            weights[rest] = more_weights
            if state is not None and more_state is not None:
                state[rest] = more_state
            self._counts.store_read += int(rest.sum()) * self.row_bytes
        return weights, state

    def write(self, rows: np.ndarray, weights: np.ndarray, state: np.ndarray | None) -> None:
        """Scatter ``weights`` (and ``state``, ``(n, state_width)``) to ``rows`` (sorted,
        distinct); not counted. May run on the write-behind thread."""
        self._store.scatter(self._table, rows, weights)
        if state is not None:
            self._store.scatter_state(self._table, rows, state)
