"""Undo journal and checkpoint marker: what makes checkpoints crash-safe.

Protocol (one writer; every step is ordered by fsync):

1. Before the first overwrite of a row since the last checkpoint, its old bytes are
   appended to the journal as part of one record (array key, row ids, old rows,
   CRC-32 over all of it) and the journal is ``fdatasync``-ed. Only then are the
   new bytes written to the chunk files.
2. ``checkpoint(step)``: fsync every written chunk file; write the marker
   ``{"step", "generation": g}`` to a temporary file, fsync, ``os.replace`` it over
   ``checkpoint.json``, fsync the directory; then reset the journal to generation
   ``g + 1`` (new header). The marker's replace is the commit point.
3. Open for writing: a journal whose header generation is ``committed + 1`` holds
   undo records of the uncommitted writes; they are replayed (old bytes restored,
   newest record first), the chunk files fsynced, then the journal reset. A journal
   of an older generation was committed already (crash between commit and reset)
   and is ignored. Reading stops at the first record that is short or fails its
   CRC: that record was being appended when the writer died, so none of its data
   writes can have started.

Two-phase commit (a checkpoint shared with other stores or files, decided by a
coordinator): ``prepare(step)`` fsyncs the chunk files and writes
``prepared.json`` ``{"step", "generation": g + 1}`` (the active generation) the same
atomic way; the store is then *in doubt*: its undo records are kept, writes are
refused, and neither opening nor closing it rolls anything back. The coordinator
then either commits (the marker ``{"step", "generation": g + 1}`` is written, which
is the commit point, then the journal reset and ``prepared.json`` removed) or aborts
(``prepared.json`` removed first, then the records replayed as on open). On open, a
``prepared.json`` whose generation is not the active one is a leftover of a commit
that completed and is removed.

File format (little-endian): a 16-byte header ``b"DLJ1"``, generation (u64), CRC-32
of the first 12 bytes (u32); then records: ``b"DLR1"``, generation (u64), row count
(u32), row bytes (u32), key length (u16), 2 reserved bytes, CRC-32 (u32) of the
header's first 24 bytes + key + ids + rows; key (utf-8, ``"<table>/<array>"``);
ids (int64 x count); rows (row bytes x count).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from storage.errors import CorruptStoreError
from storage.files import fsync_dir, temporaries, write_json_atomic
from storage.layout import FORMAT_VERSION

FILE_MAGIC = b"DLJ1"
RECORD_MAGIC = b"DLR1"
_FILE_HEADER = struct.Struct("<4sQI")
_RECORD_HEADER = struct.Struct("<4sQIIH2x")
_CRC = struct.Struct("<I")
RECORD_PREFIX_BYTES = _RECORD_HEADER.size + _CRC.size
HEADER_BYTES = _FILE_HEADER.size
KEEP_BYTES = 256 * 1024 * 1024
"""A reset journal keeps up to this many bytes of file (see :meth:`UndoJournal.reset`)."""


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """Old bytes of some rows of one array: ``rows[i]`` was the content of ``ids[i]``."""

    key: str
    ids: np.ndarray
    rows: np.ndarray  # uint8, shape (count, row_bytes)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The last completed checkpoint: ``step`` (None before the first) and the
    journal generation it committed (the active journal is ``generation + 1``)."""

    step: int | None
    generation: int


def _file_header(generation: int) -> bytes:
    head = struct.pack("<4sQ", FILE_MAGIC, generation)
    return head + _CRC.pack(zlib.crc32(head))


def read_generation(path: Path) -> int | None:
    """Generation in the journal's header; None when missing, empty or torn."""
    try:
        with open(path, "rb") as f:
            head = f.read(_FILE_HEADER.size)
    except FileNotFoundError:
        return None
    if len(head) < _FILE_HEADER.size:
        return None
    magic, generation, crc = _FILE_HEADER.unpack(head)
    if magic != FILE_MAGIC or zlib.crc32(head[:12]) != crc:
        return None
    return int(generation)


def iter_records(path: Path, generation: int,
                 end: int | None = None) -> Iterator[tuple[int, JournalRecord]]:
    """Valid records of ``generation`` with their file offsets, in append order; stops
    at the first torn or foreign record, or at byte ``end``."""
    with open(path, "rb") as f:
        offset = HEADER_BYTES
        while end is None or offset < end:
            f.seek(offset)
            record, size = _read_record(f, generation)
            if record is None:
                return
            yield offset, record
            offset += size


def read_record_at(path: Path, offset: int, generation: int) -> JournalRecord:
    """The record at ``offset`` (one that :func:`iter_records` has validated)."""
    with open(path, "rb") as f:
        f.seek(offset)
        record, _ = _read_record(f, generation)
    if record is None:
        raise CorruptStoreError(path, f"journal record at byte {offset} changed while being "
                                      f"replayed; is another process writing the store?")
    return record


def _read_record(f: BinaryIO, generation: int) -> tuple[JournalRecord | None, int]:
    prefix = f.read(RECORD_PREFIX_BYTES)
    if len(prefix) < RECORD_PREFIX_BYTES:
        return None, 0
    head = prefix[:_RECORD_HEADER.size]
    magic, gen, count, row_bytes, key_len = _RECORD_HEADER.unpack(head)
    (crc,) = _CRC.unpack(prefix[_RECORD_HEADER.size:])
    if magic != RECORD_MAGIC or gen != generation:
        return None, 0
    body_len = key_len + count * (8 + row_bytes)
    body = f.read(body_len)
    if len(body) < body_len or zlib.crc32(body, zlib.crc32(head)) != crc:
        return None, 0
    key = body[:key_len].decode("utf-8")
    ids = np.frombuffer(body, dtype="<i8", count=count, offset=key_len)
    rows = np.frombuffer(body, dtype=np.uint8, count=count * row_bytes,
                         offset=key_len + 8 * count).reshape(count, row_bytes)
    return JournalRecord(key, ids, rows), RECORD_PREFIX_BYTES + body_len


def _record_size(record: JournalRecord) -> int:
    return (RECORD_PREFIX_BYTES + len(record.key.encode("utf-8"))
            + record.ids.size * 8 + record.rows.size)


def has_records(path: Path, generation: int) -> bool:
    """Whether the journal holds at least one valid record of ``generation``."""
    if read_generation(path) != generation:
        return False
    return next(iter_records(path, generation), None) is not None


class UndoJournal:
    """The append side of the journal, owned by the one writer."""

    def __init__(self, path: Path, generation: int, *, keep_records: bool = False) -> None:
        """Open the journal at ``generation``: reset (empty), or with ``keep_records``
        continued after its valid records of that generation (an in-doubt store keeps
        them until its coordinator decides)."""
        self.path = path
        self.generation = generation
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._size = 0
        self.broken = False
        try:
            if keep_records and read_generation(path) == generation:
                self._size = HEADER_BYTES
                for offset, record in iter_records(path, generation):
                    self._size = offset + _record_size(record)
            else:
                self.reset(generation)
        except BaseException:
            self.close()
            raise

    def reset(self, generation: int) -> None:
        """Empty the journal and start ``generation`` (durable on return).

        The file keeps its blocks (up to KEEP_BYTES): rewriting allocated blocks makes
        the next appends' fdatasync cheaper than extending the file, and truncating
        a large file takes tens of ms. The header is followed by a zeroed record
        prefix, so no stale record is read as the first one; stale records further on
        are harmless: they are either of an older generation (reading stops there)
        or of this one, after a rollback or recovery to the same checkpoint, and then
        hold that checkpoint's bytes too, so replaying them changes nothing.
        If this fails the journal is marked broken: appending records of the old
        generation after a committed checkpoint would make them look stale.
        """
        try:
            if os.fstat(self._fd).st_size > KEEP_BYTES:
                os.ftruncate(self._fd, 0)
            _pwrite_all(self._fd, _file_header(generation) + bytes(RECORD_PREFIX_BYTES), 0)
            os.fdatasync(self._fd)
        except BaseException:
            self.broken = True
            raise
        self.generation = generation
        self._size = HEADER_BYTES
        self.broken = False

    def append(self, key: str, ids: np.ndarray, rows: np.ndarray) -> int:
        """Append one record and make it durable; returns its size in bytes.

        ``ids`` are int64, ``rows`` any C-contiguous array with one row per id. If
        the append fails the journal is cut back to its previous end (or marked
        broken if even that fails, so that no later record hides behind garbage).
        """
        key_bytes = key.encode("utf-8")
        ids_bytes = np.ascontiguousarray(ids, dtype="<i8")
        row_bytes = rows.nbytes // max(1, len(ids_bytes)) if len(ids_bytes) else 0
        rows_view = memoryview(np.ascontiguousarray(rows)).cast("B")
        head = _RECORD_HEADER.pack(RECORD_MAGIC, self.generation, len(ids_bytes), row_bytes,
                                   len(key_bytes))
        crc = zlib.crc32(head)
        for part in (key_bytes, memoryview(ids_bytes).cast("B"), rows_view):
            crc = zlib.crc32(part, crc)
        parts = [head + _CRC.pack(crc) + key_bytes, memoryview(ids_bytes).cast("B"), rows_view]
        start = self._size
        try:
            offset = start
            for part in parts:
                _pwrite_all(self._fd, part, offset)
                offset += len(part)
            os.fdatasync(self._fd)
        except BaseException:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                self.broken = True
            raise
        self._size = offset
        return offset - start

    @property
    def size_bytes(self) -> int:
        """End of the last record appended since the reset (bytes, header included)."""
        return self._size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]


def read_checkpoint(txn_dir: Path, marker_name: str) -> Checkpoint:
    path = txn_dir / marker_name
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
        step = doc["step"]
        return Checkpoint(step=None if step is None else int(step),
                          generation=int(doc["generation"]))
    except FileNotFoundError as exc:
        raise CorruptStoreError(path, "checkpoint marker is missing; restore the store from a "
                                      "backup") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptStoreError(path, f"checkpoint marker is unreadable ({exc!r}); restore "
                                      f"the store from a backup") from exc


def write_checkpoint(txn_dir: Path, marker_name: str, checkpoint: Checkpoint) -> None:
    """Atomically replace the marker (temporary file, fsync, rename, fsync directory)."""
    doc = {"format_version": FORMAT_VERSION, "step": checkpoint.step,
           "generation": checkpoint.generation}
    write_json_atomic(txn_dir / marker_name, doc)


def read_prepared(txn_dir: Path, name: str) -> Checkpoint | None:
    """The prepared (in-doubt) checkpoint recorded in ``name``; None when absent."""
    if not (txn_dir / name).exists():
        return None
    return read_checkpoint(txn_dir, name)


def remove_marker(txn_dir: Path, name: str) -> None:
    """Delete marker ``name`` (if present) durably."""
    try:
        os.unlink(txn_dir / name)
    except FileNotFoundError:
        return
    fsync_dir(txn_dir)


def remove_stale_temporaries(txn_dir: Path, marker_name: str) -> None:
    """Delete marker temporaries left by a writer that died before renaming them."""
    for stale in temporaries(txn_dir / marker_name):
        stale.unlink(missing_ok=True)
