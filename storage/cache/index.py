"""Row -> slot indexes of the row cache: torch tensors on the cache's device, looked up
and updated for a whole batch at once, with no host synchronisation.

Two implementations of one small protocol, :class:`SlotIndex`:

:class:`DenseIndex`
    an ``int32`` tensor with one entry per table row (-1: not resident). One
    ``index_select`` per batch, the fastest lookup; costs 4 bytes per *table* row
    (256 MiB for 64 M rows) whatever the number of slots.
:class:`SortedIndex`
    the resident rows as a sorted ``int64`` tensor with their slots beside it
    (16 bytes per *slot*), looked up with ``searchsorted``; an update re-sorts it
    (one sort of ``slots`` keys per batch that misses). For tables whose dense index
    would not fit in device memory.

:func:`make_index` picks the dense index up to :data:`DENSE_INDEX_MAX_ROWS` rows.
Every method takes and returns tensors on the index's device; sizes only come from
tensor shapes, so nothing waits for the device.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from storage.errors import CacheArgumentError

IndexKind = Literal["auto", "dense", "sorted", "hash"]
DENSE_INDEX_MAX_ROWS = 1 << 26
"""Largest table (rows) for which ``index="auto"`` uses a dense index (256 MiB of int32)."""
_ABSENT = -1
_NO_KEY = torch.iinfo(torch.int64).max
"""Key of an unused entry of :class:`SortedIndex` (sorts after every row id)."""


class SlotIndex(Protocol):
    """Which slot holds each resident row. Row ids given are valid int64 tensors."""

    @property
    def nbytes(self) -> int:
        """Device memory the index holds, in bytes."""
        ...

    def find(self, rows: torch.Tensor) -> torch.Tensor:
        """Slot of each of ``rows`` (int64; -1 for rows not resident)."""
        ...

    def insert(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Record that ``rows[i]`` (distinct, not resident) now lives in ``slots[i]``."""
        ...

    def remove(self, rows: torch.Tensor) -> None:
        """Forget ``rows`` (distinct, resident)."""
        ...


class DenseIndex:
    """One int32 entry per table row; see the module docstring."""

    def __init__(self, num_rows: int, device: torch.device) -> None:
        self._slot = torch.full((num_rows,), _ABSENT, dtype=torch.int32, device=device)

    @property
    def nbytes(self) -> int:
        return self._slot.numel() * self._slot.element_size()

    def find(self, rows: torch.Tensor) -> torch.Tensor:
        return self._slot.index_select(0, rows).long()

    # on the CPU through numpy: about 25 % faster than index_copy_/index_fill_ when the
    # index is out of the CPU caches, as between the batches of a training step
    def insert(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        if self._slot.device.type == "cpu":
            self._slot.numpy()[rows.numpy()] = slots.numpy()
            return
        self._slot.index_copy_(0, rows, slots.to(torch.int32))

    def remove(self, rows: torch.Tensor) -> None:
        if self._slot.device.type == "cpu":
            self._slot.numpy()[rows.numpy()] = _ABSENT
            return
        self._slot.index_fill_(0, rows, _ABSENT)


class SortedIndex:
    """Sorted resident rows and their slots; see the module docstring.

    ``_keys`` has ``slots + 1`` entries: the rows of the live part ``[0, _live)``,
    sorted, then unused entries (:data:`_NO_KEY`); the last entry is always unused,
    so ``searchsorted`` never points past the end. A removal only clears the slots
    of its entries (the keys stay, so the order holds and a lookup finds them absent)
    and remembers those places; the next insertion writes its rows there first, then
    into the unused tail, and re-sorts once.
    """

    def __init__(self, slots: int, device: torch.device) -> None:
        self._keys = torch.full((slots + 1,), _NO_KEY, dtype=torch.int64, device=device)
        self._vals = torch.full((slots + 1,), _ABSENT, dtype=torch.int64, device=device)
        self._live = 0
        """Length of the live part (host int): rows and cleared places."""
        self._holes: torch.Tensor | None = None
        """Places cleared by removals and not written since."""

    @property
    def nbytes(self) -> int:
        return (self._keys.numel() + self._vals.numel()) * 8

    def find(self, rows: torch.Tensor) -> torch.Tensor:
        at = torch.searchsorted(self._keys, rows)
        found = self._keys.index_select(0, at) == rows
        return torch.where(found, self._vals.index_select(0, at), _ABSENT)

    def insert(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        holes = self._holes if self._holes is not None else rows.new_zeros(0)
        self._holes = None
        reused = min(holes.numel(), rows.numel())
        fresh = rows.numel() - reused
        places = torch.cat([holes[:reused], torch.arange(self._live, self._live + fresh,
                                                         device=rows.device)])
        self._keys.index_copy_(0, places, rows)
        self._vals.index_copy_(0, places, slots.long())
        self._live += fresh
        if reused < holes.numel():  # places left cleared: unused now, sorted to the end
            self._keys.index_fill_(0, holes[reused:], _NO_KEY)
            self._live -= holes.numel() - reused
        keys, order = torch.sort(self._keys)
        self._keys = keys
        self._vals = self._vals.index_select(0, order)

    def remove(self, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        at = torch.searchsorted(self._keys, rows)
        self._vals.index_fill_(0, at, _ABSENT)
        self._holes = at if self._holes is None else torch.cat([self._holes, at])


def make_index(kind: str, num_rows: int, slots: int,
               device: torch.device | str = "cpu") -> DenseIndex | SortedIndex:
    """The index for a table of ``num_rows`` rows and ``slots`` slots on ``device``.

    ``kind``: ``"dense"``, ``"sorted"`` (``"hash"`` is accepted as another name for
    the compact index), or ``"auto"`` (dense up to :data:`DENSE_INDEX_MAX_ROWS` rows,
    sorted above).
    """
    if kind == "auto":
        kind = "dense" if num_rows <= DENSE_INDEX_MAX_ROWS else "sorted"
    if kind == "dense":
        return DenseIndex(num_rows, torch.device(device))
    if kind in ("sorted", "hash"):
        return SortedIndex(slots, torch.device(device))
    raise CacheArgumentError(f"index must be 'auto', 'dense' or 'sorted', got {kind!r}")
