"""The Criteo click-log format and its transformations: fields, errors, the hash of
categorical values and the dense transform, and :func:`parse_line`, the reference
parser of one line (see :mod:`dlrm_runtime.data.criteo` for the whole format)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlrm_runtime.errors import ConfigError, RuntimeErrorBase
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
    return parse_line_bytes(line.encode() if isinstance(line, str) else line, table_sizes(tables),
                       path, line_number)


def parse_line_bytes(line: bytes, sizes: tuple[int, ...], path: str, number: int) -> ParsedLine:
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


