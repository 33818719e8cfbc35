"""Redo segments: the rows written since the last checkpoint, one file per array.

A scatter never touches the chunk files: the new rows go to the array's segment
``_txn/redo/<table>@<array>``, a file of fixed-size slots (row id, row bytes) mapped
into memory, one slot per distinct row (a row written again overwrites its slot).
Reads look the segment up first (read-through), so the store serves the newest rows.
Nothing is synced on this path: until a checkpoint seals the segment its content is
not part of the store, and a crash discards it whole, unread (the chunk files still
hold the last checkpoint).

A checkpoint seals every segment written since the last one: msync + fdatasync, then a
:class:`SegmentSeal` (slot count and CRC-32C over the header and the used slots) goes
into the marker (``prepared.json`` or ``checkpoint.json``, see :mod:`storage.journal`);
the rows are applied to the chunk files only after the commit point, and a crash
during the apply re-applies them from the sealed segments on open, after checking
each one against its seal: a sealed segment that is missing, short, of another store
or generation, or with any bit changed is refused (:class:`CorruptStoreError`).

File format (little-endian): a 256-byte header ``b"DLS2"``, store id (16 bytes),
generation (u64), key length (u16), key (utf-8, ``"<table>/<array>"``), zero padding;
then slots: row id (i8), row bytes.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from storage.errors import CorruptStoreError

MAGIC = b"DLS2"
HEADER_BYTES = 256
_HEADER = struct.Struct("<4s16sQH")
FIRST_SLOTS = 1024
"""Slots of a segment file when first written (it doubles as rows are added)."""
DENSE_INDEX_BYTES = 64 * 1024 * 1024
"""An array of up to this many bytes of int32 (16 M rows) indexes its segment with one
slot number per row (vectorised look-ups); a larger one with a dict of its held rows."""
KEEP_SLOT_BYTES = 256 * 1024 * 1024
"""A segment started again keeps up to this many bytes of file (larger ones are cut)."""


def crc32c(data: bytes | np.ndarray, crc: int = 0) -> int:
    """CRC-32C of ``data`` (bytes, or an array's bytes), continuing ``crc``.
    (google-crc32c takes bytes only, so an array is copied: about 0.1 ms per MiB.)"""
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    return int(google_crc32c.extend(crc, data))


def segment_name(key: str) -> str:
    """File name of array ``key``'s segment (table names never hold ``@`` or ``/``)."""
    return key.replace("/", "@")


@dataclass(frozen=True, slots=True)
class SegmentSeal:
    """What a checkpoint records about one sealed segment."""

    key: str
    """The array, ``"<table>/<array>"``."""
    slots: int
    """Rows the segment holds."""
    crc: int
    """CRC-32C of the header and the ``slots`` used slots."""

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "slots": self.slots, "crc": self.crc}

    @classmethod
    def from_json(cls, doc: Any) -> SegmentSeal:
        """A seal from a marker (``ValueError``/``KeyError``/``TypeError`` when malformed)."""
        key, slots, crc = doc["key"], doc["slots"], doc["crc"]
        if (not isinstance(key, str) or isinstance(slots, bool) or not isinstance(slots, int)
                or slots < 0 or isinstance(crc, bool) or not isinstance(crc, int)):
            raise ValueError(f"malformed segment seal {doc!r}")
        return cls(key, slots, crc)


class RedoSegment:
    """The rows of one array written since the last checkpoint (see the module doc).

    ``put`` and ``overlay`` may come from different threads (a row cache writes back on
    its own thread): a lock orders them.
    """

    def __init__(self, path: Path, key: str, row_bytes: int, store_id: bytes,
                 num_rows: int) -> None:
        self.path = path
        self.key = key
        self._row_bytes = row_bytes
        self._store_id = store_id
        self._slot = np.dtype([("id", "<i8"), ("row", np.uint8, (row_bytes,))])
        self._index: dict[int, int] = {}
        self._dense = (np.full(num_rows, -1, dtype=np.int32)
                       if num_rows * 4 <= DENSE_INDEX_BYTES else None)
        """Slot of every row (-1: not held), when the array is small enough."""
        self._count = 0
        self._slab: np.ndarray | None = None
        self._generation: int | None = None
        """Generation whose rows the file holds (None: nothing written since a reset)."""
        self._lock = threading.Lock()

    # ---- the step path: no sync --------------------------------------------------
    @property
    def rows(self) -> int:
        """Distinct rows held."""
        return self._count

    @property
    def bytes_used(self) -> int:
        return HEADER_BYTES + self._count * self._slot.itemsize

    def put(self, ids: np.ndarray, values: np.ndarray, generation: int) -> None:
        """Hold ``values[i]`` as the new content of row ``ids[i]`` (ids unique)."""
        if ids.size == 0:
            return
        raw = np.ascontiguousarray(values).view(np.uint8).reshape(ids.size, self._row_bytes)
        with self._lock:
            if self._generation != generation:
                self._start(generation)
            slots = self._slots(ids)
            new = slots < 0
            fresh = int(new.sum())
            if fresh:
                start = self._count
                self._reserve(start + fresh)
                slots[new] = np.arange(start, start + fresh)
            slab = self._mapped()
            slab["id"][slots] = ids
            slab["row"][slots] = raw
            if fresh:
                self._hold(ids[new], start)
                self._count = start + fresh

    def overlay(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Replace the rows of ``out`` (read from the chunk files) that the segment holds."""
        if not self._count or ids.size == 0:
            return
        with self._lock:
            slots = self._slots(ids)
            hit = slots >= 0
            if not hit.any():
                return
            rows = self._mapped()["row"][slots[hit]]
            out[hit] = rows.view(out.dtype).reshape(-1, out.shape[1])

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, raw rows uint8 (n, row_bytes)) held, in slot order (copies)."""
        with self._lock:
            if not self._count or self._slab is None:
                return np.empty(0, np.int64), np.empty((0, self._row_bytes), np.uint8)
            used = self._slab[:self._count]
            return np.array(used["id"]), np.array(used["row"])

    # ---- sealing and checking -------------------------------------------------------
    def seal(self) -> SegmentSeal:
        """Make the held rows durable and describe them (one msync + fdatasync)."""
        with self._lock:
            if self._slab is None:
                raise CorruptStoreError(self.path, "sealing a segment that holds no rows")
            self._slab.flush()
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            return SegmentSeal(self.key, self._count, self._crc())

    def load(self, seal: SegmentSeal, generation: int, num_rows: int, what: str) -> None:
        """Take the rows of a sealed segment (an in-doubt or committed checkpoint's) after
        checking the file against ``seal``; :class:`CorruptStoreError` naming the file
        and what is wrong, ``what`` saying what the rows are for."""
        def damaged(problem: str) -> CorruptStoreError:
            return CorruptStoreError(self.path, f"redo segment of {what} is damaged "
                                                f"({problem}); its {seal.slots} rows cannot "
                                                f"be applied: restore the store from a backup")
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            raise damaged("file missing") from None
        need = HEADER_BYTES + seal.slots * self._slot.itemsize
        if size < need:
            raise damaged(f"{size} bytes, the seal needs {need}")
        with open(self.path, "rb") as f:
            head = f.read(HEADER_BYTES)
        magic, store_id, gen, key_len = _HEADER.unpack_from(head)
        key = head[_HEADER.size:_HEADER.size + key_len].decode("utf-8", "replace")
        if magic != MAGIC:
            raise damaged(f"bad magic {magic!r}")
        if store_id != self._store_id:
            raise damaged("written by another store")
        if gen != generation:
            raise damaged(f"generation {gen}, expected {generation}")
        if key != self.key:
            raise damaged(f"holds array {key!r}")
        with self._lock:
            self._map(max(seal.slots, 1))
            self._count = seal.slots
            self._generation = generation
            crc = self._crc()
            if crc != seal.crc:
                self._count = 0
                self._forget()
                raise damaged(f"CRC-32C {crc:#010x}, the seal says {seal.crc:#010x}")
            ids = np.array(self._slab["id"][:seal.slots]) if self._slab is not None else None
            if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= num_rows
                                                 or np.unique(ids).size != ids.size):
                self._count = 0
                self._forget()
                raise damaged("row ids out of range or repeated")
            if ids is not None:
                self._hold(ids, 0)

    def clear(self) -> None:
        """Forget the held rows (rolled back, or applied); the file is left as it is and
        restarted by the next :meth:`put`."""
        with self._lock:
            self._forget()

    def close(self) -> None:
        with self._lock:
            self._index = {}
            self._dense = None
            self._count = 0
            self._slab = None

    # ---- helpers ------------------------------------------------------------------
    def _mapped(self) -> np.ndarray:
        if self._slab is None:  # pragma: no cover - put and load map the file first
            raise CorruptStoreError(self.path, "segment used before it was mapped")
        return self._slab

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each of ``ids`` (-1: not held), int64."""
        if self._dense is not None:
            return self._dense[ids].astype(np.int64)
        get = self._index.get
        return np.fromiter((get(i, -1) for i in ids.tolist()), dtype=np.int64, count=ids.size)

    def _hold(self, ids: np.ndarray, first_slot: int) -> None:
        """Index ``ids`` at slots ``first_slot, first_slot + 1, ...``."""
        if self._dense is not None:
            self._dense[ids] = np.arange(first_slot, first_slot + ids.size, dtype=np.int32)
        else:
            self._index.update(zip(ids.tolist(), range(first_slot, first_slot + ids.size)))

    def _forget(self) -> None:
        if self._dense is not None and self._count and self._slab is not None:
            self._dense[np.asarray(self._slab["id"][:self._count])] = -1
        self._index = {}
        self._count = 0
        self._generation = None

    def _start(self, generation: int) -> None:
        """First rows of ``generation``: a fresh header, no slots used."""
        self._forget()
        self.path.parent.mkdir(exist_ok=True)
        key = self.key.encode("utf-8")
        head = _HEADER.pack(MAGIC, self._store_id, generation, len(key)) + key
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size > KEEP_SLOT_BYTES:
                os.ftruncate(fd, 0)
            os.pwrite(fd, head.ljust(HEADER_BYTES, b"\0"), 0)
        finally:
            os.close(fd)
        self._count = 0
        self._generation = generation
        self._slab = None
        self._reserve(FIRST_SLOTS)

    def _reserve(self, slots: int) -> None:
        capacity = 0 if self._slab is None else self._slab.shape[0]
        if slots <= capacity:
            return
        size = os.stat(self.path).st_size
        have = max(0, (size - HEADER_BYTES) // self._slot.itemsize)
        want = max(slots, have, 2 * capacity, FIRST_SLOTS)
        self._map(want)

    def _map(self, slots: int) -> None:
        need = HEADER_BYTES + slots * self._slot.itemsize
        fd = os.open(self.path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < need:
                os.ftruncate(fd, need)
        finally:
            os.close(fd)
        self._slab = np.memmap(self.path, dtype=self._slot, mode="r+", offset=HEADER_BYTES,
                               shape=(slots,))

    def _crc(self) -> int:
        with open(self.path, "rb") as f:
            head = f.read(HEADER_BYTES)
        crc = crc32c(head)
        if self._count and self._slab is not None:
            crc = crc32c(np.asarray(self._slab[:self._count]).view(np.uint8), crc)
        return crc
