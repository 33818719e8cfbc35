"""The row cache: a fixed number of table rows held on the compute device, over a
:class:`~storage.store.TableStore` table, with a replacement policy, dirty bits,
write-back, fused sparse optimizer steps and background prefetch.

>>> cache = RowCache(store, "users", slots=100_000, device="cuda", policy="lru",
...                  with_state=True)
>>> rows = cache.gather(ids)                     # (len(ids), dim) on the device, any batch
>>> cache.prefetch(next_ids)                     # read next batch's misses meanwhile
>>> cache.apply_rowwise_adagrad(ids, grads, lr=0.01, eps=1e-8)   # on the cached rows
>>> cache.flush(); store.checkpoint(step)        # dirty rows to the store, then durable

Where things live:

* slots: ``weights`` (slots, dim) in the table's dtype (fp32, fp16 or bf16; the
  store's uint16 bf16 bits are viewed as ``torch.bfloat16``) and, with
  ``with_state=True``, ``state`` (slots,) fp32 (row-wise Adagrad's sum of squared
  gradients), both on ``device``;
* host (numpy): the row -> slot index (:mod:`storage.cache_index`: a dense int32
  array of one entry per table row up to 64 M rows, a hash table above), the
  slot -> row array, dirty bits and the policy's state (:mod:`storage.cache_policy`).
  Ids are copied to the host once per call (one device sync on CUDA).

Batch semantics. ``lookup``/``gather`` make every row of the batch resident at
once: hits are counted, the batch's distinct missing rows are read from the store
in one gather (weights, and one of the optimizer state), victims are chosen by the
policy among the slots the batch does not use, and the dirty ones are written back
in one scatter (sorted by row, so the store writes chunk by chunk), in the lookup
or, with ``write_behind=True``, on the background thread (their data copied out of
the slots first, so the store's journal fsync does not stall the lookup). If the batch
has more distinct rows than the cache can hold beside its hits, the missing rows it
uses most (ties: lower row id) get slots and the others are served straight from
the store, uncached (``CacheStats.uncached``): ``gather`` returns them in the same
call, ``lookup`` returns slot -1 for them, and ``apply_*`` updates them in the
store directly (read, step, write; ``CacheStats.direct_updates``). Nothing is
refused for size.

Optimizer steps (``apply_sgd``, ``apply_rowwise_adagrad``) sum the gradients of
duplicate ids first (a coalesced sparse gradient, summed in fp32 in the order of
the ids), compute in fp32, round to the table's dtype and mark the rows dirty. A
row's optimizer state travels with it: read with the row on a miss, written back
with it. The results equal the same step on an in-memory table (tested bit-exact).

The cache is the table's only writer while it lives: rows written to the store
behind its back are not seen while cached, and may be overwritten by a write-back.
Updates are refused (:class:`~storage.errors.ReadOnlyStoreError`) at the first
``apply_*`` call, before any work, when the store is open read-only; a read-only
cache over a ``mode="r"`` store is fine.

Threads (:mod:`storage.cache_worker`): prefetch reads and write-behind run in order
on one background thread, and the cache itself touches the store only after that
thread's queue is empty, so the store is never used by two threads at once *through
the cache*. The caller must keep that too: call :meth:`RowCache.flush` (before
``store.checkpoint``), :meth:`RowCache.settle` (before other direct use of the
store) or :meth:`RowCache.close` (before ``store.close``). The cache itself is not
thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch

from storage.cache_index import IndexKind, make_index
from storage.cache_policy import make_policy
from storage.cache_types import CacheArgumentError, CacheStats, TierBytes
from storage.cache_worker import StoreWorker
from storage.dtypes import StoreDType, is_torch_tensor, torch_to_numpy
from storage.errors import MissingArrayError, ReadOnlyStoreError, RowIndexError, RowShapeError
from storage.store import TableStore

Step = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor],
                tuple[torch.Tensor, torch.Tensor | None]]
"""An optimizer step on rows: ``(weights fp32, state or None, summed grads) -> (weights,
state)``."""

_TORCH_DTYPES = {StoreDType.FP32: torch.float32, StoreDType.FP16: torch.float16,
                 StoreDType.BF16: torch.bfloat16}


@dataclass(slots=True)
class _Counters:
    """Running totals behind :meth:`RowCache.stats` (rows; bytes)."""

    accesses: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    write_backs: int = 0
    uncached: int = 0
    direct_updates: int = 0
    preloaded: int = 0
    prefetched_rows: int = 0
    store_read: int = 0
    store_written: int = 0
    device_read: int = 0
    device_written: int = 0


class RowCache:
    """Rows of one table of ``store`` in ``slots`` slots on ``device``; see the module
    docstring.

    ``slots``: rows the cache holds (clamped to the table's rows).
    ``policy``: ``"lru"``, ``"lfu"`` or ``"profile"`` (:mod:`storage.cache_policy`);
    ``profile``: per-row access counts, required by ``"profile"`` only: its hottest
    rows are loaded here, in one gather. ``with_state``: also cache the row-wise
    Adagrad state (the table must have ``optimizer_state="rowwise_adagrad"``).
    ``index``: ``"auto"``, ``"dense"`` or ``"hash"`` (:mod:`storage.cache_index`).
    ``write_behind``: write evicted dirty rows back on the background thread
    (:mod:`storage.cache_worker`) instead of inside the lookup that evicts them. Off by
    default: on the shared 2-core machine of bench/cache.py it hid ~8 ms of writing
    per step but made the loop no faster (the thread competes for the same cores);
    try it where cores are idle.
    """

    def __init__(self, store: TableStore, table: str, *, slots: int,
                 device: torch.device | str = "cpu", policy: str = "lru",
                 profile: np.ndarray | None = None, with_state: bool = False,
                 index: IndexKind = "auto", write_behind: bool = False) -> None:
        info = store.describe(table)
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
            raise CacheArgumentError(f"slots must be an int >= 1, got {slots!r}")
        if with_state and info.optimizer_state is None:
            raise MissingArrayError(store.path / table,
                                    f"with_state=True needs optimizer state, and table "
                                    f"{table!r} has none; add the table with "
                                    f"optimizer_state='rowwise_adagrad'")
        num_slots = min(int(slots), info.num_rows)
        self._store = store
        self._table = table
        self._num_rows = info.num_rows
        self._dim = info.dim
        self._np_dtype = np.dtype(info.storage_dtype)
        self._dtype = _TORCH_DTYPES[info.dtype]
        self._device = torch.device(device)
        self._policy = make_policy(policy, info.num_rows, num_slots, profile)
        self._index = make_index(index, info.num_rows, num_slots)
        self._weights = torch.zeros((num_slots, info.dim), dtype=self._dtype,
                                    device=self._device)
        self._state = (torch.zeros(num_slots, dtype=torch.float32, device=self._device)
                       if with_state else None)
        self._host_rows: np.ndarray | None = None
        """On the CPU: a numpy view of ``_weights`` (bf16 as int16), for :meth:`_take`."""
        if self._device.type == "cpu":
            self._host_rows = (self._weights.view(torch.int16) if self._dtype == torch.bfloat16
                               else self._weights).numpy()
        self._state_width = info.state_width if with_state else 0
        self._row_bytes = info.dim * self._np_dtype.itemsize + 4 * self._state_width
        """Bytes one row moves: weights plus cached optimizer state."""
        self._slot_row = np.full(num_slots, -1, dtype=np.int64)
        self._dirty = np.zeros(num_slots, dtype=bool)
        self._filled = 0
        self._batches = 0
        self._counts = _Counters()
        self._worker = StoreWorker()
        store.on_close(self._worker.close)  # no background I/O on unmapped files
        self._write_behind = bool(write_behind)
        warm = self._policy.preload()
        if warm.size:
            weights, state = self._read_store(warm)
            self._counts.store_read += warm.size * self._row_bytes
            self._install(np.arange(warm.size), warm, weights, state)
            self._filled = warm.size
            self._counts.preloaded = warm.size

    # ---- description ------------------------------------------------------------------
    @property
    def table(self) -> str:
        return self._table

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_slots(self) -> int:
        return self._slot_row.size

    @property
    def weights(self) -> torch.Tensor:
        """The slots' rows (num_slots, dim) on the device; index with :meth:`lookup`."""
        return self._weights

    @property
    def state(self) -> torch.Tensor | None:
        """The slots' row-wise Adagrad state (num_slots,) fp32, or None."""
        return self._state

    def resident_rows(self) -> np.ndarray:
        """Row ids held in the slots, sorted."""
        return np.sort(self._slot_row[:self._filled])

    def dirty_rows(self) -> np.ndarray:
        """Row ids updated in the slots and not yet written back, sorted."""
        return np.sort(self._slot_row[np.flatnonzero(self._dirty)])

    def stats(self) -> CacheStats:
        c, w = self._counts, self._worker.counters
        return CacheStats(
            accesses=c.accesses, hits=c.hits, misses=c.misses, evictions=c.evictions,
            write_backs=c.write_backs, uncached=c.uncached, direct_updates=c.direct_updates,
            preloaded=c.preloaded, prefetched_rows=c.prefetched_rows,
            prefetch_discarded=w.discarded, background_read_s=w.read_s,
            background_write_s=w.write_s, background_wait_s=w.wait_s,
            background_hidden_s=w.hidden_s,
            store=TierBytes(read=c.store_read + w.bytes_read, written=c.store_written),
            device=TierBytes(read=c.device_read, written=c.device_written),
        )

    def __repr__(self) -> str:
        return (f"RowCache(table={self._table!r}, slots={self.num_slots}, "
                f"device={str(self._device)!r}, resident={self._filled}, "
                f"dirty={int(self._dirty.sum())})")

    # ---- reads ------------------------------------------------------------------------
    def lookup(self, ids: Any) -> torch.Tensor:
        """Make the rows of ``ids`` (1-D ints) resident; their slots (int64, on the device).

        Slot -1 marks a row served uncached (only when the batch has more distinct rows
        than the cache can hold); :meth:`gather` handles those.
        """
        rows = self._rows_of(ids)
        slots, _, _ = self._resolve(rows, read_uncached=False)
        return torch.from_numpy(slots).to(self._device)

    def gather(self, ids: Any) -> torch.Tensor:
        """The rows of ``ids`` (1-D ints): a (len(ids), dim) tensor of the table's dtype on
        the device. Works for any batch (see the module docstring)."""
        rows = self._rows_of(ids)
        slots, uncached, uncached_weights = self._resolve(rows, read_uncached=True)
        if uncached.size == 0:
            self._counts.device_read += rows.size * self._row_bytes
            return self._take(slots)
        slot_index = torch.from_numpy(slots).to(self._device)
        cached = slots >= 0
        out = torch.empty((rows.size, self._dim), dtype=self._dtype, device=self._device)
        where = torch.from_numpy(np.flatnonzero(cached)).to(self._device)
        out[where] = self._weights.index_select(0, slot_index[where])
        served = uncached_weights[np.searchsorted(uncached, rows[~cached])]
        elsewhere = torch.from_numpy(np.flatnonzero(~cached)).to(self._device)
        out[elsewhere] = self._to_torch(served)
        self._counts.device_read += int(cached.sum()) * self._row_bytes
        return out

    def prefetch(self, next_ids: Any) -> None:
        """Start reading, on a background thread, the rows of ``next_ids`` that are not
        resident now; the next lookup that misses uses them (see
        :mod:`storage.cache_worker`). Drops an older prefetch not yet used."""
        rows = _distinct(self._rows_of(next_ids))
        absent = rows[self._index.find(rows) < 0]
        self._worker.read(self._read_store, absent)

    # ---- optimizer steps ----------------------------------------------------------------
    def apply_sgd(self, ids: Any, grads: torch.Tensor, lr: float) -> None:
        """SGD on the rows of ``ids``: ``w -= lr * g`` with ``g`` the summed gradient
        of each distinct id (``grads``: (len(ids), dim))."""
        self._check_update("apply_sgd", lr, 0.0)
        rows, summed = self._coalesce(ids, grads)
        self._update(rows, summed, lambda w, s, g: (w - lr * g, s), needs_state=False)

    def apply_rowwise_adagrad(self, ids: Any, grads: torch.Tensor, lr: float,
                              eps: float = 1e-8) -> None:
        """Row-wise Adagrad on the rows of ``ids``, with ``g`` the summed gradient of each
        distinct id: ``s += mean(g**2)``; ``w -= lr * g / (sqrt(s) + eps)``."""
        self._check_update("apply_rowwise_adagrad", lr, eps)
        if self._state is None:
            raise CacheArgumentError(f"table {self._table!r}: apply_rowwise_adagrad needs the "
                                     f"cache built with with_state=True")
        rows, summed = self._coalesce(ids, grads)

        def step(w: torch.Tensor, s: torch.Tensor | None, g: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            if s is None:  # pragma: no cover - _update passes the state when asked
                raise CacheArgumentError("row-wise Adagrad needs the optimizer state")
            s = s + g.pow(2).mean(dim=1)
            return w - lr * g / (torch.sqrt(s).unsqueeze(1) + eps), s

        self._update(rows, summed, step, needs_state=True)

    def mark_dirty(self, slots: Any) -> None:
        """The caller updated the rows in ``slots`` (int, on the device or host; repeats
        allowed) in place in :attr:`weights` (and :attr:`state`), e.g. with its own fused
        optimizer step on the slots of the last :meth:`lookup`: write them back on
        eviction and at :meth:`flush`. Refused over a read-only store; every slot must
        hold a row."""
        if self._store.mode != "r+":
            raise ReadOnlyStoreError(self._store.path, f"RowCache.mark_dirty on table "
                                                       f"{self._table!r}")
        index = torch_to_numpy(slots) if is_torch_tensor(slots) else np.asarray(slots)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise RowShapeError(self._table, f"slots must be a 1-D integer array, got shape "
                                             f"{index.shape} and dtype {index.dtype}")
        if index.size == 0:
            return
        index = index.astype(np.int64, copy=False)
        if int(index.min()) < 0 or int(index.max()) >= self._filled:
            raise CacheArgumentError(f"table {self._table!r}: mark_dirty needs slots holding "
                                     f"rows (0..{self._filled - 1}), got "
                                     f"{int(index.min())}..{int(index.max())}")
        self._dirty[index] = True
        self._worker.invalidate(self._slot_row[index])
        moved = index.size * self._row_bytes
        self._counts.device_read += moved
        self._counts.device_written += moved

    # ---- durability ---------------------------------------------------------------------
    def flush(self) -> None:
        """Write every dirty row (and its state) back to the store in one scatter; the
        rows stay cached, clean; returns when every write is done (background ones
        too). Then ``store.checkpoint(step)`` makes them durable."""
        self._worker.settle()
        dirty = np.flatnonzero(self._dirty)
        if dirty.size:
            self._write_back(dirty)
        self._worker.settle()

    def settle(self) -> None:
        """Wait for the background store work (prefetch, write-behind) to finish, e.g.
        before using the store directly; re-raises its errors."""
        self._worker.settle()

    def close(self) -> None:
        """Finish the background store work and stop its thread. Does *not* write dirty
        rows back (like ``TableStore.close``, which drops writes after the last checkpoint):
        call :meth:`flush` and ``store.checkpoint`` first to keep them."""
        self._worker.close()

    def __enter__(self) -> RowCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- residency ----------------------------------------------------------------------
    def _resolve(self, rows: np.ndarray, read_uncached: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Make ``rows`` resident: ``(slots, uncached rows, their weights or None)``."""
        batch = self._batches
        self._batches += 1
        slots = self._index.find(rows)
        miss = slots < 0
        uncached: np.ndarray = _NO_ROWS
        uncached_weights = None
        missed = 0
        if miss.any():
            missed, uncached, uncached_weights = self._fill(rows, slots, miss, read_uncached)
        self._policy.on_access(slots, rows, batch)
        c = self._counts
        c.accesses += rows.size
        c.misses += missed
        c.hits += rows.size - missed
        return slots, uncached, uncached_weights

    def _fill(self, rows: np.ndarray, slots: np.ndarray, miss: np.ndarray, read_uncached: bool
              ) -> tuple[int, np.ndarray, np.ndarray | None]:
        """Load the missing rows of a batch into slots (``slots`` is updated in place).

        Returns the number of distinct missing rows, the sorted rows served uncached and,
        with ``read_uncached``, their weights.
        """
        missing_uses = rows[miss]
        missing = _distinct(missing_uses)
        protected = np.zeros(self.num_slots, dtype=bool)
        protected[slots[~miss]] = True
        room = self.num_slots - int(np.count_nonzero(protected))
        cached, uncached = missing, _NO_ROWS
        if missing.size > room:
            cached = _most_used(missing_uses, missing, room)
            uncached = missing[~np.isin(missing, cached, assume_unique=True)]
            self._counts.uncached += uncached.size
        wanted = cached
        if read_uncached and uncached.size:  # one gather for both (disjoint, so just sort)
            wanted = np.sort(np.concatenate([cached, uncached]))
        weights, state = self._fetch(wanted)
        uncached_weights = None
        if wanted is not cached:
            in_cache = np.isin(wanted, cached, assume_unique=True)
            uncached_weights = weights[~in_cache]
            weights = weights[in_cache]
            state = None if state is None else state[in_cache]
        new_slots = self._make_room(cached.size, protected)  # after the read: write-behind
        self._install(new_slots, cached, weights, state)
        if cached.size:
            at = np.minimum(np.searchsorted(cached, missing_uses), cached.size - 1)
            slots[miss] = np.where(cached[at] == missing_uses, new_slots[at], -1)
        else:
            slots[miss] = -1
        return missing.size, uncached, uncached_weights

    def _make_room(self, count: int, protected: np.ndarray) -> np.ndarray:
        """``count`` slots for new rows: free ones first, then victims of the policy among
        the filled, unprotected slots (dirty victims written back first, so that a
        failed write changes nothing here)."""
        filled = self._filled
        free = min(self.num_slots - filled, count)
        need = count - free
        victims = _NO_ROWS
        if need > 0:
            candidates = np.flatnonzero(~protected[:filled])
            victims = candidates[self._policy.victims(need, candidates,
                                                      self._slot_row[candidates])]
            dirty = victims[self._dirty[victims]]
            if dirty.size:
                self._write_back(dirty)
            self._index.remove(self._slot_row[victims])
            self._slot_row[victims] = -1
            self._counts.evictions += victims.size
        self._filled += free
        return np.concatenate([np.arange(filled, filled + free, dtype=np.int64), victims])

    def _install(self, slots: np.ndarray, rows: np.ndarray, weights: np.ndarray,
                 state: np.ndarray | None) -> None:
        """Put ``rows`` (with their ``weights`` and ``state`` from the store) in ``slots``."""
        if slots.size == 0:
            return
        index = torch.from_numpy(slots).to(self._device)
        self._weights.index_copy_(0, index, self._to_torch(weights))
        if self._state is not None and state is not None:
            self._state.index_copy_(0, index, torch.from_numpy(state[:, 0]).to(self._device))
        self._slot_row[slots] = rows
        self._dirty[slots] = False
        self._index.insert(rows, slots)
        self._counts.device_written += slots.size * self._row_bytes

    # ---- store traffic --------------------------------------------------------------------
    def _read_store(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Weights (and cached state) of ``rows`` from the store; may run on the prefetch
        thread."""
        weights = self._store.gather(self._table, rows)
        state = self._store.gather_state(self._table, rows) if self._state is not None else None
        return weights, state

    def _fetch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Weights and state of ``rows`` (sorted, distinct): from the prefetch where it
        holds them, the rest in one gather. Consumes the prefetch (unless ``rows`` is empty)."""
        if rows.size == 0:
            state = np.zeros((0, self._state_width), np.float32) if self._state is not None \
                else None
            return np.zeros((0, self._dim), dtype=self._np_dtype), state
        taken = self._worker.take()
        if taken is None:
            weights, state = self._read_store(rows)
            self._counts.store_read += rows.size * self._row_bytes
            return weights, state
        ready, valid = taken
        at = np.minimum(np.searchsorted(ready.rows, rows), max(ready.rows.size - 1, 0))
        hit = (ready.rows[at] == rows) & valid[at]
        used = int(hit.sum())
        self._counts.prefetched_rows += used
        self._worker.count_discarded(ready.rows.size - used)
        weights = np.empty((rows.size, self._dim), dtype=self._np_dtype)
        weights[hit] = ready.weights[at[hit]]
        state = None
        if self._state is not None and ready.state is not None:
            state = np.empty((rows.size, self._state_width), dtype=np.float32)
            state[hit] = ready.state[at[hit]]
        rest = ~hit
        if rest.any():
            more_weights, more_state = self._read_store(rows[rest])
            weights[rest] = more_weights
            if state is not None and more_state is not None:
                state[rest] = more_state
            self._counts.store_read += int(rest.sum()) * self._row_bytes
        return weights, state

    def _write_back(self, slots: np.ndarray) -> None:
        """Write the rows in ``slots`` (and their state) to the store, sorted by row: on
        the background thread with write-behind (their data copied out first)."""
        rows = self._slot_row[slots]
        order = np.argsort(rows)
        rows, slots = rows[order], slots[order]
        index = torch.from_numpy(slots).to(self._device)
        weights = torch_to_numpy(self._weights.index_select(0, index))  # a copy
        state = None
        if self._state is not None:
            state = torch_to_numpy(self._state.index_select(0, index)).reshape(-1, 1)
        store, table = self._store, self._table

        def write() -> None:
            store.scatter(table, rows, weights)
            if state is not None:
                store.scatter_state(table, rows, state)

        self._worker.invalidate(rows)
        if self._write_behind:
            self._worker.write(write)
        else:
            self._worker.settle()
            write()
        self._dirty[slots] = False
        c = self._counts
        c.write_backs += rows.size
        c.store_written += rows.size * self._row_bytes
        c.device_read += rows.size * self._row_bytes

    # ---- updates ----------------------------------------------------------------------------
    def _check_update(self, operation: str, lr: float, eps: float) -> None:
        if self._store.mode != "r+":
            raise ReadOnlyStoreError(self._store.path, f"RowCache.{operation} on table "
                                                       f"{self._table!r}")
        for name, value in (("lr", lr), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                    or not np.isfinite(value):
                raise CacheArgumentError(f"{operation}: {name} must be a finite number, "
                                         f"got {value!r}")

    def _coalesce(self, ids: Any, grads: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Sorted distinct rows of ``ids`` and their summed gradients (fp32, on the device)."""
        rows = self._rows_of(ids)
        if not isinstance(grads, torch.Tensor) or not grads.is_floating_point() \
                or tuple(grads.shape) != (rows.size, self._dim):
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads)
            raise RowShapeError(self._table, f"grads must be a floating-point tensor of shape "
                                             f"({rows.size}, {self._dim}), got {shape}")
        distinct, inverse = _distinct_inverse(rows)
        summed = torch.zeros((distinct.size, self._dim), dtype=torch.float32,
                             device=self._device)
        summed.index_add_(0, torch.from_numpy(inverse).to(self._device),
                          grads.to(device=self._device, dtype=torch.float32))
        return distinct, summed

    def _update(self, rows: np.ndarray, grads: torch.Tensor, step: Step,
                needs_state: bool) -> None:
        """Apply ``step(w_fp32, state, g) -> (w, state)`` to ``rows``: in their slots, or
        in the store for rows not resident."""
        slots = self._index.find(rows)
        present = slots >= 0
        if present.any():
            index = torch.from_numpy(slots[present]).to(self._device)
            g = grads if present.all() else grads[torch.from_numpy(
                np.flatnonzero(present)).to(self._device)]
            w = self._weights.index_select(0, index).float()
            s = self._state.index_select(0, index) if needs_state and self._state is not None \
                else None
            w, s = step(w, s, g)
            self._weights.index_copy_(0, index, w.to(self._dtype))
            if s is not None and self._state is not None:
                self._state.index_copy_(0, index, s)
            self._dirty[slots[present]] = True
            moved = int(present.sum()) * self._row_bytes
            self._counts.device_read += moved
            self._counts.device_written += moved
        if not present.all():
            absent = np.flatnonzero(~present)
            self._update_in_store(rows[absent], grads[torch.from_numpy(absent).to(
                self._device)], step, needs_state)

    def _update_in_store(self, rows: np.ndarray, grads: torch.Tensor, step: Step,
                         needs_state: bool) -> None:
        """Read, step and write back rows that are not resident (sorted, distinct)."""
        self._worker.settle()
        store, table = self._store, self._table
        w = self._to_torch(store.gather(table, rows)).float()
        s = None
        if needs_state:
            s = torch.from_numpy(store.gather_state(table, rows)[:, 0]).to(self._device)
        w, s = step(w, s, grads)
        self._worker.invalidate(rows)  # first: even a failed write may have changed them
        store.scatter(table, rows, torch_to_numpy(w.to(self._dtype)))
        if s is not None:
            store.scatter_state(table, rows, torch_to_numpy(s).reshape(-1, 1))
        row_bytes = self._dim * self._np_dtype.itemsize + (4 if needs_state else 0)
        c = self._counts
        c.direct_updates += rows.size
        c.write_backs += rows.size
        c.store_read += rows.size * row_bytes
        c.store_written += rows.size * row_bytes

    # ---- conversions ----------------------------------------------------------------------
    def _rows_of(self, ids: Any) -> np.ndarray:
        """``ids`` as validated int64 row ids on the host (the store's errors)."""
        array = torch_to_numpy(ids) if is_torch_tensor(ids) else np.asarray(ids)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise RowShapeError(self._table, f"ids must be a 1-D integer array, got shape "
                                             f"{array.shape} and dtype {array.dtype}")
        array = array.astype(np.int64, copy=False)
        if array.size:
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= self._num_rows:
                raise RowIndexError(self._table, low if low < 0 else high, self._num_rows)
        return array

    def _take(self, slots: np.ndarray) -> torch.Tensor:
        """Rows of ``slots`` (all >= 0) as a new tensor on the device.

        On the CPU through numpy's ``take`` on the slots' memory: torch's CPU
        ``index_select`` splits small gathers over its intra-op threads, and on a
        shared 2-core machine it measured 2-3x slower than one thread (bench/cache.py).
        """
        if self._host_rows is None:
            return self._weights.index_select(0, torch.from_numpy(slots).to(self._device))
        taken = torch.from_numpy(np.take(self._host_rows, slots, axis=0))
        return taken.view(torch.bfloat16) if self._dtype == torch.bfloat16 else taken

    def _to_torch(self, stored: np.ndarray) -> torch.Tensor:
        """Rows in the store's dtype (bf16: uint16 bits) as a tensor on the device."""
        stored = np.ascontiguousarray(stored)
        if self._dtype == torch.bfloat16:
            tensor = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(stored)
        return tensor.to(self._device)


_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_ROWS.flags.writeable = False


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a sort and a mask; np.unique is ~20x slower here)."""
    ranked = np.sort(values)
    if ranked.size < 2:
        return ranked
    keep = np.empty(ranked.size, dtype=bool)
    keep[0] = True
    np.not_equal(ranked[1:], ranked[:-1], out=keep[1:])
    return ranked[keep]


def _distinct_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and, per value, the index of its distinct value."""
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    starts = np.empty(ranked.size, dtype=bool)
    if ranked.size:
        starts[0] = True
        np.not_equal(ranked[1:], ranked[:-1], out=starts[1:])
    inverse = np.empty(values.size, dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return ranked[starts], inverse


def _most_used(uses: np.ndarray, distinct: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` values of ``distinct`` most frequent in ``uses`` (ties: smaller
    value first), sorted."""
    frequency = np.bincount(np.searchsorted(distinct, uses), minlength=distinct.size)
    chosen = np.argsort(-frequency, kind="stable")[:count]
    return np.sort(distinct[chosen])
