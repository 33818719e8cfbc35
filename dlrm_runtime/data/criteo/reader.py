"""Streaming, multi-threaded parsing of Criteo TSV blocks into fixed-size records
(:class:`CriteoReader`): Arrow's CSV reader for the fields, numpy for labels and hex
values, :func:`~dlrm_runtime.data.criteo.format.parse_line` for what Arrow cannot hold
exactly."""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from dlrm_runtime.data.criteo.format import (
    DEFAULT_CHUNK_BYTES,
    FIELD_NAMES,
    MAX_LINE_BYTES,
    MAX_REPORTED_ERRORS,
    MISSING_ROW,
    NUM_DENSE,
    NUM_SPARSE,
    CriteoFormatError,
    default_workers,
    parse_line_bytes,
    splitmix64,
    table_sizes,
)
from dlrm_runtime.errors import ConfigError
from planner import TablesSpec

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
        try:
            skip_file_head(handle, self.path)
        except CriteoFormatError:
            handle.close()
            raise
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
                parsed.append(parse_line_bytes(line, self.sizes, self.path, first + i + 1))
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
                parsed = parse_line_bytes(line, self.sizes, self.path, first + i + 1)
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


_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"BZh", "bzip2", "bunzip2 -k"),
               (b"\xfd7zXZ\x00", "xz", "unxz -k"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"))
"""(magic bytes, format, the command that decompresses beside the file)."""


def skip_file_head(handle: BinaryIO, path: str) -> None:
    """Position ``handle`` at the file's first line: past a UTF-8 byte-order mark (an
    editor's, not data); :class:`CriteoFormatError` for a compressed file (the reader
    seeks by byte, so it reads the decompressed TSV)."""
    head = handle.read(6)
    for magic, kind, command in _COMPRESSED:
        if head.startswith(magic):
            raise CriteoFormatError(path, None, None, f"is {kind}-compressed; decompress it "
                                                      f"first ({command} {path}) and pass the "
                                                      f"TSV")
    handle.seek(len(_BOM) if head.startswith(_BOM) else 0)


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


