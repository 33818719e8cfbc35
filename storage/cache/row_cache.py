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
* also on ``device``, as tensors updated by batched tensor ops: the row -> slot index
  (:mod:`storage.cache.index`: a dense int32 tensor of one entry per table row up to
  64 M rows, sorted keys above), the slot -> row tensor, the dirty bits and the
  policy's state (:mod:`storage.cache.policy`: per-slot recency keys, per-row counts);
  victims are chosen with ``topk``.

Host synchronisation. The ids stay on the device. Everything the cache reads back
to the host goes through one function, :func:`~storage.cache.host.sync_to_host` (ops
whose output size depends on the data, boolean masks and ``unique``, run only inside
it), and in the per-batch path that is only: the distinct missing rows of a lookup (with three
scalars read in the same transfer: the ids' bounds, checked there, and the number of
slots the batch hits), the rows a prefetch must read, the distinct-row count of an
``apply_*`` call (with the rows it must update in the store, if any), and the evicted
rows' data to write back (with ``write_behind=True`` the copy is queued and the
background thread waits for it). So on CUDA a lookup waits for the device once, to
read its misses (a second time only with ``write_behind=False`` when it evicts), and
:func:`lookup_many` reads the misses of every cache of a device in one transfer;
``mark_dirty`` checks its slots with a device-side assertion. ``flush``,
``resident_rows``, ``dirty_rows`` and batches larger than the cache read more. On the
CPU, where reading back copies nothing, a lookup checks the ids' bounds first and works
out the slots it must protect and its distinct misses only when it misses, and an
``apply_*`` of the ids just looked up reuses their slots.

Batch semantics. ``lookup``/``gather`` make every row of the batch resident at
once: hits are counted, the batch's distinct missing rows are read from the store
in one gather (weights, and one of the optimizer state), victims are chosen by the
policy among the slots the batch does not use, and the dirty ones are written back
in one scatter (sorted by row, so the store writes chunk by chunk), in the lookup
or, with ``write_behind=True``, on the background thread (their data copied out of
the slots first, so the store write does not stall the lookup). If the batch
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

Threads (:mod:`storage.cache.worker`): prefetch reads and write-behind run in order
on one background thread (or at once in the caller's thread, ``background=False``), and the cache itself touches the store only after that
thread's queue is empty, so the store is never used by two threads at once *through
the cache*. The caller must keep that too: call :meth:`RowCache.flush` (before
``store.checkpoint``), :meth:`RowCache.settle` (before other direct use of the
store) or :meth:`RowCache.close` (before ``store.close``). The cache itself is not
thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch

from storage.cache.gradients import Coalesced, Step, coalesce
from storage.cache.host import sync_to_host
from storage.cache.index import IndexKind, make_index
from storage.cache.policy import Lookahead, SlotView, make_policy
from storage.cache.stats import CacheStats, Counters, TierBytes
from storage.cache.store_rows import StoreRows
from storage.cache.worker import StoreWorker
from storage.dtypes import StoreDType, torch_to_numpy
from storage.errors import (
    CacheArgumentError,
    MissingArrayError,
    ReadOnlyStoreError,
    RowIndexError,
    RowShapeError,
)
from storage.row_update import ADAGRAD_EPS, rowwise_adagrad, sgd
from storage.store import TableStore

_TORCH_DTYPES = {StoreDType.FP32: torch.float32, StoreDType.FP16: torch.float16,
                 StoreDType.BF16: torch.bfloat16}


@dataclass(frozen=True, slots=True)
class _Probe:
    """A batch's ids on the device, looked up in the index: ``rows``, ``clamped`` (into
    the table, for the index), their ``slots`` (-1: missing), ``miss`` and the
    ``protected`` slots (the ones it hits; ``num_slots + 1`` entries)."""

    rows: torch.Tensor
    clamped: torch.Tensor
    slots: torch.Tensor
    miss: torch.Tensor
    protected: torch.Tensor


class RowCache:
    """Rows of one table of ``store`` in ``slots`` slots on ``device``; see the module
    docstring.

    ``slots``: rows the cache holds (clamped to the table's rows).
    ``policy``: ``"lru"``, ``"lfu"``, ``"profile"`` or ``"lookahead"``
    (:mod:`storage.cache.policy`; the lookahead policy keeps the rows that
    :meth:`prefetch` or :meth:`announce` said come next); ``profile``: per-row access
    counts, required by ``"profile"``, optional for ``"lookahead"``: its hottest rows
    are loaded here, in one gather. ``with_state``: also cache the row-wise
    Adagrad state (the table must have ``optimizer_state="rowwise_adagrad"``).
    ``index``: ``"auto"``, ``"dense"`` or ``"sorted"`` (:mod:`storage.cache.index`).
    ``write_behind``: write evicted dirty rows back on the background thread
    (:mod:`storage.cache.worker`) instead of inside the lookup that evicts them; their
    data is copied out of the slots without waiting for the device.
    ``background``: run prefetch reads and write-behind on the background thread
    (default); False runs them at once in the caller's thread, with the same results
    (:class:`~storage.cache.worker.StoreWorker`), e.g. for a cache on the CPU.
    """

    def __init__(self, store: TableStore, table: str, *, slots: int,
                 device: torch.device | str = "cpu", policy: str = "lru",
                 profile: np.ndarray | None = None, with_state: bool = False,
                 index: IndexKind = "auto", write_behind: bool = False,
                 background: bool = True) -> None:
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
        self._num_slots = num_slots
        self._dim = info.dim
        self._np_dtype = np.dtype(info.storage_dtype)
        self._dtype = _TORCH_DTYPES[info.dtype]
        self._device = torch.device(device)
        self._policy = make_policy(policy, info.num_rows, num_slots, profile, self._device)
        self._index = make_index(index, info.num_rows, num_slots, self._device)
        # one spare row/entry past the slots: where writes for slot -1 go
        self._weights_all = torch.zeros((num_slots + 1, info.dim), dtype=self._dtype,
                                        device=self._device)
        self._weights = self._weights_all[:num_slots]
        self._state_all = (torch.zeros(num_slots + 1, dtype=torch.float32, device=self._device)
                           if with_state else None)
        self._state = None if self._state_all is None else self._state_all[:num_slots]
        self._host_rows: np.ndarray | None = None
        """On the CPU: a numpy view of ``_weights`` (bf16 as int16), for :meth:`_take`."""
        if self._device.type == "cpu":
            self._host_rows = (self._weights.view(torch.int16) if self._dtype == torch.bfloat16
                               else self._weights).numpy()
        self._slot_row = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=self._device)
        self._scratch: np.ndarray | None = None
        self._last_lookup: tuple[np.ndarray, np.ndarray] | None = None
        """On the CPU: the ids of the latest lookup and their slots (copies), while every
        one has a slot and nothing came since: an ``apply_*`` of the same ids uses them
        (residency changes only in lookups)."""
        self._dirty = torch.zeros(num_slots + 1, dtype=torch.bool, device=self._device)
        self._filled = 0
        self._batches = 0
        self._counts = Counters()
        self._worker = StoreWorker(threaded=bool(background))
        store.on_close(self._worker.close)  # no background I/O on unmapped files
        self._store_rows = StoreRows(store, table, self._worker, self._counts, dim=info.dim,
                                     np_dtype=self._np_dtype,
                                     state_width=info.state_width if with_state else 0)
        self._row_bytes = self._store_rows.row_bytes
        """Bytes one row moves: weights plus cached optimizer state."""
        self._write_behind = bool(write_behind)
        warm = self._policy.preload()
        if warm.size:
            weights, state = self._store_rows.read(warm)
            self._counts.store_read += warm.size * self._row_bytes
            self._install(torch.arange(warm.size, device=self._device), warm, weights, state)
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
    def background(self) -> bool:
        """Whether prefetch reads and write-behind run on a background thread."""
        return self._worker.threaded

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def weights(self) -> torch.Tensor:
        """The slots' rows (num_slots, dim) on the device; index with :meth:`lookup`."""
        return self._weights

    @property
    def state(self) -> torch.Tensor | None:
        """The slots' row-wise Adagrad state (num_slots,) fp32, or None."""
        return self._state

    def resident_rows(self) -> np.ndarray:
        """Row ids held in the slots, sorted (reads them back from the device)."""
        filled = self._filled
        (rows,) = sync_to_host(lambda: [self._slot_row[:filled]]).arrays()
        return np.sort(rows)

    def dirty_rows(self) -> np.ndarray:
        """Row ids updated in the slots and not yet written back, sorted (reads them back
        from the device)."""
        filled = self._filled
        (rows,) = sync_to_host(
            lambda: [self._slot_row[:filled][self._dirty[:filled]]]).arrays()
        return np.sort(rows)

    def stats(self) -> CacheStats:
        c, w = self._counts, self._worker.counters
        behind = w.written_rows * self._row_bytes
        return CacheStats(
            accesses=c.accesses, hits=c.hits, misses=c.misses, evictions=c.evictions,
            write_backs=c.write_backs + w.written_rows, uncached=c.uncached,
            direct_updates=c.direct_updates,
            preloaded=c.preloaded, prefetched_rows=c.prefetched_rows,
            prefetch_discarded=w.discarded, background_read_s=w.read_s,
            background_write_s=w.write_s, background_wait_s=w.wait_s,
            background_hidden_s=w.hidden_s,
            store=TierBytes(read=c.store_read + w.bytes_read, written=c.store_written + behind),
            device=TierBytes(read=c.device_read + behind, written=c.device_written),
        )

    def __repr__(self) -> str:
        return (f"RowCache(table={self._table!r}, slots={self.num_slots}, "
                f"device={str(self._device)!r}, resident={self._filled}, "
                f"dirty={self.dirty_rows().size})")

    # ---- reads ------------------------------------------------------------------------
    def lookup(self, ids: Any) -> torch.Tensor:
        """Make the rows of ``ids`` (1-D ints) resident; their slots (int64, on the device).

        Slot -1 marks a row served uncached (only when the batch has more distinct rows
        than the cache can hold); :meth:`gather` handles those.
        """
        rows = self._device_rows(ids)
        slots, _, _ = self._resolve(rows, read_uncached=False)
        return slots

    def gather(self, ids: Any) -> torch.Tensor:
        """The rows of ``ids`` (1-D ints): a (len(ids), dim) tensor of the table's dtype on
        the device. Works for any batch (see the module docstring)."""
        rows = self._device_rows(ids)
        slots, uncached, uncached_weights = self._resolve(rows, read_uncached=True)
        if uncached.size == 0 or uncached_weights is None:
            self._counts.device_read += rows.numel() * self._row_bytes
            return self._take(slots)
        cached = slots >= 0
        out = self._weights_all.index_select(0, torch.where(cached, slots, self._num_slots))
        positions, which = sync_to_host(
            lambda: [torch.nonzero(~cached).squeeze(1), rows[~cached]]).arrays()
        served = uncached_weights[np.searchsorted(uncached, which)]
        out[torch.from_numpy(positions).to(self._device)] = self._to_torch(served)
        self._counts.device_read += (rows.numel() - positions.size) * self._row_bytes
        return out

    def prefetch(self, next_ids: Any) -> None:
        """Start reading, on a background thread (at once with ``background=False``),
        the rows of ``next_ids`` that are not resident now; the next lookup that misses
        uses them (see :mod:`storage.cache.worker`). Drops an older prefetch not yet used. With the
        ``"lookahead"`` policy, also :meth:`announce` them."""
        rows = self._device_rows(next_ids)
        if rows.numel() == 0:
            self._worker.read(self._store_rows.read, _NO_ROWS)
            return
        clamped = rows.clamp(0, self._num_rows - 1)
        absent = self._index.find(clamped) < 0
        head, missing = sync_to_host(
            lambda: [torch.stack(list(torch.aminmax(rows))),
                     torch.unique(rows[absent], sorted=True)]).arrays()
        self._check_bounds(head)
        if isinstance(self._policy, Lookahead):
            self._policy.announce(rows)
        self._worker.read(self._store_rows.read, missing.astype(np.int64, copy=False))

    def announce(self, next_ids: Any) -> None:
        """Tell the ``"lookahead"`` policy the ids coming next, in order (the ids of the
        next batches; they replace the previous announcement); the lookups that follow
        keep those rows over others when they evict. Reads nothing (see
        :meth:`prefetch`); a no-op for the other policies."""
        rows = self._device_rows(next_ids)
        if rows.numel():
            (head,) = sync_to_host(lambda: [torch.stack(list(torch.aminmax(rows)))]).arrays()
            self._check_bounds(head)
        if isinstance(self._policy, Lookahead):
            self._policy.announce(rows)

    # ---- optimizer steps ----------------------------------------------------------------
    def apply_sgd(self, ids: Any, grads: torch.Tensor, lr: float) -> None:
        """SGD on the rows of ``ids``: ``w -= lr * g`` with ``g`` the summed gradient
        of each distinct id (``grads``: (len(ids), dim))."""
        self._check_update("apply_sgd", lr, 0.0)
        batch = self._coalesce(ids, grads)
        if self._dtype == torch.float32 and not batch.absent:
            # in place: w + (-(lr * g)) rounds exactly like w - lr * g
            self._weights.index_add_(0, batch.slots, batch.grads.mul_(-lr))
            self._dirty.index_fill_(0, batch.slots, True)
            moved = batch.slots.numel() * self._row_bytes
            self._counts.device_read += moved
            self._counts.device_written += moved
            return
        self._update(batch, lambda w, s, g: (sgd(w, g, lr), s), needs_state=False)

    def apply_rowwise_adagrad(self, ids: Any, grads: torch.Tensor, lr: float,
                              eps: float = ADAGRAD_EPS) -> None:
        """Row-wise Adagrad on the rows of ``ids``, with ``g`` the summed gradient of each
        distinct id: ``s += mean(g**2)``; ``w -= lr * g / (sqrt(s) + eps)``
        (:func:`storage.row_update.rowwise_adagrad`)."""
        self._check_update("apply_rowwise_adagrad", lr, eps)
        if self._state is None:
            raise CacheArgumentError(f"table {self._table!r}: apply_rowwise_adagrad needs the "
                                     f"cache built with with_state=True")
        batch = self._coalesce(ids, grads)

        def step(w: torch.Tensor, s: torch.Tensor | None, g: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            if s is None:  # pragma: no cover - _update passes the state when asked
                raise CacheArgumentError("row-wise Adagrad needs the optimizer state")
            return rowwise_adagrad(w, s, g, lr, eps)

        self._update(batch, step, needs_state=True)

    def mark_dirty(self, slots: Any) -> None:
        """The caller updated the rows in ``slots`` (int, on the device or host; repeats
        allowed) in place in :attr:`weights` (and :attr:`state`), e.g. with its own fused
        optimizer step on the slots of the last :meth:`lookup`: write them back on
        eviction and at :meth:`flush`. Refused over a read-only store; every slot must
        hold a row (checked on the host for a CPU cache, by a device-side assertion on
        other devices, so that no call waits for the device)."""
        if self._store.mode != "r+":
            raise ReadOnlyStoreError(self._store.path, f"RowCache.mark_dirty on table "
                                                       f"{self._table!r}")
        index = self._device_ints(slots, "slots")
        if index.numel() == 0:
            return
        message = f"table {self._table!r}: mark_dirty needs slots holding rows " \
                  f"(0..{self._filled - 1})"
        if self._device.type == "cpu":
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= self._filled:
                raise CacheArgumentError(f"{message}, got {low}..{high}")
        else:
            torch._assert_async(((index >= 0) & (index < self._filled)).all(), message)
        # no prefetch to invalidate: a pending prefetch holds only rows that were absent
        # when it was queued, and none becomes resident before a lookup consumes it
        self._dirty.index_fill_(0, index, True)
        moved = index.numel() * self._row_bytes
        self._counts.device_read += moved
        self._counts.device_written += moved

    # ---- durability ---------------------------------------------------------------------
    def flush(self) -> None:
        """Write every dirty row (and its state) back to the store in one scatter; the
        rows stay cached, clean; returns when every write is done (background ones
        too). Then ``store.checkpoint(step)`` makes them durable."""
        self._worker.settle()
        filled = self._filled
        (dirty,) = sync_to_host(
            lambda: [torch.nonzero(self._dirty[:filled]).squeeze(1)]).arrays()
        if dirty.size:
            self._write_back(torch.from_numpy(dirty).to(self._device))
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
    def _resolve(self, rows: torch.Tensor, read_uncached: bool
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
        """Make ``rows`` resident: ``(slots, uncached rows, their weights or None)``."""
        if rows.numel() == 0:
            self._batches += 1
            return rows.new_zeros(0), _NO_ROWS, None
        if self._device.type == "cpu":
            return self._resolve_host(rows, read_uncached)
        probe = self._probe(rows)
        head, missing, uses = sync_to_host(
            lambda: _misses(rows, probe.miss, probe.protected)).arrays()
        self._check_bounds(head)
        return self._settle_batch(probe, int(head[2]), missing, uses, read_uncached)

    def _resolve_host(self, rows: torch.Tensor, read_uncached: bool
                      ) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
        """:meth:`_resolve` on the CPU, where reading back costs nothing: the ids' bounds
        are checked before the index is searched (no clamping), and the slots the batch
        hits and its distinct misses are worked out only when it misses (numpy's
        ``unique``: about 5x torch's on the CPU here)."""
        self._last_lookup = None
        ids = rows.numpy()
        self._check_bounds(np.array([ids.min(), ids.max()]))
        slots = self._index.find(rows)
        miss = slots < 0
        absent = miss.numpy()
        if not absent.any():
            self._record(slots, rows, 0)
            self._last_lookup = (ids.copy(), slots.numpy().copy())
            return slots, _NO_ROWS, None
        protected = np.zeros(self._num_slots + 1, dtype=bool)
        protected[slots.numpy()[~absent]] = True
        missing, uses = np.unique(ids[absent], return_counts=True)
        probe = _Probe(rows, rows, slots, miss, torch.from_numpy(protected))
        resolved = self._settle_batch(probe, int(np.count_nonzero(protected)), missing, uses,
                                      read_uncached)
        if resolved[1].size == 0:  # every row has a slot
            self._last_lookup = (ids.copy(), resolved[0].numpy().copy())
        return resolved

    def _probe(self, rows: torch.Tensor) -> _Probe:
        """The device half of a lookup, before anything is read back."""
        clamped = rows.clamp(0, self._num_rows - 1)  # bad ids are refused after the read
        slots = self._index.find(clamped)
        miss = slots < 0
        protected = torch.zeros(self._num_slots + 1, dtype=torch.bool, device=self._device)
        protected.index_fill_(0, torch.where(miss, self._num_slots, slots), True)
        return _Probe(rows, clamped, slots, miss, protected)

    def _settle_batch(self, probe: _Probe, used_slots: int, missing: np.ndarray,
                      uses: np.ndarray, read_uncached: bool
                      ) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
        """The rest of a lookup, once its distinct ``missing`` rows (sorted, with their
        ``uses``) and the number of slots it hits are on the host."""
        slots = probe.slots
        uncached: np.ndarray = _NO_ROWS
        uncached_weights = None
        if missing.size:
            uncached, uncached_weights = self._fill(missing.astype(np.int64, copy=False),
                                                    uses, used_slots, probe.protected,
                                                    read_uncached)
            slots = self._refind(probe)
        self._record(slots, probe.rows, missing.size)
        return slots, uncached, uncached_weights

    def _record(self, slots: torch.Tensor, rows: torch.Tensor, misses: int) -> None:
        """The policy and the counters see the batch: ``rows`` now in ``slots`` (-1:
        served uncached), ``misses`` of them distinct rows that were not resident."""
        self._policy.on_access(slots, rows, self._batches)
        self._batches += 1
        c = self._counts
        c.accesses += rows.numel()
        c.misses += misses
        c.hits += rows.numel() - misses

    def _refind(self, probe: _Probe) -> torch.Tensor:
        """The slots of ``probe``'s rows once its missing rows are in: the hits keep
        theirs (their slots were protected); on the CPU only the missing ones are
        searched again."""
        if self._device.type != "cpu":
            return self._index.find(probe.clamped)
        where = torch.from_numpy(np.flatnonzero(probe.miss.numpy()))
        slots = probe.slots.clone()
        slots[where] = self._index.find(probe.clamped[where])
        return slots

    def _check_bounds(self, head: np.ndarray) -> None:
        """Refuse ids outside the table (``head`` starts with their min and max)."""
        low, high = int(head[0]), int(head[1])
        if low < 0 or high >= self._num_rows:
            raise RowIndexError(self._table, low if low < 0 else high, self._num_rows)

    def _fill(self, missing: np.ndarray, uses: np.ndarray, used_slots: int,
              protected: torch.Tensor, read_uncached: bool
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """Load the batch's ``missing`` rows (sorted, distinct; ``uses[i]`` ids of the
        batch each) into slots. Returns the sorted rows served uncached and, with
        ``read_uncached``, their weights."""
        room = self._num_slots - used_slots
        cached, uncached = missing, _NO_ROWS
        if missing.size > room:  # the most used get slots (ties: lower row id)
            cached = np.sort(missing[np.argsort(-uses, kind="stable")[:room]])
            uncached = missing[~np.isin(missing, cached, assume_unique=True)]
            self._counts.uncached += uncached.size
        wanted = cached
        if read_uncached and uncached.size:  # one gather for both (disjoint, so just sort)
            wanted = np.sort(np.concatenate([cached, uncached]))
        weights, state = self._store_rows.fetch(wanted)
        uncached_weights = None
        if wanted is not cached:
            in_cache = np.isin(wanted, cached, assume_unique=True)
            uncached_weights = weights[~in_cache]
            weights = weights[in_cache]
            state = None if state is None else state[in_cache]
        new_slots = self._make_room(cached.size, protected)  # after the read: write-behind
        self._install(new_slots, cached, weights, state)
        return uncached, uncached_weights

    def _make_room(self, count: int, protected: torch.Tensor) -> torch.Tensor:
        """``count`` slots for new rows: free ones first, then victims of the policy among
        the filled, unprotected slots (dirty victims written back first, so that a
        failed write changes nothing here)."""
        filled = self._filled
        free = min(self.num_slots - filled, count)
        need = count - free
        fresh = torch.arange(filled, filled + free, device=self._device)
        if need <= 0:
            self._filled += free
            return fresh
        view = SlotView(filled, protected, self._slot_row, self._index.find)
        victims = self._policy.victims(need, view)
        self._write_back(victims)
        self._index.remove(self._slot_row.index_select(0, victims))
        self._slot_row.index_fill_(0, victims, -1)
        self._counts.evictions += need
        self._filled += free
        return torch.cat([fresh, victims])

    def _install(self, slots: torch.Tensor, rows: np.ndarray, weights: np.ndarray,
                 state: np.ndarray | None) -> None:
        """Put ``rows`` (with their ``weights`` and ``state`` from the store) in ``slots``."""
        if rows.size == 0:
            return
        row_ids = torch.from_numpy(rows).to(self._device)
        if self._host_rows is not None:  # numpy's fancy assignment: ~4x torch's index_copy_
            self._host_rows[slots.numpy()] = np.ascontiguousarray(weights).view(
                self._host_rows.dtype)
        else:
            self._weights.index_copy_(0, slots, self._to_torch(weights))
        if self._state is not None and state is not None:
            self._state.index_copy_(0, slots, torch.from_numpy(
                np.ascontiguousarray(state[:, 0])).to(self._device))
        self._slot_row.index_copy_(0, slots, row_ids)
        self._dirty.index_fill_(0, slots, False)
        self._index.insert(row_ids, slots)
        self._counts.device_written += rows.size * self._row_bytes

    # ---- store traffic --------------------------------------------------------------------
    def _write_back(self, slots: torch.Tensor) -> None:
        """Write the dirty rows among ``slots`` (and their state) to the store, sorted by
        row: on the background thread with write-behind (the rows' data copied out of the
        slots first, without waiting for the device), else here."""
        if self._host_rows is not None:
            self._write_back_host(slots)
            return
        rows = self._slot_row.index_select(0, slots)
        dirty = self._dirty.index_select(0, slots)
        weights = self._take(slots)  # a copy
        state = None if self._state is None else self._state.index_select(0, slots)
        copy = sync_to_host(lambda: [rows, dirty, weights] + ([] if state is None else [state]),
                             wait=not self._write_behind)
        store_rows, with_state = self._store_rows, state is not None

        def write() -> np.ndarray:
            arrays = copy.arrays()
            keep = np.flatnonzero(arrays[1])
            written = arrays[0][keep]
            order = np.argsort(written)
            written, keep = written[order], keep[order]
            if written.size:
                store_rows.write(written, arrays[2][keep],
                                 arrays[3][keep].reshape(-1, 1) if with_state else None)
            return written

        self._queue_write(slots, write)

    def _write_back_host(self, slots: torch.Tensor) -> None:
        """:meth:`_write_back` on the CPU: the dirty rows picked and sorted by row first,
        so their data is copied out of the slots once, in the order the store takes."""
        at = slots.numpy()
        dirty = self._dirty.numpy()[at]
        keep = at[dirty]
        written = self._slot_row.numpy()[keep]
        order = np.argsort(written)
        written, keep = written[order], keep[order]
        weights = np.take(self._host_rows, keep, axis=0)
        if self._dtype == torch.bfloat16:
            weights = weights.view(np.uint16)
        state = None if self._state is None else self._state.numpy()[keep].reshape(-1, 1)
        store_rows = self._store_rows

        def write() -> np.ndarray:
            if written.size:
                store_rows.write(written, weights, state)
            return written

        self._queue_write(slots, write)

    def _queue_write(self, slots: torch.Tensor, write: Callable[[], np.ndarray]) -> None:
        """Run ``write`` (the write-back of ``slots``, holding copies of their rows) on
        the background thread with write-behind, else here; the slots are clean after."""
        if self._write_behind:
            self._dirty.index_fill_(0, slots, False)
            self._worker.write(write)  # counted and invalidated in the prefetch when done
            return
        self._worker.settle()
        written = write()
        self._dirty.index_fill_(0, slots, False)
        self._worker.invalidate(written)
        c = self._counts
        c.write_backs += written.size
        c.store_written += written.size * self._row_bytes
        c.device_read += written.size * self._row_bytes

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

    def _coalesce(self, ids: Any, grads: torch.Tensor) -> Coalesced:
        """The distinct rows of ``ids``, their summed gradients (fp32, on the
        device; summed in the order of the ids) and their slots. One read back: the ids'
        bounds, the number of distinct rows and how many of them are not resident."""
        rows = self._device_rows(ids)
        n = rows.numel()
        if not isinstance(grads, torch.Tensor) or not grads.is_floating_point() \
                or tuple(grads.shape) != (n, self._dim):
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads)
            raise RowShapeError(self._table, f"grads must be a floating-point tensor of shape "
                                             f"({n}, {self._dim}), got {shape}")
        if n == 0:
            return Coalesced(rows, torch.zeros((0, self._dim), device=self._device), rows, 0)
        if self._device.type != "cpu":
            return coalesce(rows, grads, self._index, self._num_rows, self._check_bounds)
        last, self._last_lookup = self._last_lookup, None
        known = last[1] if last is not None and np.array_equal(last[0], rows.numpy()) else None
        return coalesce(rows, grads, self._index, self._num_rows, self._check_bounds,
                        self._slot_scratch, known)

    def _slot_scratch(self) -> np.ndarray:
        """One int64 per slot, any content (:func:`~storage.cache.gradients.coalesce`)."""
        if self._scratch is None:
            self._scratch = np.empty(self._num_slots, dtype=np.int64)
        return self._scratch

    def _update(self, batch: Coalesced, step: Step, needs_state: bool) -> None:
        """Apply ``step(w_fp32, state, g) -> (w, state)`` to the rows of ``batch``: in
        their slots, or in the store for rows not resident."""
        slots, grads = batch.slots, batch.grads
        if slots.numel() == 0:
            return
        if batch.absent:
            slots_h, rows_h = sync_to_host(lambda: [batch.slots, batch.rows]).arrays()
            present = np.flatnonzero(slots_h >= 0)
            away = np.flatnonzero(slots_h < 0)
            self._update_in_store(rows_h[away], grads[torch.from_numpy(away).to(self._device)],
                                  step, needs_state)
            if present.size == 0:
                return
            where = torch.from_numpy(present).to(self._device)
            slots, grads = slots[where], grads[where]
        w = self._weights.index_select(0, slots).float()
        s = self._state.index_select(0, slots) if needs_state and self._state is not None \
            else None
        w, s = step(w, s, grads)
        self._weights.index_copy_(0, slots, w.to(self._dtype))
        if s is not None and self._state is not None:
            self._state.index_copy_(0, slots, s)
        self._dirty.index_fill_(0, slots, True)
        moved = slots.numel() * self._row_bytes
        self._counts.device_read += moved
        self._counts.device_written += moved

    def _update_in_store(self, rows: np.ndarray, grads: torch.Tensor, step: Step,
                         needs_state: bool) -> None:
        """Read, step and write back rows that are not resident (sorted, distinct)."""
        self._worker.settle()
        weights, state = self._store_rows.read(rows, with_state=needs_state)
        w = self._to_torch(weights).float()
        s = None
        if state is not None:
            s = torch.from_numpy(state[:, 0]).to(self._device)
        w, s = step(w, s, grads)
        self._worker.invalidate(rows)  # first: even a failed write may have changed them
        self._store_rows.write(rows, torch_to_numpy(w.to(self._dtype)),
                               None if s is None else torch_to_numpy(s).reshape(-1, 1))
        row_bytes = self._dim * self._np_dtype.itemsize + (4 if needs_state else 0)
        c = self._counts
        c.direct_updates += rows.size
        c.write_backs += rows.size
        c.store_read += rows.size * row_bytes
        c.store_written += rows.size * row_bytes

    # ---- conversions ----------------------------------------------------------------------
    def _device_ints(self, values: Any, what: str) -> torch.Tensor:
        """``values`` (1-D ints: a tensor, array or sequence) as int64 on the device; only
        the shape and dtype are checked (no synchronisation)."""
        if isinstance(values, torch.Tensor):
            dtype = values.dtype
            if values.dim() != 1 or (values.numel() and (
                    dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)):
                raise RowShapeError(self._table, f"{what} must be a 1-D integer array, got "
                                                 f"shape {tuple(values.shape)} and dtype {dtype}")
            return values.to(device=self._device, dtype=torch.int64)
        array = np.asarray(values)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise RowShapeError(self._table, f"{what} must be a 1-D integer array, got shape "
                                             f"{array.shape} and dtype {array.dtype}")
        return torch.from_numpy(array.astype(np.int64)).to(self._device)

    def _device_rows(self, ids: Any) -> torch.Tensor:
        """``ids`` as int64 row ids on the device; their range is checked where they are
        next read back (:meth:`_check_bounds`)."""
        return self._device_ints(ids, "ids")

    def _take(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of ``slots`` (all >= 0) as a new tensor on the device.

        On the CPU through numpy's ``take`` on the slots' memory: torch's CPU
        ``index_select`` splits small gathers over its intra-op threads, and on a
        shared 2-core machine it measured 2-3x slower than one thread (bench/cache.py).
        """
        if self._host_rows is None:
            return self._weights.index_select(0, slots)
        taken = torch.from_numpy(np.take(self._host_rows, slots.numpy(), axis=0))
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


def _misses(rows: torch.Tensor, miss: torch.Tensor, protected: torch.Tensor
            ) -> list[torch.Tensor]:
    """What a lookup reads back (inside :func:`sync_to_host`): ``[min id, max id, slots
    the batch hits]``, the distinct missing rows (sorted) and how often the batch uses
    each."""
    low, high = torch.aminmax(rows)
    head = torch.stack([low, high, protected[:-1].sum()])
    missing, uses = torch.unique(rows[miss], sorted=True, return_counts=True)
    return [head, missing, uses]


def lookup_many(caches: Sequence[RowCache], ids: Sequence[Any]) -> list[torch.Tensor]:
    """:meth:`RowCache.lookup` of ``ids[i]`` in ``caches[i]`` for the caches of one
    device (e.g. every cached table of a model on it), with one read back for all of
    them: every table's index lookup is queued first, then the distinct missing rows of
    all tables come back in one transfer (one ``unique`` over ``row * T + table``), then
    each table fills its slots. Returns the slots per table, as :meth:`RowCache.lookup`
    would; the caches end in the same state as after the single lookups in order.
    Raises :class:`CacheArgumentError` for caches on different devices or a length
    mismatch, and the errors of :meth:`RowCache.lookup` (checked for every table before
    any changes)."""
    if len(caches) != len(ids):
        raise CacheArgumentError(f"lookup_many needs one ids per cache, got {len(ids)} ids "
                                 f"for {len(caches)} caches")
    if not caches:
        return []
    device = caches[0].device
    if any(cache.device != device for cache in caches):
        raise CacheArgumentError(f"lookup_many needs caches on one device, got "
                                 f"{sorted({str(c.device) for c in caches})}")
    tables = len(caches)
    if len({id(cache) for cache in caches}) != tables \
            or max(cache._num_rows for cache in caches) * tables >= 1 << 62:
        return [cache.lookup(batch) for cache, batch in zip(caches, ids)]
    rows = [cache._device_rows(batch) for cache, batch in zip(caches, ids)]
    if device.type == "cpu":
        # a read back costs nothing here, and one ``unique`` per table sorts far fewer
        # keys than one over every table's: the single lookups, after every bounds check
        for cache, batch in zip(caches, rows):
            if batch.numel():
                cache._check_bounds(torch.stack(list(torch.aminmax(batch))).numpy())
        return [cache.lookup(batch) for cache, batch in zip(caches, rows)]
    probes = [cache._probe(r) if r.numel() else None for cache, r in zip(caches, rows)]

    def select() -> list[torch.Tensor]:
        heads, keys = [], []
        for t, probe in enumerate(probes):
            if probe is None:
                heads.append(torch.zeros(3, dtype=torch.int64, device=device))
                continue
            low, high = torch.aminmax(probe.rows)
            heads.append(torch.stack([low, high, probe.protected[:-1].sum()]))
            keys.append(probe.rows[probe.miss] * tables + t)
        missing, uses = torch.unique(torch.cat(keys) if keys else rows[0].new_zeros(0),
                                     sorted=True, return_counts=True)
        return [torch.stack(heads), missing, uses]

    heads, keys, uses = sync_to_host(select).arrays()
    for cache, probe, head in zip(caches, probes, heads):
        if probe is not None:
            cache._check_bounds(head)
    owner = keys % tables
    out = []
    for t, (cache, probe) in enumerate(zip(caches, probes)):
        if probe is None:
            out.append(cache.lookup(rows[t]))
            continue
        mine = owner == t
        slots, _, _ = cache._settle_batch(probe, int(heads[t][2]), keys[mine] // tables,
                                          uses[mine], read_uncached=False)
        out.append(slots)
    return out
