"""On-disk layout of a table store and the table description kept in attributes.

A store is one zarr v3 group (a directory)::

    <store>/zarr.json                 group; attribute "dlrm_toolkit_store": {"format_version": 1}
    <store>/<table>/zarr.json         group per table; attributes {"dlrm_toolkit_table": spec}
    <store>/<table>/weight/           array (num_rows, dim), chunks (chunk_rows, dim)
    <store>/<table>/state/            optional array (num_rows, state_width) fp32, same chunk rows
    <store>/_txn/                     zero-length uint8 array holding the transaction files:
    <store>/_txn/redo/<table>@<array> redo segments: rows written since the last checkpoint
    <store>/_txn/sums.json            CRC-32C per block of every array (see storage.sums)
    <store>/_txn/checkpoint.json      last completed checkpoint (step, journal generation)
    <store>/_txn/lock                 flock: one writer, or any number of readers
    <store>/_txn/staging/             tables being built by add_table (renamed into place)

Arrays are uncompressed (a single little-endian ``bytes`` codec), C order, with the
default chunk key encoding, so chunk ``i`` of an array is the file ``c/i/0``
holding ``chunk_rows * width`` elements (edge chunks are full size, as zarr writes
them). The transaction files live inside an *array* node so that zarr's own
``Group.members()`` lists the store without warnings about unknown objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.dtypes import OptimizerState, StoreDType
from storage.errors import CorruptStoreError, TableSpecError
from storage.files import read_json

FORMAT_VERSION = 1
STORE_ATTR = "dlrm_toolkit_store"
TABLE_ATTR = "dlrm_toolkit_table"
TXN_ATTR = "dlrm_toolkit_transactions"
TXN_DIR = "_txn"
JOURNAL_FILE = "journal"
"""Name of the undo journal of stores made before redo segments (no longer written)."""
MARKER_FILE = "checkpoint.json"
LOCK_FILE = "lock"
STAGING_DIR = "staging"
WEIGHT = "weight"
STATE = "state"
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
"""Target bytes per weight chunk. bench/storage.py, 2M x 64 fp32 on this machine: bulk
zarr writes (fsynced) median 595 MB/s at 64 MiB chunks vs 389 at 16 MiB, 284 at 4 MiB
and 379 at 256 MiB; warm gathers are within noise from 16 MiB up (one ``take`` over
all chunks mapped side by side)."""
MIN_CHUNK_ROWS = 4096
"""Smallest default chunk: 4096 rows make whole 4 KiB pages for any row size."""
MAX_NAME_CHARS = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def check_table_name(name: object) -> str:
    """A table name: letters, digits, ``_ . -``; not starting with ``_`` or ``.``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        raise TableSpecError(str(name), "name", f"must match {_NAME_RE.pattern} and have at "
                             f"most {MAX_NAME_CHARS} characters, got {name!r}")
    return name


def default_chunk_rows(num_rows: int, row_bytes: int) -> int:
    """Largest power of two rows whose chunk is at most DEFAULT_CHUNK_BYTES, at least
    MIN_CHUNK_ROWS (so that weight and fp32 state chunks are whole pages); a table
    that fits in one such chunk is a single chunk of exactly its rows."""
    rows = MIN_CHUNK_ROWS
    while rows * 2 * row_bytes <= DEFAULT_CHUNK_BYTES:
        rows *= 2
    return max(1, min(rows, num_rows))


@dataclass(frozen=True, slots=True)
class StoredTableSpec:
    """What the store records about a table (in the attributes of its group and arrays).

    ``init`` is ``"uniform"``, ``"zeros"`` or ``"array"`` (imported); ``seed`` is the
    seed of a uniform init.
    """

    name: str
    num_rows: int
    dim: int
    dtype: StoreDType
    chunk_rows: int
    optimizer_state: OptimizerState | None = None
    init: str = "uniform"
    seed: int = 0

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    @property
    def state_width(self) -> int:
        return 0 if self.optimizer_state is None else self.optimizer_state.width(self.dim)

    def to_attrs(self) -> dict[str, Any]:
        return {
            "name": self.name, "num_rows": self.num_rows, "dim": self.dim,
            "dtype": self.dtype.value, "storage_dtype": self.dtype.numpy.name,
            "chunk_rows": self.chunk_rows,
            "optimizer_state": None if self.optimizer_state is None else self.optimizer_state.value,
            "state_dtype": "float32", "init": self.init, "seed": self.seed,
            "format_version": FORMAT_VERSION,
        }

    @staticmethod
    def from_attrs(doc: Any, where: str) -> StoredTableSpec:
        try:
            opt = doc["optimizer_state"]
            return StoredTableSpec(
                name=str(doc["name"]), num_rows=int(doc["num_rows"]), dim=int(doc["dim"]),
                dtype=StoreDType(doc["dtype"]), chunk_rows=int(doc["chunk_rows"]),
                optimizer_state=None if opt is None else OptimizerState(opt),
                init=str(doc.get("init", "uniform")), seed=int(doc.get("seed", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(where, f"table attributes are malformed ({exc!r}); "
                                           f"restore the store from a backup") from exc


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A table as :meth:`TableStore.describe` reports it.

    ``weight_bytes`` and ``state_bytes`` are the bytes of the chunk files on disk
    (whole chunks: the last one is padded to ``chunk_rows``).

    ``storage_dtype`` is the numpy dtype :meth:`TableStore.gather` returns (bf16:
    ``uint16`` bits); ``state_width`` is 0 without optimizer state.
    """

    name: str
    num_rows: int
    dim: int
    dtype: StoreDType
    storage_dtype: str
    chunk_rows: int
    num_chunks: int
    optimizer_state: OptimizerState | None
    state_width: int
    weight_bytes: int
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.state_bytes

    @staticmethod
    def of(spec: StoredTableSpec) -> TableInfo:
        padded_rows = spec.num_chunks * spec.chunk_rows
        return TableInfo(
            name=spec.name, num_rows=spec.num_rows, dim=spec.dim, dtype=spec.dtype,
            storage_dtype=spec.dtype.numpy.name, chunk_rows=spec.chunk_rows,
            num_chunks=spec.num_chunks, optimizer_state=spec.optimizer_state,
            state_width=spec.state_width,
            weight_bytes=padded_rows * spec.dim * spec.dtype.itemsize_bytes,
            state_bytes=padded_rows * spec.state_width * 4,
        )


@dataclass(frozen=True, slots=True)
class ArrayLayout:
    """Where and how the rows of one stored array lie in its chunk files."""

    path: Path
    num_rows: int
    width: int
    dtype_str: str
    chunk_rows: int
    fill_value: float

    @property
    def row_bytes(self) -> int:
        return self.width * int(self.itemsize_bytes)

    @property
    def itemsize_bytes(self) -> int:
        return np.dtype(self.dtype_str).itemsize

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.row_bytes

    def chunk_path(self, chunk: int) -> Path:
        return self.path / "c" / str(chunk) / "0"


_ZARR_DTYPES = {"float32": "<f4", "float16": "<f2", "uint16": "<u2"}


def read_array_layout(path: Path) -> ArrayLayout:
    """Parse an array's ``zarr.json`` and check that its chunks can be accessed directly.

    Raises :class:`CorruptStoreError` for arrays that are compressed, sharded, not
    2-D, chunked along columns, or use another chunk key encoding.
    """
    meta_path = path / "zarr.json"
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(meta_path, f"cannot read array metadata ({exc}); restore the "
                                           f"store from a backup") from exc
    problem = _layout_problem(meta)
    if problem:
        raise CorruptStoreError(path, f"{problem}; the direct row path needs uncompressed, "
                                      f"row-chunked arrays (re-import the table)")
    return ArrayLayout(path=path, num_rows=int(meta["shape"][0]), width=int(meta["shape"][1]),
                       dtype_str=_ZARR_DTYPES[meta["data_type"]],
                       chunk_rows=int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]),
                       fill_value=float(meta.get("fill_value") or 0))


def _layout_problem(meta: Any) -> str:
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        return "not a zarr v3 array"
    shape = meta.get("shape", [])
    if len(shape) != 2:
        return f"shape {shape} is not 2-D"
    if meta.get("data_type") not in _ZARR_DTYPES:
        return f"data type {meta.get('data_type')!r} is not float32, float16 or uint16"
    grid = meta.get("chunk_grid", {})
    chunks = grid.get("configuration", {}).get("chunk_shape", [])
    if grid.get("name") != "regular" or len(chunks) != 2 or chunks[1] != shape[1]:
        return f"chunk grid {grid} does not hold whole rows"
    key = meta.get("chunk_key_encoding", {})
    if key.get("name") != "default" or key.get("configuration", {}).get("separator", "/") != "/":
        return f"chunk key encoding {key} is not the default '/'"
    codecs = meta.get("codecs", [])
    if (len(codecs) != 1 or codecs[0].get("name") != "bytes"
            or codecs[0].get("configuration", {}).get("endian", "little") != "little"):
        return f"codecs {codecs} are not a single little-endian bytes codec"
    if meta.get("storage_transformers"):
        return "storage transformers are set"
    return ""
