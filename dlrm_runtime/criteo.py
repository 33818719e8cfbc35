"""Criteo click logs (Kaggle display-advertising and Terabyte TSV) for training.

Format: one sample per line, 40 tab-separated fields: the label (``0`` or ``1``), 13
integer features ``I1..I13`` (decimal, possibly negative, within the signed 64-bit range)
and 26 categorical features ``C1..C26`` (hexadecimal, 32-bit in the published data; up
to 64 bits are accepted). Every feature may be missing (an empty field); the label may
not.

Transformations (fixed; the cache header records the format version):

- dense value = ``log(1 + max(x, 0))`` computed in float64 and stored as float32; a
  missing or negative value gives 0.
- categorical row = ``splitmix64(int(value, 16)) % num_embeddings`` where
  ``splitmix64`` is SplitMix64's finaliser (golden-ratio increment, then the two
  multiply-xorshift rounds); a missing value maps to row :data:`MISSING_ROW` (0).
  The hash is the same for every table; only the modulus differs.

Reading is streamed in blocks of whole lines (``chunk_bytes`` at a time, 4 MiB by
default; a line over :data:`MAX_LINE_BYTES` is skipped as malformed without being held),
decoded in ``workers`` threads. Arrow's CSV reader (``pyarrow.csv``) splits each block
into fields and converts the integers; the labels and the hex values are checked and
decoded with numpy. :func:`parse_line` is the reference parser and has the last word:
lines Arrow's types cannot hold exactly (a hex value over 8 digits, an integer from 2**53
on) go through it, and a block Arrow refuses (a wrong field count, a value its integer
conversion rejects, ``+7`` included, or a byte where Arrow is more lenient than the
grammar: spaces, ``0x``, a byte-order mark, a lone ``\r``) is halved until the parts are
accepted or small enough to parse line by line, so each such line costs a few re-reads
of its block. Malformed lines are skipped and counted (the first few are kept
in the report), or raise :class:`CriteoFormatError` naming the file, line and field
when ``strict=True``.

Train/validation splits are line ranges: ``start`` and ``stop`` are 0-based line
indices, half-open like a Python slice (``start=0, stop=40_000_000`` is the first 40 M
lines); every line counts, malformed ones included. Error messages number lines from
1, as editors do.

The binary cache (:func:`build_cache`, :func:`open_or_build_cache`) is one file:
:data:`CACHE_MAGIC`, padding to 64 bytes, ``N`` fixed-size records (label float32,
dense float32[13], rows int32[26], or int64[26] when a table has more than 2**31 rows;
160 bytes a sample), then a JSON header, its length (uint64 little-endian) and
:data:`CACHE_MAGIC` again. It is written to a temporary file, fsynced and renamed into
place, so a reader sees either the old cache or the complete new one. The header holds
the source's size and mtime (not its path: a copy that keeps the mtime reuses the
cache), the table sizes, the line range and the format version; a cache that
disagrees with any of them is stale. A range that holds no sample (it starts beyond the
end of the file, or all its lines are malformed) is an error, and no cache is written.
Damage after writing is caught cheaply: opening checks that the header agrees with
itself and the file's size and checks the first and last :data:`CHECKED_RECORDS` records
(rows inside their tables, labels 0/1, dense values finite and >= 0); every batch and
row chunk read later is checked the same way. :class:`CriteoCacheError` then names the
file and says to delete it to rebuild it.
:class:`CriteoClicks` serves :class:`dlrm_runtime.data.Batch` objects from a cache by
batch index, like :class:`dlrm_runtime.data.SyntheticClicks`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from dlrm_runtime.data import VALIDATION_OFFSET, Batch
from dlrm_runtime.errors import ConfigError, RuntimeErrorBase
from dlrm_runtime.sparse import SparseBatch
from planner import TablesSpec

NUM_DENSE = 13
"""Integer features per sample (``I1..I13``)."""
NUM_SPARSE = 26
"""Categorical features per sample (``C1..C26``), one embedding table each."""
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
FIELD_NAMES = ("label", *(f"I{i}" for i in range(1, NUM_DENSE + 1)),
               *(f"C{i}" for i in range(1, NUM_SPARSE + 1)))
MISSING_ROW = 0
"""Row that a missing categorical value maps to, in every table."""
MAX_HEX_DIGITS = 16
"""Longest categorical value accepted (64 bits)."""
CACHE_VERSION = 1
CACHE_MAGIC = b"DLRMCRT1"
CACHE_DATA_OFFSET = 64
"""Byte offset of the first record in a cache file."""
DEFAULT_CHUNK_BYTES = 1 << 22
"""Bytes of text parsed per block (whole lines; a block grows to hold a longer line)."""
MAX_WORKERS = 8
"""Most threads a reader uses by default (one per CPU up to this)."""
MAX_LINE_BYTES = 1 << 20
"""A line longer than about this (it may reach this plus ``chunk_bytes``) is malformed
and skipped without being held in memory."""
MAX_REPORTED_ERRORS = 10
"""Malformed lines kept (with line, field and reason) in a report and a cache header."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
_INT_RE = re.compile(rb"[+-]?[0-9]+")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_HEX_RE = re.compile(rb"[0-9a-fA-F]{1,%d}" % MAX_HEX_DIGITS)

_ONES = 0x0101010101010101
_HIGH = np.uint64(0x80 * _ONES)
_LOW_NIBBLES = np.uint64(0x0F * _ONES)
_LOWEST_BITS = np.uint64(_ONES)
_LOWERCASE = np.uint64(0x20 * _ONES)
_KEEP = np.array([0] + [(0xFFFFFFFFFFFFFFFF << (8 * (8 - k))) & 0xFFFFFFFFFFFFFFFF
                        for k in range(1, 9)] + [0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
"""``_KEEP[k]``: the mask of the top ``k`` bytes of a little-endian word (k <= 8; 9 keeps all)."""
_M8 = np.uint64(0x00FF00FF00FF00FF)
_M16 = np.uint64(0x0000FFFF0000FFFF)
_M32 = np.uint64(0x00000000FFFFFFFF)
_EXACT_IN_FLOAT = 1 << 53
"""Integer features at or above this go to :func:`parse_line` (its log is exact)."""
_LENIENT = (b" ", b"x", b"X")
"""Bytes that Arrow's integer conversion accepts where the grammar does not (it trims
spaces and reads ``0x`` hexadecimal); a block holding one goes line by line."""
_BOM = b"\xef\xbb\xbf"
_BISECT_LINES = 64
"""A block Arrow refuses is halved until it has this many lines or fewer, then parsed
line by line with :func:`parse_line`."""


def _at_least(k: int) -> np.uint64:
    """Added to a word of ASCII bytes, sets a byte's high bit where the byte is >= ``k``."""
    return np.uint64((0x80 - k) * _ONES)


_GE_SPACE, _GE_0, _GE_COLON, _GE_A, _GE_G = (_at_least(c) for c in b" 0:ag")


class CriteoFormatError(RuntimeErrorBase, ValueError):
    """A line of a Criteo file is malformed (raised with ``strict=True``).

    ``path`` is the file, ``line`` the 1-based line number (``None`` when the file
    cannot be read at all), ``field`` the field's name (``label``, ``I1``..``I13``,
    ``C1``..``C26``) or ``None`` for a wrong field count or an overlong line.
    """

    def __init__(self, path: str, line: int | None, field: str | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.reason = reason
        where = (path + (f", line {line}" if line is not None else "")
                 + (f", field {field}" if field else ""))
        super().__init__(f"{where}: {reason}")

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "reason": self.reason}


class CriteoCacheError(RuntimeErrorBase, ValueError):
    """A cache file is missing, unreadable, of another version, or stale."""


# ---------------------------------------------------------------- values


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser of uint64 ``values`` (a bijection; wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        z = values + _GOLDEN
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
        return z


def hash_categorical(values: np.ndarray | Sequence[int],
                     num_embeddings: int | np.ndarray) -> np.ndarray:
    """Rows (int64) of categorical ``values`` (unsigned integers, the parsed hex) in
    tables of ``num_embeddings`` rows (a scalar, or one per last-axis column)."""
    z = splitmix64(np.asarray(values, dtype=np.uint64))
    return (z % np.asarray(num_embeddings, dtype=np.uint64)).astype(np.int64)


def dense_transform(values: np.ndarray | Sequence[float]) -> np.ndarray:
    """``log(1 + max(x, 0))`` as float32 (NaN, a missing value, gives 0)."""
    x = np.asarray(values, dtype=np.float64)
    x = np.where(np.isnan(x), 0.0, np.maximum(x, 0.0))
    return np.log1p(x).astype(np.float32)


def _log1p_int(value: int) -> float:
    """``log(1 + max(value, 0))`` of a Python integer of any size."""
    if value <= 0:
        return 0.0
    if value < 1 << 53:
        return math.log1p(value)
    return math.log(value)  # exact for big ints; log(1 + x) == log(x) in float64 here


def default_workers() -> int:
    """Threads a reader uses unless told: one per CPU, at most :data:`MAX_WORKERS`."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def table_sizes(tables: TablesSpec | Sequence[int]) -> tuple[int, ...]:
    """The 26 table sizes (rows) of a tables spec in feature order, or of a sequence.

    Raises :class:`ConfigError` when there are not 26 tables or a size is below 1.
    """
    sizes = tuple(t.num_embeddings for t in tables.tables) if isinstance(tables, TablesSpec) \
        else tuple(tables)
    if len(sizes) != NUM_SPARSE:
        raise ConfigError(f"Criteo data has {NUM_SPARSE} categorical features, but the tables "
                          f"spec has {len(sizes)} tables; list 26 tables in feature order")
    for i, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ConfigError(f"table {i} (C{i + 1}) must have at least 1 row, got {size!r}")
    return tuple(int(s) for s in sizes)


# ---------------------------------------------------------------- reference parser


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """One decoded sample: ``label`` 0/1, ``dense`` float32[13] (transformed), ``rows``
    int64[26] (hashed), ``values`` the raw categorical integers (``None`` = missing)."""

    label: int
    dense: np.ndarray
    rows: np.ndarray
    values: tuple[int | None, ...]


def parse_line(line: bytes | str, tables: TablesSpec | Sequence[int], *, path: str = "<memory>",
               line_number: int = 1) -> ParsedLine:
    """Decode one line (with or without its ``\\n`` / ``\\r\\n``): the reference parser.

    Grammar: label ``0`` or ``1``; an integer feature is empty or ``[+-]?[0-9]+``; a
    categorical feature is empty or 1 to 16 hex digits. Raises
    :class:`CriteoFormatError` (naming ``path``, ``line_number`` and the field)
    otherwise.
    """
    return _parse_line(line.encode() if isinstance(line, str) else line, table_sizes(tables),
                       path, line_number)


def _parse_line(line: bytes, sizes: tuple[int, ...], path: str, number: int) -> ParsedLine:
    label, dense, values = _decode_line(line, path, number)
    rows = [MISSING_ROW if v is None else _splitmix64_int(v) % n for v, n in zip(values, sizes)]
    return ParsedLine(label, np.array(dense, dtype=np.float32), np.array(rows, dtype=np.int64),
                      tuple(values))


def _splitmix64_int(x: int) -> int:
    """:func:`splitmix64` of one Python integer (the slow path's version)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _decode_line(line: bytes, path: str, number: int) -> tuple[int, list[float], list[int | None]]:
    line = line.rstrip(b"\n")
    if line.endswith(b"\r"):
        line = line[:-1]
    fields = line.split(b"\t")
    if len(fields) != NUM_FIELDS:
        raise CriteoFormatError(path, number, None,
                                f"has {len(fields)} fields, expected {NUM_FIELDS}")
    if fields[0] not in (b"0", b"1"):
        raise CriteoFormatError(path, number, "label", f"must be 0 or 1, got {_show(fields[0])}")
    dense = []
    for i in range(1, 1 + NUM_DENSE):
        text = fields[i]
        if not text:
            dense.append(0.0)
        elif _INT_RE.fullmatch(text):
            value = int(text)
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise CriteoFormatError(path, number, FIELD_NAMES[i],
                                        f"integer outside the 64-bit range: {_show(text)}")
            dense.append(_log1p_int(value))
        else:
            raise CriteoFormatError(path, number, FIELD_NAMES[i], f"not an integer: {_show(text)}")
    values: list[int | None] = []
    for i in range(1 + NUM_DENSE, NUM_FIELDS):
        text = fields[i]
        if not text:
            values.append(None)
        elif _HEX_RE.fullmatch(text):
            values.append(int(text, 16))
        else:
            raise CriteoFormatError(path, number, FIELD_NAMES[i],
                                    f"not a hex value of 1-{MAX_HEX_DIGITS} digits: {_show(text)}")
    return int(fields[0]), dense, values


def _show(text: bytes, limit: int = 40) -> str:
    shown = text.decode("utf-8", "backslashreplace")
    return repr(shown if len(shown) <= limit else shown[:limit] + "...")


# ---------------------------------------------------------------- streaming reader


@dataclass(frozen=True, slots=True)
class ParsedChunk:
    """Samples decoded from one block of lines, in file order."""

    labels: np.ndarray
    """[n] float32 in {0, 1}."""
    dense: np.ndarray
    """[n, 13] float32, transformed."""
    rows: np.ndarray
    """[n, 26] int64, hashed into each table."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, slots=True)
class ParseReport:
    """What a pass over a Criteo file found."""

    path: str
    start: int
    """First line index read (0-based)."""
    stop: int | None
    """Line index the range ends before (``None``: the end of the file)."""
    lines: int
    """Lines read in the range, malformed ones included."""
    samples: int
    malformed: int
    errors: tuple[CriteoFormatError, ...]
    """The first :data:`MAX_REPORTED_ERRORS` malformed lines."""
    bytes_read: int
    seconds: float
    file_lines: int | None = None
    """Lines in the whole file, when the read reached its end (else ``None``)."""

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        """One line: counts, speed and the first malformed line if any."""
        text = (f"{self.path}: {self.samples:,} samples from {self.lines:,} lines "
                f"({self.malformed:,} malformed) in {self.seconds:.1f} s "
                f"({self.lines_per_s:,.0f} lines/s)")
        return text + (f"; first: {self.errors[0]}" if self.errors else "")


class CriteoReader:
    """Streams the samples of lines ``[start, stop)`` of a Criteo TSV file.

    Iterate to get :class:`ParsedChunk` blocks; :meth:`report` tells what was read so
    far. Memory is bounded by ``chunk_bytes`` (times a small factor, times ``workers``),
    not the file. ``progress(bytes_read, file_bytes)`` is called after every block.
    ``workers`` threads (default :func:`default_workers`) decode the next blocks while
    one is handed out (Arrow and numpy release the GIL for most of the work).
    """

    def __init__(self, path: str | os.PathLike[str], tables: TablesSpec | Sequence[int], *,
                 start: int = 0, stop: int | None = None, strict: bool = False,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        if start < 0 or (stop is not None and stop < start):
            raise ConfigError(f"line range must satisfy 0 <= start <= stop, got start={start}, "
                              f"stop={stop}")
        if chunk_bytes < 1:
            raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if workers is None:
            workers = default_workers()
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        self.path = str(path)
        self.sizes = table_sizes(tables)
        self.start, self.stop, self.strict = start, stop, strict
        self.chunk_bytes = chunk_bytes
        self.workers = workers
        self.progress = progress
        self._sizes = np.array(self.sizes, dtype=np.uint64)
        self._lines = self._samples = self._malformed = self._bytes = 0
        self._errors: list[CriteoFormatError] = []
        self._seconds = 0.0
        self._file_lines: int | None = None

    def report(self) -> ParseReport:
        return ParseReport(self.path, self.start, self.stop, self._lines, self._samples,
                           self._malformed, tuple(self._errors), self._bytes, self._seconds,
                           self._file_lines)

    def __iter__(self) -> Iterator[ParsedChunk]:
        """Blocks decoded in file order; with ``workers > 1`` the next blocks are decoded
        in threads (Arrow and numpy release the GIL) while one is handed out."""
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise CriteoFormatError(self.path, None, None, f"cannot open: {exc.strerror}") from None
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        with handle, pool if pool is not None else contextlib.nullcontext():
            total = os.fstat(handle.fileno()).st_size
            pending: deque[tuple[int, bytes | None, int, int,
                                 Future[_Decoded | None] | None]] = deque()
            blocks = _blocks(handle, self.start, self.stop, self.chunk_bytes)
            tick = time.perf_counter()
            while True:
                while len(pending) < self.workers:  # keep the pool busy
                    item = next(blocks, None)
                    if item is None:
                        break
                    first, block, lines = item
                    if block == b"":  # the end of the file
                        self._file_lines = first
                        continue
                    job = (pool.submit(_decode_block, block, lines, self._sizes)
                           if pool is not None and block is not None else None)
                    pending.append((first, block, lines, handle.tell(), job))
                if not pending:
                    break
                first, block, lines, done_bytes, job = pending.popleft()
                if block is None:
                    self._lines += 1
                    self._malformed_line(CriteoFormatError(
                        self.path, first + 1, None, f"longer than {MAX_LINE_BYTES} bytes"))
                    continue
                decoded = (job.result() if job is not None
                           else _decode_block(block, lines, self._sizes))
                chunk = self._decode(block, first, lines, decoded)
                self._bytes = done_bytes
                self._seconds += time.perf_counter() - tick
                if self.progress is not None:
                    self.progress(done_bytes, total)
                if len(chunk):
                    yield chunk
                tick = time.perf_counter()
            self._seconds += time.perf_counter() - tick

    def _decode(self, block: bytes, first: int, lines: int,
                decoded: _Decoded | None) -> ParsedChunk:
        """The samples of a block whose first line is ``first`` (0-based), from Arrow
        (``decoded``) where it took the block, else from its halves, down to
        :data:`_BISECT_LINES` lines parsed one by one."""
        if decoded is not None:
            return self._finish(decoded, block, first)
        if lines <= _BISECT_LINES:
            return self._reference(block, first)
        cut = _nth_newline(block, lines // 2) + 1
        halves = [(block[:cut], first, lines // 2), (block[cut:], first + lines // 2,
                                                     lines - lines // 2)]
        chunks = [self._decode(part, at, count, _decode_block(part, count, self._sizes))
                  for part, at, count in halves]
        return ParsedChunk(*(np.concatenate([getattr(c, f) for c in chunks])
                             for f in ("labels", "dense", "rows")))

    def _reference(self, block: bytes, first: int) -> ParsedChunk:
        """Every line of ``block`` through :func:`parse_line`."""
        parsed = []
        for i, line in enumerate(block.split(b"\n")[:-1]):
            self._lines += 1
            try:
                parsed.append(_parse_line(line, self.sizes, self.path, first + i + 1))
            except CriteoFormatError as exc:
                self._malformed_line(exc)
        self._samples += len(parsed)
        dense = np.array([p.dense for p in parsed], dtype=np.float32).reshape(-1, NUM_DENSE)
        rows = np.array([p.rows for p in parsed], dtype=np.int64).reshape(-1, NUM_SPARSE)
        return ParsedChunk(np.array([p.label for p in parsed], dtype=np.float32), dense, rows)

    def _finish(self, fast: _Decoded, block: bytes, first: int) -> ParsedChunk:
        """Decode the lines Arrow left with the reference parser; count and drop (or
        raise for) malformed ones."""
        n = fast.labels.size
        self._lines += n
        if fast.slow.size == 0:
            self._samples += n
            return ParsedChunk(fast.labels, fast.dense, fast.rows)
        line_end = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
        keep = np.ones(n, dtype=bool)
        labels, dense, rows = fast.labels, fast.dense, fast.rows
        for i in fast.slow.tolist():
            line = block[line_end[i - 1] + 1 if i else 0:line_end[i]]
            try:
                parsed = _parse_line(line, self.sizes, self.path, first + i + 1)
            except CriteoFormatError as exc:
                self._malformed_line(exc)
                keep[i] = False
                continue
            labels[i], dense[i], rows[i] = parsed.label, parsed.dense, parsed.rows
        self._samples += int(keep.sum())
        return ParsedChunk(labels[keep], dense[keep], rows[keep])

    def _malformed_line(self, error: CriteoFormatError) -> None:
        if self.strict:
            raise error
        self._malformed += 1
        if len(self._errors) < MAX_REPORTED_ERRORS:
            self._errors.append(error)


def _blocks(handle: BinaryIO, start: int, stop: int | None,
            chunk_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Blocks of whole lines (each ending in ``\\n``) of lines ``[start, stop)``, with
    the 0-based index of each block's first line and the block's line count; a last line
    without ``\\n`` gets one.
    A line longer than :data:`MAX_LINE_BYTES` is skipped unread and yields ``None``; the
    end of the file, when reached, yields an empty block whose index is the file's line
    count."""
    line = 0  # index of the next line to hand out
    head: list[bytes] = []  # the start of a line whose end is not read yet
    head_bytes = 0
    skipping = False  # inside an overlong line
    while stop is None or line < stop:
        data = handle.read(chunk_bytes)
        if not data:
            if skipping and line >= start:
                yield line, None, 1
            if skipping or not head:
                yield line + int(skipping), b"", 0
                return
            data = b"\n"  # end the last line
        if skipping:
            end = data.find(b"\n")
            if end < 0:
                continue
            if line >= start:
                yield line, None, 1
            line, skipping, data = line + 1, False, data[end + 1:]
            if (stop is not None and line >= stop) or not data:
                continue
        cut = data.rfind(b"\n")
        if cut < 0:
            head.append(data)
            head_bytes += len(data)
            if head_bytes > MAX_LINE_BYTES:
                head, head_bytes, skipping = [], 0, True
            continue
        block = b"".join([*head, data[:cut + 1]]) if head else data[:cut + 1]
        head = [data[cut + 1:]] if cut + 1 < len(data) else []
        head_bytes = len(data) - cut - 1
        count = block.count(b"\n")
        if line + count <= start:
            line += count
            continue
        if line < start:  # drop the lines before start
            block = block[_nth_newline(block, start - line) + 1:]
            count -= start - line
            line = start
        if stop is not None and line + count > stop:
            block = block[:_nth_newline(block, stop - line) + 1]
            count = stop - line
        yield line, block, count
        line += count


def _nth_newline(block: bytes, n: int) -> int:
    """Index of the ``n``-th (1-based) newline of ``block``."""
    return int(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)[n - 1])


@dataclass(frozen=True, slots=True)
class _Decoded:
    labels: np.ndarray
    """[n] float32."""
    dense: np.ndarray
    """[n, 13] float32."""
    rows: np.ndarray
    """[n, 26] int64."""
    slow: np.ndarray
    """Lines (block indices) that :func:`parse_line` must decide; their values are garbage."""


def _decode_block(block: bytes, lines: int, sizes: np.ndarray) -> _Decoded | None:
    """Decode a block of ``lines`` whole lines with Arrow's CSV reader, or ``None`` when
    Arrow cannot take it line for line (a wrong field count, a value its integer
    conversion refuses, a byte where it is more lenient than the grammar).

    Arrow splits the fields and converts ``I1..I13`` to int64; the label and the
    categorical fields come as raw bytes, checked and decoded here (all 8-digit values
    at once with ``bytes.fromhex``, else each as the 8-byte word that ends where it
    ends). Lines with a value these types cannot hold exactly (a categorical value over
    8 digits, an integer from 2**53 on) or that break the grammar are left to
    :func:`parse_line` (``slow``).
    """
    import pyarrow as pa
    from pyarrow import csv

    if (block.startswith((b"\n", b"\r\n", _BOM)) or b"\n\n" in block or b"\n\r\n" in block
            or any(c in block for c in _LENIENT)):
        return None  # Arrow reads an empty line as a row of nulls
    try:
        table = csv.read_csv(
            pa.py_buffer(block),
            read_options=csv.ReadOptions(column_names=list(FIELD_NAMES), use_threads=False,
                                         block_size=len(block) + 1),
            parse_options=csv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False,
                                           escape_char=False, ignore_empty_lines=False),
            convert_options=csv.ConvertOptions(
                column_types={name: pa.int64() if name.startswith("I") else pa.binary()
                              for name in FIELD_NAMES},
                null_values=[""], strings_can_be_null=False, quoted_strings_can_be_null=False))
    except pa.ArrowInvalid:
        return None
    if table.num_rows != lines:  # Arrow also ends a line at a lone \r
        return None
    columns = [c.chunk(0) if c.num_chunks == 1 else c.combine_chunks() for c in table.columns]

    # label: exactly one character, 0 or 1
    offsets, data = _binary_parts(columns[0])
    slow = (offsets[1:] - offsets[:-1]) != 1
    label = (np.frombuffer(data, dtype=np.uint8)[np.minimum(offsets[:-1], len(data) - 1)] - 48
             if len(data) else np.zeros(lines, dtype=np.uint8))
    slow |= label > 1

    # integer features: missing or negative -> 0
    ints = np.stack([c.fill_null(0).to_numpy() for c in columns[1:1 + NUM_DENSE]])  # [13, n]
    np.maximum(ints, 0, out=ints)
    slow |= (ints >= _EXACT_IN_FLOAT).any(axis=0)
    dense = np.log1p(ints.astype(np.float64)).astype(np.float32)

    # categorical features: hex digits, one table per row of [26, n]
    parts, lengths = [], np.empty((NUM_SPARSE, lines), dtype=np.int64)
    for c, column in enumerate(columns[1 + NUM_DENSE:]):
        offsets, data = _binary_parts(column)
        np.subtract(offsets[1:], offsets[:-1], out=lengths[c])
        parts.append(data[offsets[0]:offsets[-1]])
    text = b"".join(parts)
    present = lengths != 0
    values = _hex8(text, present) if ((lengths == 8) | ~present).all() else None
    if values is None:
        values, bad = _hex_words(text, lengths)
        slow |= bad.any(axis=0)
    rows = splitmix64(values)
    for c in range(NUM_SPARSE):  # one divisor per row: numpy divides by a scalar faster
        np.remainder(rows[c], sizes[c], out=rows[c])
    rows = rows.astype(np.int64)
    rows[~present] = MISSING_ROW
    return _Decoded(label.astype(np.float32), dense.T, rows.T, np.flatnonzero(slow))


def _hex8(text: bytes, present: np.ndarray) -> np.ndarray | None:
    """[26, n] uint64 values when ``text`` is the 8-digit hex values where ``present``
    (in row order), or ``None`` when it holds anything else."""
    try:
        raw = bytes.fromhex(text.decode("ascii"))
    except ValueError:  # not ASCII, not hex
        return None
    if 2 * len(raw) != len(text):  # fromhex skips whitespace
        return None
    values = np.zeros(present.shape, dtype=np.uint64)
    values[present] = np.frombuffer(raw, dtype=">u4")
    return values


def _hex_words(text: bytes, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[26, n] uint64 values of the hex values of ``lengths`` bytes each laid end to end
    in ``text``, and where a value is not 1-8 hex digits (its value is then garbage).

    Each value is the little-endian word that ends where it ends, its bytes before the
    value masked off; the checks and the decoding are SWAR arithmetic on the words."""
    size = np.minimum(lengths, 9).astype(np.uint8)  # 9: too long for a word
    ends = np.cumsum(lengths, axis=None).reshape(lengths.shape)
    words = _words(b"\0" * 8 + text)[ends].view("<u8")
    words &= _KEEP[size]
    bad = (size > 8) | ((words & _HIGH) != 0)
    lower = words | _LOWERCASE  # A-F -> a-f
    ok = ((lower + _GE_0) & ~(lower + _GE_COLON)) | ((lower + _GE_A) & ~(lower + _GE_G))
    ok &= words + _GE_SPACE  # control bytes would fold onto digits
    bad |= (ok & _HIGH) != (_KEEP[size] & _HIGH)
    nibbles = (words & _LOW_NIBBLES) + ((words >> np.uint64(6)) & _LOWEST_BITS) * np.uint64(9)
    v = ((nibbles & _M8) << np.uint64(4)) | ((nibbles >> np.uint64(8)) & _M8)
    v = ((v & _M16) << np.uint64(8)) | ((v >> np.uint64(16)) & _M16)
    return ((v & _M32) << np.uint64(16)) | (v >> np.uint64(32)), bad


def _binary_parts(array: Any) -> tuple[np.ndarray, memoryview]:
    """Offsets (int64, ``len + 1``) and data bytes of an Arrow binary array."""
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32, count=len(array) + 1,
                            offset=4 * array.offset).astype(np.int64)
    return offsets, memoryview(buffers[2] if buffers[2] is not None else b"")


def _words(text: bytes) -> np.ndarray:
    """``_words(text)[i]``: the 8 bytes ``text[i:i+8]`` (a strided view, no copy)."""
    return np.ndarray((len(text) - 7,), dtype="V8", buffer=text, strides=(1,))


# ---------------------------------------------------------------- binary cache


def record_dtype(sizes: Sequence[int]) -> np.dtype:
    """The cache's record: label float32, dense float32[13], rows int32[26] (int64 when
    a table has more than 2**31 rows)."""
    rows = "<i4" if max(sizes) <= 1 << 31 else "<i8"
    return np.dtype([("label", "<f4"), ("dense", "<f4", (NUM_DENSE,)),
                     ("rows", rows, (NUM_SPARSE,))])


@dataclass(frozen=True, slots=True)
class SourceStamp:
    """Identity of a source file as the cache checks it: size and modification time."""

    size: int
    """Bytes."""
    mtime_ns: int
    """Nanoseconds since the epoch."""

    @staticmethod
    def of(path: str | os.PathLike[str]) -> SourceStamp:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CriteoFormatError(str(path), None, None, f"cannot open: {exc.strerror}") from None
        return SourceStamp(st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class CacheHeader:
    """The JSON header of a cache file."""

    source: str
    """Path of the text file it was built from (informational; not checked)."""
    stamp: SourceStamp
    start: int
    stop: int | None
    table_sizes: tuple[int, ...]
    samples: int
    lines: int
    malformed: int
    errors: tuple[dict[str, Any], ...]
    """The first malformed lines: ``{"line", "field", "reason"}``."""
    parse_seconds: float
    version: int = CACHE_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "dlrm-criteo-cache", "version": self.version,
            "source": {"path": self.source, "size": self.stamp.size,
                       "mtime_ns": self.stamp.mtime_ns},
            "lines": {"start": self.start, "stop": self.stop},
            "table_sizes": list(self.table_sizes),
            "hash": f"splitmix64(int(value, 16)) % rows; missing -> row {MISSING_ROW}",
            "dense": "log1p(max(x, 0)) float32; missing -> 0",
            "record": record_dtype(self.table_sizes).descr,
            "samples": self.samples, "lines_read": self.lines, "malformed": self.malformed,
            "errors": list(self.errors), "parse_seconds": self.parse_seconds,
        }

    @staticmethod
    def from_json(doc: Any) -> CacheHeader:
        src, lines = doc["source"], doc["lines"]
        stop = lines["stop"]
        return CacheHeader(
            source=str(src["path"]), stamp=SourceStamp(int(src["size"]), int(src["mtime_ns"])),
            start=int(lines["start"]), stop=None if stop is None else int(stop),
            table_sizes=tuple(int(s) for s in doc["table_sizes"]), samples=int(doc["samples"]),
            lines=int(doc["lines_read"]), malformed=int(doc["malformed"]),
            errors=tuple(dict(e) for e in doc["errors"]), parse_seconds=float(doc["parse_seconds"]),
            version=int(doc["version"]))

    def inconsistency(self) -> str | None:
        """What in this header contradicts itself, or ``None``."""
        if len(self.table_sizes) != NUM_SPARSE or min(self.table_sizes) < 1:
            return f"table sizes {list(self.table_sizes)} are not 26 positive sizes"
        if self.samples < 0 or self.malformed < 0 or self.samples + self.malformed != self.lines:
            return (f"{self.samples} samples and {self.malformed} malformed lines do not make "
                    f"{self.lines} lines")
        if self.start < 0 or (self.stop is not None and self.stop - self.start < self.lines):
            return f"{self.lines} lines do not fit lines {self.start}:{self.stop}"
        return None

    def stale_reason(self, stamp: SourceStamp, sizes: Sequence[int], start: int,
                     stop: int | None) -> str | None:
        """Why this cache does not hold the given source, tables and lines, or ``None``."""
        if self.stamp.size != stamp.size:
            return f"the source's size changed ({self.stamp.size} -> {stamp.size} bytes)"
        if self.stamp.mtime_ns != stamp.mtime_ns:
            return "the source was modified after the cache was built"
        if self.table_sizes != tuple(sizes):
            return "the table sizes differ from the tables spec"
        if (self.start, self.stop) != (start, stop):
            return f"it holds lines [{self.start}, {self.stop}), not [{start}, {stop})"
        return None


class CriteoCache:
    """A read-only, memory-mapped cache file of parsed samples (see the module doc)."""

    def __init__(self, path: Path, header: CacheHeader, records: np.ndarray,
                 built: bool = False) -> None:
        self.path = path
        self.header = header
        self.records = records
        """[N] structured records (``label``, ``dense``, ``rows``), memory-mapped."""
        self.built = built
        """Whether this cache was built by the call that returned it (else reused)."""

    @staticmethod
    def open(path: str | os.PathLike[str], *, built: bool = False) -> CriteoCache:
        """Open a cache without checking it against a source (see :func:`open_or_build_cache`).

        Raises :class:`CriteoCacheError` for a missing, truncated or foreign file, another
        format version, a header that contradicts itself or the file's size, or records
        out of range among the first and last :data:`CHECKED_RECORDS` (every batch read
        later is checked too).
        """
        path = Path(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(len(CACHE_MAGIC))
                if size < CACHE_DATA_OFFSET + 16 or head != CACHE_MAGIC:
                    raise CriteoCacheError(f"{path}: not a Criteo cache file")
                f.seek(size - 16)
                tail = f.read(16)
                length = int.from_bytes(tail[:8], "little")
                if tail[8:] != CACHE_MAGIC or length > size - CACHE_DATA_OFFSET - 16:
                    raise CriteoCacheError(f"{path}: truncated Criteo cache file")
                f.seek(size - 16 - length)
                doc = json.loads(f.read(length))
        except FileNotFoundError:
            raise CriteoCacheError(f"{path}: no such cache file") from None
        except OSError as exc:
            raise CriteoCacheError(f"{path}: cannot read: {exc.strerror}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CriteoCacheError(f"{path}: unreadable cache header: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION:
            found = doc.get("version") if isinstance(doc, dict) else None
            raise CriteoCacheError(f"{path}: cache format version {found!r}, this reader "
                                   f"needs {CACHE_VERSION}; rebuild it")
        try:
            header = CacheHeader.from_json(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise CriteoCacheError(f"{path}: malformed cache header: {exc!r}{_REBUILD}") from None
        problem = header.inconsistency()
        if problem is not None:
            raise CriteoCacheError(f"{path}: corrupted cache header: {problem}{_REBUILD}")
        dtype = record_dtype(header.table_sizes)
        data_bytes = size - 16 - length - CACHE_DATA_OFFSET
        if data_bytes != header.samples * dtype.itemsize:
            raise CriteoCacheError(f"{path}: holds {data_bytes} bytes of records, the header "
                                   f"says {header.samples} samples of {dtype.itemsize} bytes")
        records = (np.memmap(path, dtype=dtype, mode="r", offset=CACHE_DATA_OFFSET,
                             shape=(header.samples,))
                   if header.samples else np.zeros(0, dtype=dtype))
        cache = CriteoCache(path, header, records, built)
        cache.check(0, min(CHECKED_RECORDS, len(cache)))
        cache.check(max(0, len(cache) - CHECKED_RECORDS), len(cache))
        return cache

    def check(self, lo: int, hi: int, records: np.ndarray | None = None) -> None:
        """Raise :class:`CriteoCacheError` naming the file and the first bad sample when a
        record of samples ``lo..hi-1`` (``records``, when given, holds them) has a row
        outside its table, a label other than 0/1 or a dense value that is negative or
        not finite: the file was damaged after it was written."""
        records = self.records[lo:hi] if records is None else records
        problem = _bad_record(records, np.asarray(self.table_sizes, dtype=np.int64))
        if problem is not None:
            index, what = problem
            raise CriteoCacheError(f"{self.path}: corrupted cache: sample {lo + index}: "
                                   f"{what}{_REBUILD}")

    def __len__(self) -> int:
        return self.header.samples

    @property
    def table_sizes(self) -> tuple[int, ...]:
        return self.header.table_sizes

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """[hi - lo, 26] int64 rows of samples ``lo..hi-1``."""
        return self.records["rows"][lo:hi].astype(np.int64)

    def row_chunks(self, limit: int | None = None, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
        """[n, 26] rows (int32 or int64, contiguous) of consecutive samples, ``chunk`` at a
        time, over the first ``limit`` samples (all when ``None``)."""
        end = len(self) if limit is None else min(limit, len(self))
        rows = self.records["rows"]
        for lo in range(0, end, chunk):
            block = np.ascontiguousarray(rows[lo:min(end, lo + chunk)])
            problem = _bad_rows(block, np.asarray(self.table_sizes, dtype=np.int64))
            if problem is not None:
                raise CriteoCacheError(f"{self.path}: corrupted cache: sample {lo + problem[0]}: "
                                       f"{problem[1]}{_REBUILD}")
            yield block


_REBUILD = "; delete the file and run again to rebuild it from the source"
CHECKED_RECORDS = 4096
"""Records checked at each end of a cache when it is opened."""


def _bad_rows(rows: np.ndarray, sizes: np.ndarray) -> tuple[int, str] | None:
    """The first sample (index) of ``rows`` [n, 26] with a row outside its table, and why."""
    bad = (rows < 0) | (rows >= sizes)
    if not bad.any():
        return None
    i, t = (int(x) for x in np.argwhere(bad)[0])
    return i, f"row {int(rows[i, t])} of table C{t + 1} is outside 0..{int(sizes[t]) - 1}"


def _bad_record(records: np.ndarray, sizes: np.ndarray) -> tuple[int, str] | None:
    """The first bad record (index) of ``records``, and why (see :meth:`CriteoCache.check`)."""
    found = _bad_rows(np.asarray(records["rows"]), sizes)
    labels, dense = np.asarray(records["label"]), np.asarray(records["dense"])
    bad_label = np.flatnonzero((labels != 0) & (labels != 1))
    bad_dense = np.flatnonzero(~(np.isfinite(dense) & (dense >= 0)).all(axis=1))
    candidates = [found] if found is not None else []
    if bad_label.size:
        i = int(bad_label[0])
        candidates.append((i, f"label {labels[i]!r} is not 0 or 1"))
    if bad_dense.size:
        i = int(bad_dense[0])
        candidates.append((i, "a dense value is negative or not finite"))
    return min(candidates) if candidates else None


def build_cache(source: str | os.PathLike[str], cache: str | os.PathLike[str],
                tables: TablesSpec | Sequence[int], *, start: int = 0, stop: int | None = None,
                strict: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                workers: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> CriteoCache:
    """Parse lines ``[start, stop)`` of ``source`` into the cache file ``cache``
    (replacing any file there, atomically) and open it.

    ``progress(bytes_read, source_bytes)`` is called after every block; ``workers``
    threads decode blocks (see :class:`CriteoReader`). The cache's directory is created
    if needed. Raises :class:`CriteoFormatError` for an unreadable source or, with
    ``strict=True``, the first malformed line; :class:`CriteoCacheError` when the source
    changes while it is read or the cache cannot be written. A failed build leaves any
    previous cache file as it was.
    """
    sizes = table_sizes(tables)
    cache = Path(cache)
    stamp = SourceStamp.of(source)
    dtype = record_dtype(sizes)
    reader = CriteoReader(source, sizes, start=start, stop=stop, strict=strict,
                          chunk_bytes=chunk_bytes, workers=workers, progress=progress)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=cache.name + ".", suffix=".tmp", dir=cache.parent)
    except OSError as exc:
        raise CriteoCacheError(f"{cache}: cannot write the cache: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(CACHE_MAGIC.ljust(CACHE_DATA_OFFSET, b"\0"))
            for chunk in reader:
                records = np.empty(len(chunk), dtype=dtype)
                records["label"] = chunk.labels
                records["dense"] = chunk.dense
                records["rows"] = chunk.rows
                f.write(records.data)
            report = reader.report()
            _check_range(report)
            if SourceStamp.of(source) != stamp:
                raise CriteoCacheError(f"{source}: changed while it was being cached; retry")
            header = CacheHeader(
                source=str(Path(source).resolve()), stamp=stamp, start=start, stop=stop,
                table_sizes=sizes, samples=report.samples, lines=report.lines,
                malformed=report.malformed, errors=tuple(e.to_json() for e in report.errors),
                parse_seconds=round(report.seconds, 3))
            text = json.dumps(header.to_json()).encode()
            f.write(text)
            f.write(len(text).to_bytes(8, "little") + CACHE_MAGIC)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache)
        _fsync_directory(cache.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CriteoCacheError(f"{cache}: cannot build the cache: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return CriteoCache.open(cache, built=True)


def _check_range(report: ParseReport) -> None:
    """Raise :class:`CriteoFormatError` when the line range read holds no sample: it
    starts beyond the end of the file, or all its lines are malformed (an empty file
    gives an empty cache)."""
    if report.samples or report.file_lines == 0:
        return
    lines = f"lines {report.start}:{'' if report.stop is None else report.stop}"
    if report.lines == 0 and report.file_lines is not None:
        raise CriteoFormatError(report.path, None, None,
                                f"{lines} are beyond the end of the file, which has "
                                f"{report.file_lines:,} lines")
    if report.lines == 0:
        raise CriteoFormatError(report.path, None, None, f"{lines} is an empty range")
    raise CriteoFormatError(report.path, None, None,
                            f"{lines} hold no valid sample: all {report.lines:,} are malformed "
                            f"(first: {report.errors[0]})")


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform allows opening directories)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_or_build_cache(source: str | os.PathLike[str], cache: str | os.PathLike[str],
                        tables: TablesSpec | Sequence[int], *, start: int = 0,
                        stop: int | None = None, strict: bool = False, rebuild: bool = True,
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES, workers: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> CriteoCache:
    """The cache of lines ``[start, stop)`` of ``source`` for these tables: opened when
    it exists and is fresh (same source size and mtime, table sizes, line range and
    format version), else built (``rebuild=True``) or refused with
    :class:`CriteoCacheError` naming the reason (``rebuild=False``).

    With ``strict=True`` a fresh cache that skipped malformed lines raises
    :class:`CriteoFormatError` for the first of them, as parsing would have.
    """
    sizes = table_sizes(tables)
    reason: str | None
    try:
        opened = CriteoCache.open(cache)
    except CriteoCacheError as exc:
        opened, reason = None, str(exc)
    else:
        reason = opened.header.stale_reason(SourceStamp.of(source), sizes, start, stop)
        if reason is not None:
            reason = f"{cache}: stale: {reason}"
    if opened is None or reason is not None:
        if not rebuild:
            raise CriteoCacheError(f"{reason}; rebuild it")
        opened = build_cache(source, cache, sizes, start=start, stop=stop, strict=strict,
                             chunk_bytes=chunk_bytes, workers=workers, progress=progress)
    if strict and opened.header.errors:
        first = opened.header.errors[0]
        raise CriteoFormatError(str(source), int(first["line"]), first["field"],
                                str(first["reason"]))
    return opened


# ---------------------------------------------------------------- batches


class CriteoClicks:
    """Batches of Criteo samples from caches, by index, like
    :class:`dlrm_runtime.data.SyntheticClicks`.

    Batch ``i`` holds samples ``i*B .. i*B+B-1`` of ``train`` in file order, wrapping
    around at the end (so the epoch is ``len(train) / B`` batches and later indices
    replay the data). Indices from :data:`dlrm_runtime.data.VALIDATION_OFFSET` on read
    ``validation`` the same way. Real data has no teacher: ``teacher_prob`` is NaN.
    No shuffling: samples come in file order. With ``tables``, the caches must have been
    built for its table sizes (else :class:`ConfigError`).
    """

    dense_features = NUM_DENSE

    def __init__(self, train: CriteoCache, validation: CriteoCache | None = None,
                 tables: TablesSpec | Sequence[int] | None = None) -> None:
        if tables is not None and table_sizes(tables) != train.table_sizes:
            raise ConfigError(f"{train.path} was built for other table sizes than the tables "
                              f"spec; rebuild it (open_or_build_cache does)")
        for cache in (train, validation):
            if cache is not None and len(cache) == 0:
                header = cache.header
                raise ConfigError(f"{header.source}: lines {header.start}:"
                                  f"{'' if header.stop is None else header.stop} hold no "
                                  f"samples (cache {cache.path})")
        if validation is not None:
            if validation.table_sizes != train.table_sizes:
                raise ConfigError(f"{validation.path}: table sizes differ from {train.path}")
        self.train = train
        self.validation = validation
        self.has_validation = validation is not None

    @property
    def table_sizes(self) -> tuple[int, ...]:
        return self.train.table_sizes

    def num_batches(self, batch_size: int, validation: bool = False) -> int:
        """Whole batches in one pass over the training (or validation) samples."""
        data = self.validation if validation else self.train
        return 0 if data is None else len(data) // batch_size

    def batch(self, index: int, batch_size: int) -> Batch:
        """Batch ``index`` of ``batch_size`` samples (see the class doc)."""
        if batch_size < 1 or index < 0:
            raise ConfigError(f"batch index must be >= 0 and batch size >= 1, got {index}, "
                              f"{batch_size}")
        data = self.train
        if index >= VALIDATION_OFFSET:
            if self.validation is None:
                raise ConfigError("no validation data: pass a validation cache to CriteoClicks")
            data, index = self.validation, index - VALIDATION_OFFSET
        n = len(data)
        lo = (index * batch_size) % n
        if lo + batch_size <= n:
            records = data.records[lo:lo + batch_size]
            data.check(lo, lo + batch_size, records)
        else:
            at = (lo + np.arange(batch_size)) % n
            records = data.records[at]
            problem = _bad_record(records, np.asarray(data.table_sizes, dtype=np.int64))
            if problem is not None:
                data.check(int(at[problem[0]]), int(at[problem[0]]) + 1)
        return records_to_batch(records)


def records_to_batch(records: np.ndarray) -> Batch:
    """A :class:`Batch` of cache records: dense [B, 13] float32, one id per sample and
    table (int64, offsets ``0..B``), labels [B] float32, ``teacher_prob`` NaN."""
    b = records.shape[0]
    # astype copies: the tensors own writable memory, never the read-only map
    rows = records["rows"].T.astype(np.int64, order="C")  # [26, B]
    offsets = torch.arange(b + 1, dtype=torch.int64)
    return Batch(
        dense=torch.from_numpy(records["dense"].astype(np.float32, order="C")),
        sparse=SparseBatch(tuple(torch.from_numpy(r) for r in rows),
                           tuple(offsets for _ in range(NUM_SPARSE))),
        labels=torch.from_numpy(records["label"].astype(np.float32, order="C")),
        teacher_prob=torch.full((b,), float("nan")),
    )
