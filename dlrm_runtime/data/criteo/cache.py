"""The binary cache of parsed Criteo lines (:class:`CriteoCache`, :func:`build_cache`,
:func:`open_or_build_cache`): one file of fixed-size records with a self-checking
header, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlrm_runtime.data.criteo.format import (
    CACHE_DATA_OFFSET,
    CACHE_MAGIC,
    CACHE_VERSION,
    DEFAULT_CHUNK_BYTES,
    MISSING_ROW,
    NUM_DENSE,
    NUM_SPARSE,
    CriteoCacheError,
    CriteoFormatError,
    table_sizes,
)
from dlrm_runtime.data.criteo.reader import CriteoReader, ParseReport
from dlrm_runtime.files import fsync_dir
from planner import TablesSpec


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
        problem = bad_record(records, np.asarray(self.table_sizes, dtype=np.int64))
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
            problem = bad_rows(block, np.asarray(self.table_sizes, dtype=np.int64))
            if problem is not None:
                raise CriteoCacheError(f"{self.path}: corrupted cache: sample {lo + problem[0]}: "
                                       f"{problem[1]}{_REBUILD}")
            yield block


_REBUILD = "; delete the file and run again to rebuild it from the source"
CHECKED_RECORDS = 4096
"""Records checked at each end of a cache when it is opened."""


def bad_rows(rows: np.ndarray, sizes: np.ndarray) -> tuple[int, str] | None:
    """The first sample (index) of ``rows`` [n, 26] with a row outside its table, and why."""
    bad = (rows < 0) | (rows >= sizes)
    if not bad.any():
        return None
    i, t = (int(x) for x in np.argwhere(bad)[0])
    return i, f"row {int(rows[i, t])} of table C{t + 1} is outside 0..{int(sizes[t]) - 1}"


def bad_record(records: np.ndarray, sizes: np.ndarray) -> tuple[int, str] | None:
    """The first bad record (index) of ``records``, and why (see :meth:`CriteoCache.check`)."""
    found = bad_rows(np.asarray(records["rows"]), sizes)
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
        fsync_dir(cache.parent)
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


