"""Replacement policies of the row cache: per-slot tensors on the cache's device,
updated and searched for a whole batch at once, with no host synchronisation.

The same policies as the simulator :mod:`storage.replay` (which replays one access
at a time), applied to whole batches. A slot's *recency key* orders its latest use:
``(b - base) * num_rows + row`` for the row it holds, last used by batch ``b``
(batches are numbered from 0), so later batches come later and, within a batch, the
lower row id first: every choice is deterministic. Preloaded rows get negative keys
(the hottest the oldest). When keys would leave int64 they are replaced by their
ranks (a sort; once per ~2**62 / num_rows batches).

``"lru"``
    evict the slots with the smallest keys (oldest batch, then lower row id).
``"lfu"``
    per-row access counts over everything looked up so far (kept when a row is
    evicted; 8 bytes per table row); evict the smallest count, then the smallest key.
``"profile"``
    like ``"lfu"`` with the counts starting from ``profile`` (per-row access counts),
    and the ``slots`` hottest rows with a positive count (ties: lower row id first)
    loaded before the first batch, the hottest in slot 0 with the oldest key.
``"lookahead"``
    LFU that also knows the ids coming next (:meth:`Lookahead.announce`, in order; the
    cache announces what :meth:`~storage.cache.RowCache.prefetch` is given): rows not
    among them go first, in LFU order; then the announced ones, the one whose first
    announced use is latest first (then the smallest key). With a ``profile`` the
    counts start from it and its hottest rows are preloaded, as for ``"profile"``.

Victims are chosen before the batch's accesses are recorded, among the slots the
batch does not use, so with one id per batch the choices are exactly those of
:func:`storage.replay.replay` (tested; for ``"lookahead"`` with the next
``lookahead`` ids announced before each lookup). The choice is a lexicographic
smallest-k over up to three keys (:func:`smallest`: one ``topk`` per key; on the CPU
numpy's ``argpartition``, the same set). LRU on the CPU keeps a pool of its oldest slots,
sorted, between batches and takes its victims from the front of it
(:meth:`LRU._pool_victims`; the same set, without a search of every slot per batch);
LFU and ``"profile"`` keep the slots below a (count, key) threshold
(:meth:`LFU._pool_victims`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from storage.errors import CacheArgumentError

POLICIES: tuple[str, ...] = ("lru", "lfu", "profile", "lookahead")
"""Policy names :class:`~storage.cache.RowCache` accepts."""

POOL_FACTOR = 8
"""LRU on the CPU draws its pool of oldest slots this many times a batch's victims."""
POOL_MIN_SLOTS = 4096
_KEY_LIMIT = 1 << 62
"""Recency keys stay below this (renormalised to ranks before they would not)."""


@dataclass(frozen=True, slots=True)
class SlotView:
    """What a policy may look at when it chooses victims (tensors on the device).

    ``filled``: slots ``0 .. filled - 1`` hold rows (a host int). ``protected``: bool
    per slot (``num_slots + 1``; the last entry is a dump for slot -1), True for the
    slots the current batch uses. ``slot_row``: row per slot (same length; -1 empty).
    ``find``: the cache's row -> slot lookup.
    """

    filled: int
    protected: torch.Tensor
    slot_row: torch.Tensor
    find: Callable[[torch.Tensor], torch.Tensor]


class SlotPolicy(Protocol):
    """Orders the filled slots for eviction; the cache owns residency."""

    def preload(self) -> np.ndarray:
        """Rows (int64, host) to load into slots 0, 1, ... before the first batch."""
        ...

    def on_access(self, slots: torch.Tensor, rows: torch.Tensor, batch: int) -> None:
        """The accesses of batch number ``batch``: ``rows[i]``, held in ``slots[i]``
        (-1 for a row served without a slot)."""
        ...

    def victims(self, count: int, view: SlotView) -> torch.Tensor:
        """Slots (int64, on the device) of the ``count`` filled, unprotected slots to evict."""
        ...


class LRU:
    """Least recently used: the smallest recency keys go first."""

    def __init__(self, num_rows: int, num_slots: int, device: torch.device) -> None:
        self._num_rows = num_rows
        self._key = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
        self._base = 0
        self._pool: tuple[np.ndarray, np.ndarray] | None = None
        """On the CPU: some filled slots and their keys when chosen, among them the
        smallest keys of all then (see :meth:`_pool_victims`)."""

    def preload(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def on_access(self, slots: torch.Tensor, rows: torch.Tensor, batch: int) -> None:
        if (batch - self._base + 1) * self._num_rows >= _KEY_LIMIT:
            self._renormalise(batch)
        offset = (batch - self._base) * self._num_rows
        if self._key.device.type == "cpu":  # numpy reads slot -1 as the last entry: the dump
            self._key.numpy()[slots.numpy()] = rows.numpy() + offset
            return
        dump = self._key.numel() - 1
        where = torch.where(slots < 0, dump, slots)
        self._key.index_copy_(0, where, rows + offset)

    def _renormalise(self, batch: int) -> None:
        """Replace the keys by their ranks (all below the keys of later batches)."""
        ranks = torch.empty_like(self._key)
        ranks[torch.argsort(self._key)] = torch.arange(self._key.numel(), device=self._key.device)
        self._key = ranks - self._key.numel()
        self._base = batch
        self._pool = None

    def _order_keys(self, view: SlotView) -> list[torch.Tensor]:
        """The keys to compare, most significant first (excluded slots largest)."""
        key = self._key[:view.filled]
        return [torch.where(view.protected[:view.filled], torch.iinfo(torch.int64).max, key)]

    def victims(self, count: int, view: SlotView) -> torch.Tensor:
        if self._key.device.type == "cpu" and 0 < count < view.filled:
            return self._pool_victims(count, view)
        return smallest(self._order_keys(view), count)

    def _pool_victims(self, count: int, view: SlotView) -> torch.Tensor:
        """:meth:`victims` on the CPU from a pool of the oldest slots, kept between
        batches: the same set as a search of every slot, at a fraction of the cost.

        The pool holds the :data:`POOL_FACTOR` x ``count`` filled slots of smallest key
        when it was drawn (protected or not), sorted by those keys; every other slot had
        a larger key, and keys only grow (a use, or a new row). So the first ``count``
        unprotected pool entries whose key is unchanged, if there are that many, are the
        smallest keys of all unprotected slots. Each call drops the entries whose key
        changed (one pass over the pool); when fewer than ``count`` are left unprotected
        the pool is drawn again."""
        key = self._key.numpy()
        protected = view.protected.numpy()
        for attempt in range(2):
            if self._pool is None or attempt:
                size = min(view.filled, max(POOL_FACTOR * count, POOL_MIN_SLOTS))
                drawn = np.argpartition(key[:view.filled], size - 1)[:size] \
                    if size < view.filled else np.arange(view.filled)
                drawn = drawn[np.argsort(key[drawn])]
                self._pool = (drawn, key[drawn])
            slots, keys = self._pool
            unchanged = key[slots] == keys
            if not unchanged.all():
                slots, keys = slots[unchanged], keys[unchanged]
                self._pool = (slots, keys)
            live = np.flatnonzero(~protected[slots])[:count]
            if live.size == count:
                return torch.from_numpy(slots[live].astype(np.int64, copy=False))
        return smallest(self._order_keys(view), count)  # the pool is the whole cache


@dataclass(frozen=True, slots=True)
class _LowPool:
    """:meth:`LFU._pool_victims`' candidates: ``slots`` (host int64) that may hold one of
    the smallest ``(count, key)`` tuples, every other filled slot's tuple above
    ``(count, key)`` = the threshold (when drawn, and tuples only grow while a slot holds
    its row), except the ``fresh`` slots, given new rows since; drawn with ``filled``
    slots filled."""

    slots: np.ndarray
    fresh: np.ndarray
    count: float
    key: int
    filled: int


class LFU(LRU):
    """Smallest per-row count first, then the smallest recency key; optionally
    profile-warmed."""

    def victims(self, count: int, view: SlotView) -> torch.Tensor:
        if self._key.device.type == "cpu" and 0 < count < view.filled:
            return self._pool_victims(count, view)
        return smallest(self._order_keys(view), count)

    def __init__(self, num_rows: int, num_slots: int, device: torch.device,
                 counts: np.ndarray, warm: np.ndarray) -> None:
        super().__init__(num_rows, num_slots, device)
        self._counts = torch.from_numpy(counts).to(device)
        self._warm = warm
        # preloaded rows: older than any access, the hottest the oldest (as replay)
        self._key[:warm.size] = torch.arange(warm.size, device=device) - warm.size
        self._one = torch.ones(1, dtype=torch.float64, device=device)
        self._low: _LowPool | None = None

    def _renormalise(self, batch: int) -> None:
        super()._renormalise(batch)
        self._low = None

    def _pool_victims(self, count: int, view: SlotView) -> torch.Tensor:
        """:meth:`victims` on the CPU from a pool of candidates kept between batches
        (:class:`_LowPool`): the same set as a search of every slot, over a fraction of
        them. A slot's ``(count, key)`` only grows while it holds its row (a use raises
        both), and the slots given new rows are the victims returned (once the cache is
        full), so every slot outside the pool and the victims returned since it was drawn
        is still above the threshold. The candidates below it, if ``count`` of them are
        unprotected, therefore hold the ``count`` smallest tuples of all unprotected slots;
        else the pool is drawn again: the :data:`POOL_FACTOR` x ``count`` smallest of
        every filled slot."""
        counts, key = self._counts.numpy(), self._key.numpy()
        slot_row, protected = view.slot_row.numpy(), view.protected.numpy()
        for attempt in range(2):
            low = self._low
            if low is None or attempt or low.filled != view.filled:
                size = min(view.filled, max(POOL_FACTOR * count, POOL_MIN_SLOTS))
                filled = slice(0, view.filled)
                drawn = smallest([torch.from_numpy(counts[slot_row[filled]]),
                                  torch.from_numpy(key[filled])], size).numpy()
                last = np.lexsort((key[drawn], counts[slot_row[drawn]]))[-1]
                low = _LowPool(drawn, drawn[:0], float(counts[slot_row[drawn[last]]]),
                               int(key[drawn[last]]), view.filled)
            candidates = np.concatenate([low.slots, low.fresh])
            c, k = counts[slot_row[candidates]], key[candidates]
            below = (c < low.count) | ((c == low.count) & (k <= low.key))
            candidates, c, k = candidates[below], c[below], k[below]
            free = np.flatnonzero(~protected[candidates])
            if free.size >= count:
                chosen = free[smallest([torch.from_numpy(c[free]), torch.from_numpy(k[free])],
                                       count).numpy()]
                kept = np.ones(candidates.size, dtype=bool)
                kept[chosen] = False
                victims = candidates[chosen]
                self._low = _LowPool(candidates[kept], victims, low.count, low.key,
                                     view.filled)
                return torch.from_numpy(victims.astype(np.int64, copy=False))
            self._low = low
        return smallest(self._order_keys(view), count)  # the pool is the whole cache

    def preload(self) -> np.ndarray:
        return self._warm

    def on_access(self, slots: torch.Tensor, rows: torch.Tensor, batch: int) -> None:
        self._counts.index_add_(0, rows, self._one.expand(rows.numel()))
        super().on_access(slots, rows, batch)

    def _row_counts(self, view: SlotView) -> torch.Tensor:
        rows = view.slot_row[:view.filled].clamp_min(0)
        return self._counts.index_select(0, rows)

    def _order_keys(self, view: SlotView) -> list[torch.Tensor]:
        protected = view.protected[:view.filled]
        counts = torch.where(protected, torch.inf, self._row_counts(view))
        return [counts, self._key[:view.filled]]


class Lookahead(LFU):
    """LFU that keeps the announced next ids; see the module docstring."""

    def victims(self, count: int, view: SlotView) -> torch.Tensor:
        return smallest(self._order_keys(view), count)  # announced rows reorder the slots

    def __init__(self, num_rows: int, num_slots: int, device: torch.device,
                 counts: np.ndarray, warm: np.ndarray) -> None:
        super().__init__(num_rows, num_slots, device, counts, warm)
        self._next: torch.Tensor | None = None

    def announce(self, rows: torch.Tensor) -> None:
        """The ids coming next, in order (replaces the previous announcement)."""
        self._next = rows

    def _order_keys(self, view: SlotView) -> list[torch.Tensor]:
        filled = view.filled
        protected = view.protected[:filled]
        counts = self._row_counts(view)
        key = self._key[:filled]
        if self._next is None or self._next.numel() == 0:
            return [torch.where(protected, torch.inf, counts), key]
        upcoming = self._next
        window = upcoming.numel()
        slots = view.find(upcoming)
        dump = view.protected.numel() - 1
        first = torch.full((dump + 1,), window, dtype=torch.int64, device=key.device)
        first.scatter_reduce_(0, torch.where(slots < 0, dump, slots),
                              torch.arange(window, device=key.device), reduce="amin")
        first = first[:filled]
        near = first < window
        big = torch.finfo(torch.float64).max
        primary = torch.where(protected, torch.inf, torch.where(near, big, counts))
        secondary = torch.where(near, -first.double(), -torch.inf)
        return [primary, secondary, key]


def smallest(keys: Sequence[torch.Tensor], count: int) -> torch.Tensor:
    """Indices of the ``count`` lexicographically smallest tuples of ``keys`` (tensors
    of one length, most significant first; the last one distinct), in no order.

    One ``topk`` per key and no host synchronisation: each key but the last fixes a
    threshold (the ``count``-th smallest among the tuples still tied); tuples below it
    are taken, those above it dropped, and the next key orders the ties.
    """
    size = keys[0].numel()
    device = keys[0].device
    if count >= size:
        return torch.arange(size, device=device)
    if count <= 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    taken: torch.Tensor | None = None
    tied: torch.Tensor | None = None
    on_host = device.type == "cpu"
    for depth, key in enumerate(keys):
        low, high = _extremes(key.dtype)
        if taken is not None and tied is not None:
            key = torch.where(taken, low, torch.where(tied, key, high))
        last = depth == len(keys) - 1
        if on_host:  # numpy's introselect: ~5x faster than torch.topk on the CPU here
            values = key.numpy()
            if last:
                return torch.from_numpy(np.argpartition(values, count - 1)[:count])
            threshold = np.partition(values, count - 1)[count - 1].item()
        elif last:
            return torch.topk(key, count, largest=False, sorted=False).indices
        else:
            threshold = torch.topk(key, count, largest=False, sorted=False).values.max()
        taken, tied = key < threshold, key == threshold
    raise CacheArgumentError("smallest needs at least one key")  # pragma: no cover


def _extremes(dtype: torch.dtype) -> tuple[float | int, float | int]:
    if dtype.is_floating_point:
        return -torch.inf, torch.inf
    info = torch.iinfo(dtype)
    return info.min, info.max


def make_policy(name: str, num_rows: int, num_slots: int, profile: np.ndarray | None,
                device: torch.device | str = "cpu") -> LRU:
    """The policy ``name`` (see :data:`POLICIES`) on ``device``; ``profile`` for
    ``"profile"`` (required) and ``"lookahead"`` (optional) only."""
    if not isinstance(name, str) or name not in POLICIES:
        raise CacheArgumentError(f"policy must be one of {', '.join(map(repr, POLICIES))}, "
                                 f"got {name!r}")
    device = torch.device(device)
    if name in ("lru", "lfu") and profile is not None:
        raise CacheArgumentError(f"profile is only used by policies 'profile' and "
                                 f"'lookahead', not {name!r}")
    if name == "lru":
        return LRU(num_rows, num_slots, device)
    no_rows = np.zeros(0, np.int64)
    if profile is None and name != "profile":
        cls = LFU if name == "lfu" else Lookahead
        return cls(num_rows, num_slots, device, np.zeros(num_rows, dtype=np.float64), no_rows)
    counts = check_profile(profile, num_rows)
    hottest = np.argsort(-counts, kind="stable")[:num_slots]
    warm = hottest[counts[hottest] > 0].astype(np.int64)
    return (LFU if name == "profile" else Lookahead)(num_rows, num_slots, device, counts, warm)


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
