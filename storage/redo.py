"""Redo segments: the rows written since the last checkpoint, one per array.

A scatter never touches the chunk files: the new rows go to the array's segment, one
slot (row id, row bytes) per distinct row (a row written again overwrites its slot).
Reads look the segment up first (read-through), so the store serves the newest rows.
Nothing is synced on this path: until a checkpoint seals the segment its content is
not part of the store, and a crash discards it whole, unread (the chunk files still
hold the last checkpoint).

Where the slots live. The newest slots are held in process memory (two plain arrays,
ids and row bytes, :class:`SlotMemory`), so a step's write-back is a memory copy: no
file, no page fault of a shared file map, no dirty pages for the kernel to write back
between checkpoints (measured here with the slots in a shared map of the file: about
1.5 ms per 3,000-row write-back of 256-byte rows, most of it faults on new file pages;
in memory about 0.1 ms). A segment makes the pages of its share of the store's slot
memory present at its first write (:attr:`RedoSegment.share_slots`: the store's
``redo_memory_bytes`` split over its arrays by size), in one ``madvise``, so the steps
that follow write into memory already present: memory the process has never used costs
0.25 ms per MiB to make present here, and 1-3 ms per MiB where the virtual machine itself
has never used it (measured on this 2-core VM), against 0.1 ms per MiB to fill once
present. The slots of later generations reuse those pages. The store bounds the memory of
all its segments together (``redo_memory_bytes``): past it, a segment *spills* its memory slots to its file
``_txn/redo/<table>@<array>`` with one sequential write (still no sync), and reads and
rewrites of spilled slots go through a map of the file.

A checkpoint seals every segment written since the last one: the slots still in memory
are written after the spilled ones, then one fdatasync, and a :class:`SegmentSeal`
(slot count and CRC-32C over the header and the used slots) goes into the marker
(``prepared.json`` or ``checkpoint.json``, see :mod:`storage.journal`); the rows are
applied to the chunk files only after the commit point, and a crash during the apply
re-applies them from the sealed segments on open, after checking each one against its
seal: a sealed segment that is missing, short, of another store or generation, or with
any bit changed is refused (:class:`CorruptStoreError`).

File format (little-endian): a 256-byte header ``b"DLS2"``, store id (16 bytes),
generation (u64), key length (u16), key (utf-8, ``"<table>/<array>"``), zero padding;
then slots: row id (i8), row bytes.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from storage.errors import CorruptStoreError
from storage.files import pwrite_all

MAGIC = b"DLS2"
HEADER_BYTES = 256
_HEADER = struct.Struct("<4s16sQH")
DENSE_INDEX_BYTES = 64 * 1024 * 1024
"""An array of up to this many bytes of int32 (16 M rows) indexes its segment with one
slot number per row (vectorised look-ups); a larger one with a dict of its held rows."""
KEEP_SLOT_BYTES = 256 * 1024 * 1024
"""A segment file sealed again keeps up to this many bytes beyond its slots (a larger
one is cut to its slots)."""
REDO_MEMORY_BYTES = 1024 * 1024 * 1024
"""Default bound of the slot memory of one store's segments (``redo_memory_bytes``):
4 M rows of 256 bytes. Spilling costs what the file map did (new page-cache pages,
about 2 ms per MiB here), so the bound is generous; the pages are only populated as
rows are written."""
MIN_CAPACITY = 1 << 16
"""Memory slots a segment starts with where the whole table's cannot be reserved."""
POPULATE_BYTES = 4 * 1024 * 1024
"""Slot memory is populated (its pages made present) this many bytes ahead of use."""
_MAP_NORESERVE = 0x4000
_MADV_POPULATE_WRITE = 23


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


class SlotMemory:
    """Memory for up to ``capacity`` slots: ``ids`` (int64) and ``rows`` (uint8, (capacity,
    row_bytes)), views of one anonymous map reserved whole (untouched pages cost
    nothing, and growing copies nothing). Pages are populated ahead of use,
    :data:`POPULATE_BYTES` at a time, with one ``madvise`` (measured here: about 1 ms per
    MiB, against 5 ms per MiB faulted in page by page), and kept when the segment is
    cleared, so the write-backs of later generations land in pages already present."""

    def __init__(self, capacity: int, row_bytes: int) -> None:
        self.capacity = capacity
        self._row_bytes = row_bytes
        self._map = mmap.mmap(-1, max(1, capacity * (8 + row_bytes)),
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        self.ids = np.frombuffer(self._map, dtype=np.int64, count=capacity)
        self.rows = np.frombuffer(self._map, dtype=np.uint8, count=capacity * row_bytes,
                                  offset=capacity * 8).reshape(capacity, row_bytes)
        self._ready = 0
        """Slots whose pages are populated."""

    def reserve(self, slots: int) -> None:
        """Make the pages of the first ``slots`` slots present."""
        if slots <= self._ready:
            return
        ahead = POPULATE_BYTES // (8 + self._row_bytes)
        want = min(self.capacity, max(slots, self._ready + ahead))
        for first, stop in ((self._ready * 8, want * 8),
                            (self.capacity * 8 + self._ready * self._row_bytes,
                             self.capacity * 8 + want * self._row_bytes)):
            start = first - first % mmap.PAGESIZE
            try:
                self._map.madvise(_MADV_POPULATE_WRITE, start, stop - start)
            except (OSError, ValueError):  # an older kernel: first use faults them in
                pass
        self._ready = want


class RedoSegment:
    """The rows of one array written since the last checkpoint (see the module doc).

    Slots ``[0, spilled)`` are in the file, ``[spilled, rows)`` in memory (slot ``s`` at
    ``s - spilled`` of the memory arrays). ``put`` and ``serve`` may come from
    different threads (a row cache writes back on its own thread): a lock orders them.
    """

    def __init__(self, path: Path, key: str, row_bytes: int, store_id: bytes,
                 num_rows: int, share_slots: int = 0) -> None:
        self.path = path
        self.share_slots = min(max(0, share_slots), num_rows)
        """Memory slots whose pages the first write makes present (the segment's share of
        the store's redo memory); more are populated as they are needed."""
        self.key = key
        self._row_bytes = row_bytes
        self._store_id = store_id
        self._slot = np.dtype([("id", "<i8"), ("row", np.uint8, (row_bytes,))])
        self._index: dict[int, int] = {}
        self._dense = (np.full(num_rows, -1, dtype=np.int32)
                       if num_rows * 4 <= DENSE_INDEX_BYTES else None)
        """Slot of every row (-1: not held), when the array is small enough."""
        self._count = 0
        self._spilled = 0
        self._num_rows = num_rows
        self._memory: SlotMemory | None = None
        """The memory slots (made on first write; at most one slot per row)."""
        self._file: np.ndarray | None = None
        """A map of the file's first ``_spilled`` slots (mapped on first use)."""
        self._generation: int | None = None
        """Generation whose rows the segment holds (None: nothing written since a reset)."""
        self._lock = threading.Lock()

    # ---- the step path: no sync --------------------------------------------------
    @property
    def rows(self) -> int:
        """Distinct rows held."""
        return self._count

    @property
    def bytes_used(self) -> int:
        return HEADER_BYTES + self._count * self._slot.itemsize

    @property
    def memory_bytes(self) -> int:
        """Bytes of the slots held in memory (not spilled to the file)."""
        return (self._count - self._spilled) * self._slot.itemsize

    def put(self, ids: np.ndarray, values: np.ndarray, generation: int) -> int:
        """Hold ``values[i]`` as the new content of row ``ids[i]`` (ids unique); returns
        the bytes of memory slots added."""
        if ids.size == 0:
            return 0
        raw = np.ascontiguousarray(values).view(np.uint8).reshape(ids.size, self._row_bytes)
        with self._lock:
            if self._generation != generation:
                self._forget()
                self._generation = generation
            slots = self._slots(ids)
            new = slots < 0
            fresh = int(np.count_nonzero(new))
            start = self._count
            if fresh:
                self._reserve(start + fresh - self._spilled)
                slots[new] = np.arange(start, start + fresh)
                self._hold(ids[new], start)
                self._count = start + fresh
            if self._spilled and fresh < ids.size:  # rewrites of spilled slots: in the file
                old = slots < self._spilled
                if old.any():
                    self._mapped_file()["row"][slots[old]] = raw[old]
                    keep = ~old
                    ids, raw, slots = ids[keep], raw[keep], slots[keep]
            at = slots - self._spilled
            memory = self._slot_memory()
            memory.ids[at] = ids
            memory.rows[at] = raw
            return fresh * self._slot.itemsize

    def serve(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write the rows of ``ids`` that the segment holds into ``out`` (one row per id);
        returns the positions of the others (int64), for the caller to read from the
        chunk files."""
        if not self._count or ids.size == 0:
            return np.arange(ids.size)
        with self._lock:
            slots = self._slots(ids)
            held = slots >= 0
            hit = np.flatnonzero(held)
            if not hit.size:
                return np.arange(ids.size)
            slots = slots[hit]
            width = out.shape[1]
            if self._spilled:
                old = slots < self._spilled
                if old.any():
                    rows = self._mapped_file()["row"][slots[old]]
                    out[hit[old]] = rows.view(out.dtype).reshape(-1, width)
                    hit, slots = hit[~old], slots[~old]
            rows = self._slot_memory().rows[slots - self._spilled]
            out[hit] = rows.view(out.dtype).reshape(-1, width)
            return np.flatnonzero(~held)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, raw rows uint8 (n, row_bytes)) held, in slot order (copies)."""
        with self._lock:
            tail = self._count - self._spilled
            memory = self._slot_memory()
            ids, rows = memory.ids[:tail], memory.rows[:tail]
            if self._spilled:
                spilled = self._mapped_file()
                ids = np.concatenate([spilled["id"], ids])
                rows = np.concatenate([spilled["row"], rows])
            return np.array(ids), np.array(rows)

    def spill(self) -> int:
        """Write the memory slots to the file (one sequential write, no sync); returns
        the bytes of memory freed."""
        with self._lock:
            return self._spill()

    # ---- sealing and checking -------------------------------------------------------
    def seal(self) -> SegmentSeal:
        """Make the held rows durable and describe them: the memory slots written to the
        file, one fdatasync. The slots stay readable in memory (an in-doubt store reads
        them until its checkpoint commits or rolls back)."""
        with self._lock:
            if not self._count or self._generation is None:
                raise CorruptStoreError(self.path, "sealing a segment that holds no rows")
            fd = self._open_file()
            try:
                head = self._header()
                if not self._spilled:
                    pwrite_all(fd, head, 0)
                tail = self._packed_tail()
                pwrite_all(fd, tail.view(np.uint8),
                           HEADER_BYTES + self._spilled * self._slot.itemsize)
                need = HEADER_BYTES + self._count * self._slot.itemsize
                if os.fstat(fd).st_size > need + KEEP_SLOT_BYTES:
                    os.ftruncate(fd, need)
                os.fdatasync(fd)
                crc = crc32c(head)
                if self._spilled:
                    crc = crc32c(np.asarray(self._mapped_file()), crc)
                crc = crc32c(tail, crc)
            finally:
                os.close(fd)
            return SegmentSeal(self.key, self._count, crc)

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
            body = f.read(seal.slots * self._slot.itemsize)
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
        crc = crc32c(body, crc32c(head))
        if crc != seal.crc:
            raise damaged(f"CRC-32C {crc:#010x}, the seal says {seal.crc:#010x}")
        ids = np.frombuffer(body, dtype=self._slot, count=seal.slots)["id"]
        if ids.size and (ids.min() < 0 or ids.max() >= num_rows
                         or np.unique(ids).size != ids.size):
            raise damaged("row ids out of range or repeated")
        with self._lock:
            self._forget()
            self._generation = generation
            self._count = self._spilled = seal.slots
            self._hold(ids.astype(np.int64), 0)

    def clear(self) -> None:
        """Forget the held rows (rolled back, or applied); the file is left as it is and
        written again at the next spill or seal. The memory slots are kept for reuse."""
        with self._lock:
            self._forget()

    def close(self) -> None:
        with self._lock:
            self._index = {}
            self._dense = None
            self._count = self._spilled = 0
            self._memory = None  # unmapped once no view is left
            self._file = None

    # ---- helpers ------------------------------------------------------------------
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
        if self._dense is not None and self._count:
            if self._count * 8 >= self._dense.size:
                self._dense.fill(-1)
            else:
                self._dense[self._slot_memory().ids[:self._count - self._spilled]] = -1
                if self._spilled:
                    self._dense[self._mapped_file()["id"]] = -1
        self._index = {}
        self._count = self._spilled = 0
        self._file = None
        self._generation = None

    def _slot_memory(self) -> SlotMemory:
        if self._memory is None:
            try:  # room for every row: address space only (MAP_NORESERVE)
                self._memory = SlotMemory(self._num_rows, self._row_bytes)
            except OSError:  # strict overcommit accounting: start smaller, grow on demand
                self._memory = SlotMemory(min(self._num_rows, MIN_CAPACITY), self._row_bytes)
        return self._memory

    def _reserve(self, slots: int) -> None:
        """Room for ``slots`` memory slots (at least the share, the first time)."""
        memory = self._slot_memory()
        slots = max(slots, min(self.share_slots, memory.capacity))
        if slots > memory.capacity:  # only after a smaller start (see _slot_memory)
            grown = SlotMemory(min(self._num_rows, max(slots, 2 * memory.capacity)),
                               self._row_bytes)
            used = self._count - self._spilled
            grown.reserve(used)
            grown.ids[:used] = memory.ids[:used]
            grown.rows[:used] = memory.rows[:used]
            self._memory = memory = grown
        memory.reserve(slots)

    def _header(self) -> bytes:
        key = self.key.encode("utf-8")
        return (_HEADER.pack(MAGIC, self._store_id, self._generation or 0, len(key))
                + key).ljust(HEADER_BYTES, b"\0")

    def _open_file(self) -> int:
        self.path.parent.mkdir(exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def _packed_tail(self) -> np.ndarray:
        """The memory slots in the file's slot layout (a new array)."""
        tail = self._count - self._spilled
        memory = self._slot_memory()
        packed = np.empty(tail, dtype=self._slot)
        packed["id"] = memory.ids[:tail]
        packed["row"] = memory.rows[:tail]
        return packed

    def _spill(self) -> int:
        tail = self._count - self._spilled
        if tail == 0:
            return 0
        fd = self._open_file()
        try:
            if not self._spilled:
                pwrite_all(fd, self._header(), 0)
            pwrite_all(fd, self._packed_tail().view(np.uint8),
                       HEADER_BYTES + self._spilled * self._slot.itemsize)
        finally:
            os.close(fd)
        self._spilled = self._count
        self._file = None  # remapped at its new length on next use
        return tail * self._slot.itemsize

    def _mapped_file(self) -> np.ndarray:
        """The spilled slots, mapped from the file (read and write)."""
        if self._file is None or self._file.shape[0] != self._spilled:
            self._file = np.memmap(self.path, dtype=self._slot, mode="r+",
                                   offset=HEADER_BYTES, shape=(self._spilled,))
        return self._file
