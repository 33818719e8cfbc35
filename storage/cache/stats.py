"""Statistics of the row cache (:mod:`storage.cache`): its running totals and their
snapshots.

The cache's own typed errors, :class:`~storage.errors.CacheArgumentError` and
:class:`~storage.errors.CacheWriteError` (a failed background write-back), live with
the store's in :mod:`storage.errors`. The cache also raises the store's errors
unchanged where they fit:
:class:`~storage.errors.RowIndexError` for ids outside the table,
:class:`~storage.errors.RowShapeError` for ids or gradients of the wrong shape or
dtype, :class:`~storage.errors.ReadOnlyStoreError` for updates over a read-only store
and :class:`~storage.errors.MissingArrayError` for a missing table or optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TierBytes:
    """Bytes moved to and from one memory tier (weights and optimizer state together)."""

    read: int
    """Bytes read from the tier."""
    written: int
    """Bytes written to the tier."""


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What a :class:`~storage.cache.RowCache` did since it was built (a snapshot).

    Counting is per batch: a row missing at the start of a batch counts one miss,
    however often the batch uses it; its other uses count as hits. So with batches
    of one id every access counts like in :func:`storage.replay.replay`.
    ``hits + misses == accesses``.
    """

    accesses: int
    """Ids looked up (``lookup``/``gather``), duplicates included."""
    hits: int
    """Accesses served by a row resident in a slot."""
    misses: int
    """Accesses whose row was not resident when its batch arrived (one per row per batch)."""
    evictions: int
    """Rows removed from a slot to make room for a missing one."""
    write_backs: int
    """Rows written to the store: dirty victims, ``flush``, and direct (uncached) updates
    (with write-behind, counted once the background write is done)."""
    uncached: int
    """Missing rows served straight from the store without a slot, because their batch
    had more distinct rows than the cache can hold (counted in ``misses`` too)."""
    direct_updates: int
    """Rows an ``apply_*`` call updated in the store because they were not resident."""
    preloaded: int
    """Rows loaded at construction (``policy="profile"``); not accesses."""
    prefetched_rows: int
    """Missing rows taken from a prefetch instead of read on demand."""
    prefetch_discarded: int
    """Prefetched rows never used (already resident, invalidated by a write, or not
    missed by the lookup that consumed the prefetch)."""
    background_read_s: float
    """Seconds the background thread spent reading prefetched rows."""
    background_write_s: float
    """Seconds the background thread spent writing evicted dirty rows (write-behind)."""
    background_wait_s: float
    """Seconds the caller blocked waiting for background store work to finish."""
    background_hidden_s: float
    """Seconds of background store work that overlapped the caller's own work: per
    wait, the queued work's running time minus the time waited for it (at least 0)."""
    store: TierBytes
    """Bytes read from and written to the table store (misses, prefetches, write-backs,
    uncached reads and direct updates)."""
    device: TierBytes
    """Bytes read from and written to the slots on the cache's device."""

    @property
    def hit_rate(self) -> float:
        """``hits / accesses``; 0.0 before the first access."""
        return self.hits / self.accesses if self.accesses else 0.0


@dataclass(slots=True)
class Counters:
    """Running totals behind :meth:`~storage.cache.RowCache.stats`, kept by the cache's
    own thread (the background thread keeps its own, in
    :class:`~storage.cache.worker.WorkerCounters`); see :class:`CacheStats` for each."""

    accesses: int = 0
    """Ids looked up."""
    hits: int = 0
    """Accesses served by a resident row."""
    misses: int = 0
    """Accesses whose row was not resident when its batch arrived."""
    evictions: int = 0
    """Rows removed from a slot."""
    write_backs: int = 0
    """Rows written to the store on this thread."""
    uncached: int = 0
    """Missing rows served without a slot."""
    direct_updates: int = 0
    """Rows updated in the store because they were not resident."""
    preloaded: int = 0
    """Rows loaded at construction."""
    prefetched_rows: int = 0
    """Missing rows taken from a prefetch."""
    store_read: int = 0
    """Bytes read from the store on this thread."""
    store_written: int = 0
    """Bytes written to the store on this thread."""
    device_read: int = 0
    """Bytes read from the slots."""
    device_written: int = 0
    """Bytes written to the slots."""
