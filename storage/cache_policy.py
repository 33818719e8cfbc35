"""Replacement policies of the row cache, vectorised per batch over slot arrays.

The same policies as the simulator :mod:`storage.replay` (which replays one access
at a time), applied to whole batches. A slot's *stamp* is the number of the latest
batch that used the row it holds (batches are numbered from 0; preloaded rows get
negative stamps). Ties that stamps leave, rows used by the same batch, are broken
by the lower row id, so every choice is deterministic.

``"lru"``
    evict the slots with the oldest stamps (lower row id first among equals).
``"lfu"``
    per-row access counts over everything looked up so far (kept when a row is
    evicted; 8 bytes per table row); evict the smallest count, then the oldest
    stamp, then the lower row id.
``"profile"``
    like ``"lfu"`` with the counts starting from ``profile`` (per-row access counts),
    and the ``slots`` hottest rows with a positive count (ties: lower row id first)
    loaded before the first batch, the hottest in slot 0 with the oldest stamp.

Victims are chosen before the batch's accesses are recorded, among the slots the
batch does not use, so with one id per batch the choices are exactly those of
:func:`storage.replay.replay` (tested). Recording a batch costs one scalar
assignment per id for LRU (no per-access order within a batch is kept), plus one
``np.add.at`` for the counts of LFU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from storage.cache_types import CacheArgumentError

POLICIES: tuple[str, ...] = ("lru", "lfu", "profile")
"""Policy names :class:`~storage.cache.RowCache` accepts."""


class SlotPolicy(Protocol):
    """Orders the filled slots for eviction; the cache owns residency."""

    def preload(self) -> np.ndarray:
        """Rows (int64) to load into slots 0, 1, ... before the first batch."""
        ...

    def on_access(self, slots: np.ndarray, rows: np.ndarray, batch: int) -> None:
        """The accesses of batch number ``batch``: ``rows[i]``, held in ``slots[i]``
        (-1 for a row served without a slot)."""
        ...

    def victims(self, count: int, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Indices into ``slots`` (filled slots holding ``rows``) of the ``count`` to evict."""
        ...


class LRU:
    """Least recently used: the oldest stamps go first."""

    def __init__(self, num_slots: int) -> None:
        self._stamp = np.full(num_slots, np.iinfo(np.int64).min, dtype=np.int64)

    def preload(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def on_access(self, slots: np.ndarray, rows: np.ndarray, batch: int) -> None:
        _stamp(self._stamp, slots, batch)

    def victims(self, count: int, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return smallest((self._stamp[slots], rows), count)


class LFU:
    """Smallest per-row count first, then oldest stamp; optionally profile-warmed."""

    def __init__(self, num_slots: int, counts: np.ndarray, warm: np.ndarray) -> None:
        self._counts = counts
        self._warm = warm
        self._stamp = np.full(num_slots, np.iinfo(np.int64).min, dtype=np.int64)
        # preloaded rows: stamps before the first access, the hottest the oldest (as replay)
        self._stamp[:warm.size] = np.arange(warm.size, dtype=np.int64) - warm.size

    def preload(self) -> np.ndarray:
        return self._warm

    def on_access(self, slots: np.ndarray, rows: np.ndarray, batch: int) -> None:
        np.add.at(self._counts, rows, 1.0)
        _stamp(self._stamp, slots, batch)

    def victims(self, count: int, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return smallest((self._counts[rows], self._stamp[slots], rows), count)


def _stamp(stamp: np.ndarray, slots: np.ndarray, batch: int) -> None:
    """Stamp every slot the batch used with its number (-1 entries: no slot)."""
    if slots.size and slots.min() < 0:
        slots = slots[slots >= 0]
    stamp[slots] = batch


def smallest(keys: Sequence[np.ndarray], count: int) -> np.ndarray:
    """Indices of the ``count`` lexicographically smallest tuples of ``keys`` (arrays of
    one length, most significant first), in no order.

    Linear time per key (``partition``), not a sort; later keys only order the ties
    of earlier ones at the boundary.
    """
    primary = keys[0]
    size = primary.size
    if count >= size:
        return np.arange(size)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if len(keys) == 1:
        return np.argpartition(primary, count - 1)[:count]
    threshold = np.partition(primary, count - 1)[count - 1]
    below = np.flatnonzero(primary < threshold)
    ties = np.flatnonzero(primary == threshold)
    need = count - below.size
    if need < ties.size:
        ties = ties[smallest([key[ties] for key in keys[1:]], need)]
    return np.concatenate([below, ties])


def make_policy(name: str, num_rows: int, num_slots: int,
                profile: np.ndarray | None) -> LRU | LFU:
    """The policy ``name`` (see :data:`POLICIES`); ``profile`` only for ``"profile"``."""
    if not isinstance(name, str) or name not in POLICIES:
        raise CacheArgumentError(f"policy must be one of {', '.join(map(repr, POLICIES))}, "
                                 f"got {name!r}")
    if name != "profile":
        if profile is not None:
            raise CacheArgumentError(f"profile is only used by policy 'profile', not {name!r}")
        if name == "lru":
            return LRU(num_slots)
        return LFU(num_slots, np.zeros(num_rows, dtype=np.float64), np.zeros(0, np.int64))
    counts = check_profile(profile, num_rows)
    hottest = np.argsort(-counts, kind="stable")[:num_slots]
    warm = hottest[counts[hottest] > 0].astype(np.int64)
    return LFU(num_slots, counts, warm)


def check_profile(profile: object, num_rows: int) -> np.ndarray:
    """``profile`` as a fresh float64 array of ``num_rows`` finite counts >= 0."""
    if profile is None:
        raise CacheArgumentError(f"policy 'profile' needs profile= (per-row access counts of "
                                 f"length {num_rows}), got None")
    try:
        counts = np.array(profile, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CacheArgumentError(f"profile must be per-row access counts: {exc}") from None
    if counts.shape != (num_rows,):
        raise CacheArgumentError(f"profile must have shape ({num_rows},) (one count per table "
                                 f"row), got {counts.shape}")
    bad = np.flatnonzero(~np.isfinite(counts) | (counts < 0))
    if bad.size:
        i = int(bad[0])
        raise CacheArgumentError(f"profile[{i}] = {counts[i]} must be a finite count >= 0")
    return counts
