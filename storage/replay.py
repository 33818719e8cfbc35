"""Cache-policy simulator: replay a trace of row ids through a row cache.

:func:`replay` counts the hits, misses and evictions that a cache of ``cache_rows``
slots over a table of ``num_rows`` rows would see under one replacement policy.
It is the measuring stick for the row cache's policy and for the hit rates the
planner assumes (``bench/storage_hitrate.py``).

Model: every access needs its row in a slot (demand fetch). A hit costs nothing; a
miss fetches the row, first evicting one resident row when every slot is taken.
Misses include the compulsory ones (first touch of a row), except for rows that a
policy preloads before the trace starts (``CacheCounters.preloaded``).

Policies (all share one driver loop, :func:`_drive`):

``"lru"``
    evict the least recently used row.
``"lfu"``
    "perfect" LFU: per-row access counts over the whole trace so far (kept when a
    row is evicted); evict the resident row with the smallest count, the least
    recently used one among equals.
``"profile"``
    profile-warmed LFU: the ``cache_rows`` hottest rows of ``profile`` (per-row
    access counts, e.g. the ``bincount`` of an earlier sample; rows with a zero
    count are not loaded, ties go to the lower row id) are loaded before the trace
    starts, and the counts of the LFU start from the profile. On a stationary
    trace it stays at the profile's top-k and gradually corrects the profile's noise.
``"lookahead"``
    Belady within a window: at access ``t`` the policy sees the ids at
    ``t+1 .. t+lookahead`` (say the next few batches a data loader has queued). It
    evicts, among the resident rows not used within the window, the one with the
    smallest LFU count (then least recently used); if every resident row is used
    within the window, the one whose next use is farthest. With a ``profile`` the
    LFU counts start from it and its hottest rows are preloaded, as for
    ``"profile"``. A window as long as the trace gives Belady's MIN.

:func:`static_topk_hit_rate` and :func:`belady_hit_rate` give the two references:
the best fixed set of rows for this very trace, and the offline optimum (MIN).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from storage.errors import StoreError

POLICIES: tuple[str, ...] = ("lru", "lfu", "profile", "lookahead")
"""Policy names :func:`replay` accepts."""

_NEVER = np.iinfo(np.int64).max
"""Next-use position of an access whose row is not used again."""


class ReplayError(StoreError, ValueError):
    """An argument of :func:`replay` or of the reference hit rates is invalid.

    The message is one line naming the argument and the offending value.
    """


@dataclass(frozen=True, slots=True)
class CacheCounters:
    """What a cache saw over one trace.

    ``hits + misses == accesses``; ``misses`` include compulsory misses.
    ``evictions`` counts the misses that had to free a slot. ``preloaded`` is the
    number of rows placed in the cache before the trace started (not accesses).
    """

    accesses: int
    hits: int
    misses: int
    evictions: int
    preloaded: int = 0

    @property
    def hit_rate(self) -> float:
        """``hits / accesses``; 0.0 for an empty trace."""
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def miss_rate(self) -> float:
        """``misses / accesses``; 0.0 for an empty trace."""
        return self.misses / self.accesses if self.accesses else 0.0


# --------------------------------------------------------------------------- policies


class _Policy(Protocol):
    """Replacement policy driven by :func:`_drive`.

    The driver owns the set of resident rows; the policy only orders them. ``t`` is
    the position of the current access in the trace.
    """

    def preload(self) -> Sequence[int]:
        """Rows to place in the cache before the trace starts (at most cache_rows)."""
        ...

    def on_hit(self, t: int, row: int) -> None:
        """``row`` (resident) is accessed at ``t``."""
        ...

    def on_insert(self, t: int, row: int) -> None:
        """``row`` missed at ``t`` and now occupies a slot."""
        ...

    def evict(self, t: int) -> int:
        """Choose a resident row to evict before the miss at ``t``; forget it."""
        ...


class _LRU:
    """Least recently used: an ordered dict, oldest first."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def preload(self) -> Sequence[int]:
        return ()

    def on_hit(self, t: int, row: int) -> None:
        self._order.move_to_end(row)

    def on_insert(self, t: int, row: int) -> None:
        self._order[row] = None

    def evict(self, t: int) -> int:
        return self._order.popitem(last=False)[0]


class _LFU:
    """Perfect LFU with optional prior counts and preloaded rows.

    A min-heap holds one ``(count, stamp, row)`` entry per resident row, where
    ``stamp`` is the position of the row's latest access (negative for preloaded
    rows), so ties on the count go to the least recently used row. A hit only
    bumps the count and the stamp: the heap entry goes stale but stays a lower
    bound of the row's true key (both only grow), so :meth:`evict` refreshes stale
    entries as they surface and stops at the first fresh one, the true minimum.
    """

    def __init__(self, counts: list[float], preload: Sequence[int] = ()) -> None:
        self._counts = counts
        self._preload = list(preload)
        self._stamp: dict[int, int] = {}
        self._heap: list[tuple[float, int, int]] = []
        for i, row in enumerate(self._preload):
            self._stamp[row] = i - len(self._preload)
            heapq.heappush(self._heap, (counts[row], self._stamp[row], row))

    def preload(self) -> Sequence[int]:
        return self._preload

    def on_hit(self, t: int, row: int) -> None:
        self._counts[row] += 1
        self._stamp[row] = t

    def on_insert(self, t: int, row: int) -> None:
        self._counts[row] += 1
        self._stamp[row] = t
        heapq.heappush(self._heap, (self._counts[row], t, row))

    def evict(self, t: int) -> int:
        heap, counts, stamp = self._heap, self._counts, self._stamp
        while True:
            count, s, row = heap[0]
            if s == stamp[row] and count == counts[row]:
                heapq.heappop(heap)
                del stamp[row]
                return row
            heapq.heapreplace(heap, (counts[row], stamp[row], row))


class _Lookahead(_LFU):
    """Belady's rule inside a window of ``window`` future ids, LFU outside it.

    ``next_use[t]`` is the next position of the row accessed at ``t`` (``_NEVER``
    if none). Each access pushes the row into one of two heaps: the inherited
    ``_heap`` (next use beyond the window; LFU order) or ``_near`` (next use inside
    the window; farthest first). Entries whose stamp is no longer the row's latest
    are dead and skipped. A row only moves from far to near while it stays resident
    (the window slides forward); the move is done when it surfaces at the top of
    the far heap. With a window as long as the trace this is Belady's MIN.
    """

    def __init__(self, counts: list[float], next_use: list[int], window: int,
                 preload: Sequence[int] = (), first_use: Sequence[int] = ()) -> None:
        self._next_use = next_use
        self._window = window
        self._due: dict[int, int] = dict(zip(preload, first_use))
        self._near: list[tuple[int, int, int]] = []
        super().__init__(counts, preload)

    def on_hit(self, t: int, row: int) -> None:
        self._counts[row] += 1
        n = self._next_use[t]
        self._due[row] = n
        self._stamp[row] = t
        if n <= t + self._window:
            heapq.heappush(self._near, (-n, t, row))
        else:
            heapq.heappush(self._heap, (self._counts[row], t, row))

    on_insert = on_hit

    def evict(self, t: int) -> int:
        horizon = t + self._window
        far, near, stamp, due = self._heap, self._near, self._stamp, self._due
        while far:
            entry = heapq.heappop(far)
            s, row = entry[1], entry[2]
            if stamp.get(row) != s:
                continue
            if due[row] <= horizon:
                heapq.heappush(near, (-due[row], s, row))
                continue
            del stamp[row], due[row]
            return row
        while True:
            _, s, row = heapq.heappop(near)
            if stamp.get(row) == s:
                del stamp[row], due[row]
                return row


def _drive(trace: list[int], cache_rows: int, policy: _Policy) -> CacheCounters:
    """Replay ``trace`` through ``cache_rows`` slots ordered by ``policy``."""
    resident = set(policy.preload())
    preloaded = len(resident)
    on_hit, on_insert, evict = policy.on_hit, policy.on_insert, policy.evict
    hits = evictions = 0
    for t, row in enumerate(trace):
        if row in resident:
            hits += 1
            on_hit(t, row)
        else:
            if len(resident) >= cache_rows:
                resident.remove(evict(t))
                evictions += 1
            resident.add(row)
            on_insert(t, row)
    return CacheCounters(accesses=len(trace), hits=hits, misses=len(trace) - hits,
                         evictions=evictions, preloaded=preloaded)


# ------------------------------------------------------------------------ validation


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ReplayError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ReplayError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_trace(ids: ArrayLike, num_rows: int) -> np.ndarray:
    """``ids`` as a 1-D int64 array of rows in ``[0, num_rows)``."""
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as exc:
        raise ReplayError(f"ids must be a 1-D array of integers: {exc}") from None
    if arr.ndim != 1:
        raise ReplayError(f"ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ReplayError(f"ids must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= num_rows))
    if bad.size:
        i = int(bad[0])
        raise ReplayError(f"ids[{i}] = {int(arr[i])} is out of range for num_rows={num_rows} "
                          f"(valid 0..{num_rows - 1})")
    return arr.astype(np.int64, copy=False)


def _check_profile(profile: ArrayLike, num_rows: int) -> np.ndarray:
    try:
        arr = np.asarray(profile, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ReplayError(f"profile must be per-row access counts: {exc}") from None
    if arr.ndim != 1 or arr.shape[0] != num_rows:
        raise ReplayError(f"profile must have length num_rows={num_rows}, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        i = int(bad[0])
        raise ReplayError(f"profile[{i}] = {arr[i]} must be a finite count >= 0")
    return arr


def _check_sizes(num_rows: object, cache_rows: object) -> tuple[int, int]:
    """Validated ``(num_rows, cache_rows)``; a cache larger than the table is clamped."""
    n = _check_int("num_rows", num_rows, 1)
    c = _check_int("cache_rows", cache_rows, 1)
    return n, min(c, n)


def _next_use(ids: np.ndarray) -> np.ndarray:
    """For each position ``t`` the next position holding the same id (``_NEVER`` if none)."""
    ids = np.asarray(ids)
    order = np.argsort(ids, kind="stable")
    out = np.full(ids.shape[0], _NEVER, dtype=np.int64)
    if ids.shape[0] > 1:
        ranked = ids[order]
        same = ranked[1:] == ranked[:-1]
        out[order[:-1][same]] = order[1:][same]
    return out


# ------------------------------------------------------------------------ public API


def replay(ids: ArrayLike, *, num_rows: int, cache_rows: int, policy: str,
           profile: ArrayLike | None = None, lookahead: int = 0) -> CacheCounters:
    """Replay the trace ``ids`` through a cache of ``cache_rows`` rows under ``policy``.

    ``ids``: 1-D integer row ids in ``[0, num_rows)``, in access order.
    ``cache_rows``: slots; must be >= 1, and a value >= ``num_rows`` means every
    row fits (only compulsory misses). ``policy``: one of :data:`POLICIES` (see the
    module docstring). ``profile``: per-row access counts (length ``num_rows``),
    required by ``"profile"``, optional for ``"lookahead"``, refused by the others.
    ``lookahead``: how many future ids the ``"lookahead"`` policy sees (>= 1 for it,
    0 for the others).

    Raises :class:`ReplayError` naming the first invalid argument.
    """
    num_rows, cache_rows = _check_sizes(num_rows, cache_rows)
    if not isinstance(policy, str) or policy not in POLICIES:
        choices = ", ".join(repr(p) for p in POLICIES)
        raise ReplayError(f"unknown policy {policy!r}; choose one of {choices}")
    lookahead = _check_int("lookahead", lookahead, 0)
    if policy == "lookahead" and lookahead == 0:
        raise ReplayError("policy 'lookahead' needs lookahead >= 1 (future ids it may see), got 0")
    if policy != "lookahead" and lookahead:
        raise ReplayError(f"lookahead={lookahead} is only used by policy 'lookahead', "
                          f"not {policy!r}")
    if policy == "profile" and profile is None:
        raise ReplayError(f"policy 'profile' needs profile= (per-row access counts of "
                          f"length num_rows={num_rows}), got None")
    if policy in ("lru", "lfu") and profile is not None:
        raise ReplayError(f"profile is only used by policies 'profile' and 'lookahead', "
                          f"not {policy!r}")
    trace = _check_trace(ids, num_rows)
    prior = None if profile is None else _check_profile(profile, num_rows)
    return _replay(trace, num_rows, cache_rows, policy, prior, lookahead)


def _replay(trace: np.ndarray, num_rows: int, cache_rows: int, policy: str,
            prior: np.ndarray | None, lookahead: int) -> CacheCounters:
    """:func:`replay` on validated arguments."""
    if policy == "lru":
        return _drive(trace.tolist(), cache_rows, _LRU())
    counts: list[float] = [0] * num_rows if prior is None else prior.tolist()
    warm: list[int] = []
    if prior is not None:
        # the hottest rows with a positive count; ties by row id, so it is deterministic
        hottest = np.argsort(-prior, kind="stable")[:cache_rows]
        warm = hottest[prior[hottest] > 0].tolist()
    if policy in ("lfu", "profile"):
        return _drive(trace.tolist(), cache_rows, _LFU(counts, warm))
    first = _first_use(trace, num_rows, warm)
    chooser = _Lookahead(counts, _next_use(trace).tolist(), lookahead, warm, first)
    return _drive(trace.tolist(), cache_rows, chooser)


def _first_use(trace: np.ndarray, num_rows: int, rows: list[int]) -> list[int]:
    """First position of each of ``rows`` in ``trace`` (``_NEVER`` if absent)."""
    first = np.full(num_rows, _NEVER, dtype=np.int64)
    seen, at = np.unique(trace, return_index=True)
    first[seen] = at
    return first[np.asarray(rows, dtype=np.int64)].tolist()


def static_topk_hit_rate(ids: ArrayLike, num_rows: int, cache_rows: int) -> float:
    """Share of the accesses of ``ids`` that go to its ``cache_rows`` most frequent rows.

    The hit rate of a cache pinned, before the trace starts, to the best fixed set
    of rows for this very trace (no compulsory misses). It is the ceiling of a
    policy without future knowledge only up to sampling noise: on a short trace
    over many rows it overstates what any fixed set chosen beforehand can reach.
    """
    num_rows, cache_rows = _check_sizes(num_rows, cache_rows)
    trace = _check_trace(ids, num_rows)
    if trace.size == 0:
        return 0.0
    counts = np.bincount(trace, minlength=num_rows)
    if cache_rows < num_rows:
        counts = np.partition(counts, num_rows - cache_rows)[num_rows - cache_rows:]
    return float(counts.sum()) / trace.size


def belady_hit_rate(ids: ArrayLike, num_rows: int, cache_rows: int) -> float:
    """Hit rate of Belady's offline MIN: on a miss evict the row used farthest ahead.

    The best any demand-fetch cache can do on this trace; it starts empty, so
    compulsory misses count as misses.
    """
    num_rows, cache_rows = _check_sizes(num_rows, cache_rows)
    trace = _check_trace(ids, num_rows)
    window = max(1, trace.size)
    return _replay(trace, num_rows, cache_rows, "lookahead", None, window).hit_rate
