"""Row -> slot indexes of the row cache (host memory, numpy, vectorised per batch).

Two implementations of one small protocol, :class:`SlotIndex`:

:class:`DenseIndex`
    an ``int32`` array with one entry per table row (-1: not resident). One
    fancy-indexing pass per batch, the fastest lookup; costs 4 bytes per *table* row
    (256 MiB for 64 M rows) whatever the number of slots.
:class:`HashIndex`
    open addressing with linear probing over ``2 * slots`` rounded up to a power of
    two (12 bytes per entry, so ~24-48 bytes per *slot*), probed for a whole batch at
    once (one numpy pass per probe round; at a load factor <= 1/2 rounds stay few).
    For tables whose dense index would not fit in host memory; ~3-5x slower per id
    than the dense index.

:func:`make_index` picks the dense index up to :data:`DENSE_INDEX_MAX_ROWS` rows.
A Python ``dict`` was not chosen: it costs one interpreter step per id (~50-100 ns,
so 1-2 ms per 20 k-id batch) and ~100 bytes per entry.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from storage.cache_types import CacheArgumentError

IndexKind = Literal["auto", "dense", "hash"]
DENSE_INDEX_MAX_ROWS = 1 << 26
"""Largest table (rows) for which ``index="auto"`` uses a dense index (256 MiB of int32)."""
_EMPTY = -1
_TOMBSTONE = -2
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)
_MAX_FILL = 0.75
"""Live entries plus tombstones above this share of the table trigger a rebuild."""


class SlotIndex(Protocol):
    """Which slot holds each resident row. Row ids given are valid and int64."""

    @property
    def nbytes(self) -> int:
        """Host memory the index holds, in bytes."""
        ...

    def find(self, rows: np.ndarray) -> np.ndarray:
        """Slot of each of ``rows`` (int64; -1 for rows not resident)."""
        ...

    def insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Record that ``rows[i]`` (distinct, not resident) now lives in ``slots[i]``."""
        ...

    def remove(self, rows: np.ndarray) -> None:
        """Forget ``rows`` (distinct, resident)."""
        ...


class DenseIndex:
    """One int32 entry per table row; see the module docstring."""

    def __init__(self, num_rows: int) -> None:
        self._slot = np.full(num_rows, _EMPTY, dtype=np.int32)

    @property
    def nbytes(self) -> int:
        return int(self._slot.nbytes)

    def find(self, rows: np.ndarray) -> np.ndarray:
        return self._slot[rows].astype(np.int64)

    def insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        self._slot[rows] = slots

    def remove(self, rows: np.ndarray) -> None:
        self._slot[rows] = _EMPTY


class HashIndex:
    """Open addressing, linear probing, Fibonacci hashing; see the module docstring.

    Removal leaves tombstones; the table is rebuilt when live entries plus
    tombstones exceed 3/4 of it.
    """

    def __init__(self, slots: int) -> None:
        capacity = 8
        while capacity < 2 * slots:
            capacity *= 2
        self._bits = capacity.bit_length() - 1
        self._mask = capacity - 1
        self._keys = np.full(capacity, _EMPTY, dtype=np.int64)
        self._vals = np.full(capacity, _EMPTY, dtype=np.int32)
        self._live = 0
        self._tombstones = 0

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._vals.nbytes)

    def _home(self, rows: np.ndarray) -> np.ndarray:
        hashed = rows.astype(np.uint64) * _FIBONACCI  # wraps modulo 2**64
        return (hashed >> np.uint64(64 - self._bits)).astype(np.int64)

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        """Table position of each of ``rows`` (-1 where absent)."""
        out = np.full(rows.size, -1, dtype=np.int64)
        active = np.arange(rows.size)
        keys, pos, want = self._keys, self._home(rows), rows
        while active.size:
            found = keys[pos]
            hit = found == want
            out[active[hit]] = pos[hit]
            go_on = ~hit & (found != _EMPTY)
            active, want = active[go_on], want[go_on]
            pos = (pos[go_on] + 1) & self._mask
        return out

    def find(self, rows: np.ndarray) -> np.ndarray:
        pos = self._positions(rows)
        out = self._vals[np.maximum(pos, 0)].astype(np.int64)
        out[pos < 0] = _EMPTY
        return out

    def insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        if self._live + self._tombstones + rows.size > _MAX_FILL * self._keys.size:
            self._rebuild()
        keys, vals = self._keys, self._vals
        want, value, pos = rows, slots, self._home(rows)
        while want.size:
            free = np.flatnonzero(keys[pos] < 0)
            # several rows may probe the same free position this round: the first wins
            order = np.argsort(pos[free], kind="stable")
            ranked = pos[free][order]
            first = np.ones(ranked.size, dtype=bool)
            first[1:] = ranked[1:] != ranked[:-1]
            winners = free[order[first]]
            self._tombstones -= int(np.count_nonzero(keys[pos[winners]] == _TOMBSTONE))
            keys[pos[winners]] = want[winners]
            vals[pos[winners]] = value[winners]
            self._live += winners.size
            rest = np.ones(want.size, dtype=bool)
            rest[winners] = False
            want, value = want[rest], value[rest]
            pos = (pos[rest] + 1) & self._mask  # their position is taken now

    def remove(self, rows: np.ndarray) -> None:
        pos = self._positions(rows)
        pos = pos[pos >= 0]
        self._keys[pos] = _TOMBSTONE
        self._vals[pos] = _EMPTY
        self._live -= pos.size
        self._tombstones += pos.size

    def _rebuild(self) -> None:
        live = np.flatnonzero(self._keys >= 0)
        rows, slots = self._keys[live].copy(), self._vals[live].copy()
        self._keys.fill(_EMPTY)
        self._vals.fill(_EMPTY)
        self._live = self._tombstones = 0
        self.insert(rows, slots)


def make_index(kind: str, num_rows: int, slots: int) -> DenseIndex | HashIndex:
    """The index for a table of ``num_rows`` rows and ``slots`` slots.

    ``kind``: ``"dense"``, ``"hash"``, or ``"auto"`` (dense up to
    :data:`DENSE_INDEX_MAX_ROWS` rows, hash above).
    """
    if kind == "auto":
        kind = "dense" if num_rows <= DENSE_INDEX_MAX_ROWS else "hash"
    if kind == "dense":
        return DenseIndex(num_rows)
    if kind == "hash":
        return HashIndex(slots)
    raise CacheArgumentError(f"index must be 'auto', 'dense' or 'hash', got {kind!r}")
