"""Block checksums of the committed rows: a CRC-32C per block of every array.

A block is :func:`block_rows` consecutive rows (about BLOCK_BYTES). The checksums of
every array of a store live in one file, ``_txn/sums.json``, replaced atomically when
a table is added (all of its blocks) and at each checkpoint (the blocks the checkpoint
changed, computed after its rows are applied and synced). A block is checked the
first time a read touches it after opening (so the cost is amortised over the reads),
and every block by :meth:`storage.TableStore.verify`.

CRC-32C is google-crc32c (hardware CRC32 instructions; a dependency of zarr already):
measured here 16.7 GB/s against zlib.crc32's 7.0 GB/s (bench/checksums.py).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.chunks import ChunkFiles
from storage.errors import CorruptStoreError
from storage.files import write_json_atomic
from storage.redo import crc32c

BLOCK_BYTES = 1024 * 1024
"""Target bytes per checksummed block."""
SUMS_FILE = "sums.json"
"""In ``_txn/``: the block checksums of every array."""
SUMS_FORMAT = 1

ProgressFn = Callable[[int, int], None]
"""``progress(blocks_done, blocks_total)``."""


def block_rows(row_bytes: int) -> int:
    """Rows per checksummed block of an array of ``row_bytes`` rows."""
    return max(1, BLOCK_BYTES // max(1, row_bytes))


@dataclass(frozen=True, slots=True)
class BlockDamage:
    """One block whose rows do not match their checksum (or could not be read)."""

    store: str
    """The store's directory."""
    array: str
    """``"<table>/<array>"``."""
    block: int
    """Block number (-1: the array as a whole could not be read)."""
    row_start: int
    row_stop: int
    detail: str

    def __str__(self) -> str:
        where = ("" if self.block < 0
                 else f" block {self.block} (rows {self.row_start}-{self.row_stop - 1})")
        return f"{self.store}: array {self.array!r}{where}: {self.detail}"


def block_crc(files: ChunkFiles, block: int, rows: int) -> int:
    """CRC-32C of block ``block`` (``rows`` rows per block) of ``files``."""
    layout = files.layout
    start = block * rows
    stop = min(layout.num_rows, start + rows)
    buffer = np.empty((stop - start, layout.width), dtype=layout.dtype_str)
    files.read(np.arange(start, stop, dtype=np.int64), buffer)
    return crc32c(buffer)


class BlockSums:
    """The checksums of one store's arrays and which blocks were checked since opening."""

    def __init__(self, txn_dir: Path) -> None:
        self.path = txn_dir / SUMS_FILE
        self._rows: dict[str, int] = {}
        self._sums: dict[str, np.ndarray] = {}
        self._checked: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, txn_dir: Path) -> BlockSums:
        """The store's checksums (none for a store made before they existed)."""
        sums = cls(txn_dir)
        try:
            raw = sums.path.read_bytes()
        except FileNotFoundError:
            return sums
        try:
            doc = json.loads(raw)
            arrays = doc["arrays"]
            if doc["crc"] != _doc_crc(arrays) or doc["format"] != SUMS_FORMAT:
                raise ValueError("its own CRC-32C does not match")
            for key, entry in arrays.items():
                values = np.frombuffer(base64.b64decode(entry["crc"]), dtype="<u4").copy()
                sums._rows[key] = int(entry["block_rows"])
                sums._sums[key] = values
                sums._checked[key] = np.zeros(values.size, dtype=bool)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptStoreError(sums.path, f"block checksums are unreadable ({exc}); "
                                               f"restore the store from a backup") from exc
        return sums

    def has(self, key: str) -> bool:
        return key in self._sums

    def block_rows_of(self, key: str) -> int:
        return self._rows[key]

    def blocks_of(self, key: str) -> int:
        return int(self._sums[key].size) if key in self._sums else 0

    def compute(self, key: str, files: ChunkFiles, blocks: np.ndarray | None = None,
                progress: ProgressFn | None = None) -> None:
        """(Re)compute the checksums of ``blocks`` (every block when None) from the
        chunk files; they count as checked."""
        layout = files.layout
        rows = block_rows(layout.row_bytes)
        total = -(-layout.num_rows // rows)
        if key not in self._sums or self._rows[key] != rows or self._sums[key].size != total:
            self._rows[key] = rows
            self._sums[key] = np.zeros(total, dtype="<u4")
            self._checked[key] = np.zeros(total, dtype=bool)
            blocks = None
        todo = np.arange(total) if blocks is None else blocks
        for done, block in enumerate(todo.tolist(), 1):
            self._sums[key][block] = block_crc(files, block, rows)
            if progress is not None:
                progress(done, todo.size)
        self._checked[key][todo] = True

    def check(self, key: str, files: ChunkFiles, ids: np.ndarray) -> None:
        """Check the blocks of rows ``ids`` not checked since opening (the amortised
        part of the read path); :class:`CorruptStoreError` naming array and block."""
        checked = self._checked.get(key)
        if checked is None or ids.size == 0:
            return
        blocks = ids // self._rows[key]
        if checked[blocks].all():
            return
        for block in np.unique(blocks[~checked[blocks]]).tolist():
            damage = self.check_block(key, files, block)
            if damage is not None:
                raise CorruptStoreError(files.layout.path, f"{damage}; the chunk file is "
                                                           f"damaged: restore the store from "
                                                           f"a backup (dlrm-store verify DIR "
                                                           f"lists every damaged block)")

    def check_block(self, key: str, files: ChunkFiles, block: int) -> str | None:
        """None when block ``block`` matches its checksum (it then counts as checked),
        else what is wrong."""
        rows = self._rows[key]
        found = block_crc(files, block, rows)
        stored = int(self._sums[key][block])
        if found != stored:
            start = block * rows
            stop = min(files.layout.num_rows, start + rows)
            return (f"block {block} (rows {start}-{stop - 1}) fails its checksum "
                    f"(CRC-32C {found:#010x}, recorded {stored:#010x})")
        self._checked[key][block] = True
        return None

    def unchecked(self, key: str, blocks: np.ndarray) -> np.ndarray:
        """Those of ``blocks`` not checked since opening."""
        checked = self._checked.get(key)
        if checked is None:
            return blocks[:0]
        return blocks[~checked[blocks]]

    def forget(self, key: str) -> None:
        for table in (self._rows, self._sums, self._checked):
            table.pop(key, None)

    def save(self) -> None:
        """Replace the checksum file atomically."""
        arrays = {key: {"block_rows": self._rows[key],
                        "crc": base64.b64encode(self._sums[key].astype("<u4").tobytes())
                        .decode("ascii")}
                  for key in sorted(self._sums)}
        write_json_atomic(self.path, {"format": SUMS_FORMAT, "arrays": arrays,
                                      "crc": _doc_crc(arrays)})


def _doc_crc(arrays: object) -> int:
    return crc32c(json.dumps(arrays, sort_keys=True).encode("utf-8"))
