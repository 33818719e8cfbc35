"""The table store: embedding tables as zarr arrays, row access, crash-safe checkpoints.

>>> store = TableStore.create("tables.zarr")
>>> store.add_table("users", num_rows=1_000_000, dim=64, optimizer_state="rowwise_adagrad")
>>> rows = store.gather("users", ids)            # (len(ids), 64) float32
>>> store.scatter("users", ids, rows - lr * grad)
>>> store.checkpoint(step=100)                   # durable: a crash now reopens at step 100
>>> store.close()                                # discards writes after the last checkpoint
>>> store = TableStore.open("tables.zarr", mode="r+")

Layout: :mod:`storage.layout`; row path: :mod:`storage.chunks`; rows written since the
last checkpoint: :mod:`storage.redo`; checkpoint protocol: :mod:`storage.journal`;
block checksums: :mod:`storage.sums`. zarr's API creates the arrays and writes the initial rows;
gather and scatter read and write the chunk files directly.

Semantics worth knowing:

* ``scatter`` with duplicate ids: the last occurrence wins.
* Writes are visible to ``gather`` at once but durable only at ``checkpoint``; a
  write does no sync (its rows wait in a redo segment, :mod:`storage.redo`). After a
  crash at any instant the store reopens at the last completed checkpoint
  (``checkpoint_step``). ``close()`` (and leaving a ``with`` block) also discards
  uncommitted writes; call ``checkpoint`` first.
* Committed rows are checksummed per block (:mod:`storage.sums`): a block is checked
  the first time a read touches it after opening, and :meth:`TableStore.verify`
  checks them all. Opening never writes unless a committed checkpoint must be
  finished (its rows applied).
* Two-phase checkpoints, for a checkpoint that must commit together with other
  stores or files (one per rank of a distributed run): ``prepare(step)`` makes the
  writes durable but keeps their undo records; the store is then in doubt
  (``prepared_step``) until ``commit_prepared()`` or ``rollback()``, also across a
  crash: opening an in-doubt store rolls nothing back (and closing it neither), so
  the coordinator that knows the outcome decides (see :mod:`storage.journal`).
* ``add_table`` is not part of a checkpoint: a table is durable once it returns.
* One writer (``mode="r+"``, an exclusive lock) or any number of readers (``"r"``,
  a shared lock) at a time. A reader refuses a store that a crashed writer left
  with uncommitted writes (:class:`RecoveryRequiredError`). Not thread-safe, except
  that ``gather``/``scatter`` calls on *different* tables may come from different
  threads (scatters are serialised by a lock: they share the journal), as the row
  caches of several tables do with their background threads.
* bf16 tables store and return raw bf16 bits as ``uint16`` (see :mod:`storage.dtypes`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from storage import journal as jr
from storage.chunks import MAPPED_BYTES_BUDGET, PAGE_BYTES, ChunkFiles, sync_files
from storage.redo import HEADER_BYTES as REDO_HEADER_BYTES
from storage.redo import REDO_MEMORY_BYTES, RedoSegment, SegmentSeal, segment_name
from storage.sums import BlockDamage, BlockSums
from storage.sums import ProgressFn as VerifyProgressFn
from storage.dtypes import OptimizerState, StoreDType, is_torch_tensor, to_stored, torch_to_numpy
from storage.errors import (
    CorruptStoreError,
    FormatVersionError,
    MissingArrayError,
    ReadOnlyStoreError,
    RecoveryRequiredError,
    RowIndexError,
    RowShapeError,
    StoreArgumentError,
    StoreClosedError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    TableExistsError,
)
from storage.files import fsync_dir, read_json
from storage.layout import (
    FORMAT_VERSION,
    LOCK_FILE,
    MARKER_FILE,
    STAGING_DIR,
    STATE,
    STORE_ATTR,
    TABLE_ATTR,
    TXN_ATTR,
    TXN_DIR,
    WEIGHT,
    StoredTableSpec,
    TableInfo,
    read_array_layout,
)
from storage.tables import ProgressFn, build_table, check_init_array, make_spec

Mode = Literal["r", "r+"]
PREPARED_FILE = "prepared.json"
"""In ``_txn/``: the step and journal generation of an in-doubt (prepared) checkpoint."""
REDO_DIR = "redo"
"""In ``_txn/``: the redo segments (:mod:`storage.redo`)."""
SYNC_THREADS = 8
"""Threads that fdatasync chunk files at flush/checkpoint (overlapping device flushes)."""


class TableStore:
    """A directory of embedding tables; see the module docstring. Use as a context manager."""

    def __init__(self, path: Path, mode: Mode, lock_fd: int, map_budget_bytes: int,
                 redo_memory_bytes: int = REDO_MEMORY_BYTES) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        self._path = path
        self._mode = mode
        self._map_budget = map_budget_bytes
        self._redo_budget = redo_memory_bytes
        self._redo_memory = 0
        """Bytes of redo slots held in memory, counted up by scatters (an upper bound:
        recounted when over the budget)."""
        self._lock_fd = lock_fd
        self._txn = path / TXN_DIR
        self._specs: dict[str, StoredTableSpec] = {}
        self._files: dict[tuple[str, str], ChunkFiles] = {}
        self._checkpoint = jr.read_checkpoint(self._txn, MARKER_FILE)
        self._store_id = (bytes.fromhex(self._checkpoint.store_id)
                          if self._checkpoint.store_id else bytes(16))
        self._prepared: int | None = None
        """Step of the in-doubt prepared checkpoint (None: not in doubt)."""
        self._prepared_seals: tuple[SegmentSeal, ...] = ()
        self._segments: dict[str, RedoSegment] = {}
        """Rows written since the last checkpoint, per array key ``table/role``."""
        self._sums = BlockSums.load(self._txn)
        self._broken: str | None = None
        """Why writes are refused until the store is reopened (a failed checkpoint)."""
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._close_hooks: list[Callable[[], None]] = []
        self._write_lock = threading.Lock()
        """Serialises :meth:`scatter` calls (the row caches of different tables write
        back on their own threads)."""

    # ---- opening ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, overwrite: bool = False,
               map_budget_bytes: int = MAPPED_BYTES_BUDGET,
               redo_memory_bytes: int = REDO_MEMORY_BYTES) -> TableStore:
        """Create an empty store at ``path`` and return it open for writing.

        ``overwrite=True`` replaces an existing *table store* (never another directory).
        ``map_budget_bytes``, ``redo_memory_bytes``: as for :meth:`open`.
        """
        import zarr

        budget = _check_map_budget(map_budget_bytes)
        redo_memory = _check_redo_memory(redo_memory_bytes)
        root = Path(path)
        if root.exists():
            if not overwrite:
                raise StoreExistsError(root, "already exists; pass overwrite=True to replace "
                                             "a store, or pick another path")
            if root.is_dir() and any(root.iterdir()) and not _is_store(root):
                raise StoreExistsError(root, "is a non-empty directory that is not a table "
                                             "store; remove it yourself or pick another path")
            if root.is_dir():
                locked = (_lock(root, "r+")  # never under another open handle
                          if (root / TXN_DIR / LOCK_FILE).is_file() else None)
                try:
                    shutil.rmtree(root)
                finally:
                    if locked is not None:
                        os.close(locked)
            else:
                raise StoreExistsError(root, "is a file; remove it or pick another path")
        group = zarr.open_group(root, mode="w",
                                attributes={STORE_ATTR: {"format_version": FORMAT_VERSION}})
        group.create_array(TXN_DIR, shape=(0,), chunks=(1,), dtype="uint8", compressors=None,
                           attributes={TXN_ATTR: {
                               "note": "zero-length array whose directory holds the redo "
                                       "segments, checkpoint marker, block checksums and "
                                       "lock of the table store",
                               "files": [REDO_DIR, MARKER_FILE, LOCK_FILE]}})
        txn = root / TXN_DIR
        (txn / LOCK_FILE).touch()
        jr.write_checkpoint(txn, MARKER_FILE, jr.Checkpoint(step=None, generation=0,
                                                            store_id=uuid.uuid4().hex))
        BlockSums(txn).save()
        for directory in (txn, root, root.parent):
            fsync_dir(directory)
        return cls.open(root, mode="r+", map_budget_bytes=budget,
                        redo_memory_bytes=redo_memory)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: Mode = "r", *,
             map_budget_bytes: int = MAPPED_BYTES_BUDGET,
             redo_memory_bytes: int = REDO_MEMORY_BYTES) -> TableStore:
        """Open a store. ``"r+"`` first rolls back writes after the last checkpoint.

        ``map_budget_bytes`` bounds the pages each array keeps mapped (they count in the
        process's resident set): an array up to this size is mapped whole (fastest), a
        larger one in slices whose pages are unmapped as rows are touched, so a table
        larger than RAM trains with a bounded resident set (about this many bytes per
        array in use), at the cost of a minor fault per row touched again.

        ``redo_memory_bytes`` bounds the process memory that holds the rows written since
        the last checkpoint (all arrays together, :mod:`storage.redo`); past it, the
        largest segments move their rows to their files (a sequential write, no sync).
        """
        if mode not in ("r", "r+"):
            raise StoreArgumentError(f"mode must be 'r' or 'r+', got {mode!r}")
        budget = _check_map_budget(map_budget_bytes)
        redo_memory = _check_redo_memory(redo_memory_bytes)
        root = Path(path)
        _check_store(root)
        lock_fd = _lock(root, mode)
        try:
            store = cls(root, mode, lock_fd, budget, redo_memory)
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            store._load_specs()
            if mode == "r+":
                store._recover()
            elif store._checkpoint.apply is not None or store._in_doubt() is not None:
                raise RecoveryRequiredError(root, store._checkpoint.step)
        except BaseException:
            store._release()
            raise
        return store

    def _load_specs(self) -> None:
        for entry in sorted(self._path.iterdir()):
            meta = entry / "zarr.json"
            if entry.name.startswith((".", "_")) or not meta.is_file():
                continue
            doc = read_json(meta)
            attrs = doc.get("attributes", {}).get(TABLE_ATTR)
            if doc.get("node_type") == "group" and attrs is not None:
                self._specs[entry.name] = StoredTableSpec.from_attrs(attrs, str(meta))

    def _in_doubt(self) -> jr.Checkpoint | None:
        """The prepared checkpoint of the active generation (None when not in doubt);
        :class:`CorruptStoreError` for one that cannot be this store's."""
        prepared = jr.read_prepared(self._txn, PREPARED_FILE)
        active = self._checkpoint.generation + 1
        if prepared is None or prepared.generation < active:
            return None
        if prepared.generation > active:
            raise CorruptStoreError(self._txn / PREPARED_FILE,
                                    f"prepared generation {prepared.generation} is ahead of "
                                    f"the checkpoint marker ({active - 1}); restore the store "
                                    f"from a backup")
        if prepared.store_id != self._checkpoint.store_id:
            raise CorruptStoreError(self._txn / PREPARED_FILE,
                                    "prepared checkpoint of another store; restore the store "
                                    "from a backup")
        return prepared

    def _recover(self) -> None:
        """Finish a committed checkpoint whose rows are not all applied; take the sealed
        segments of an in-doubt prepared checkpoint (see :meth:`prepare`). Uncommitted
        segments are not read (their rows were never part of the store). Nothing is
        written unless there is something to finish or a leftover to remove."""
        txn = self._txn
        for name in (MARKER_FILE, PREPARED_FILE):
            for stale in jr.stale_temporaries(txn, name):
                stale.unlink(missing_ok=True)
        if (txn / STAGING_DIR).exists():
            shutil.rmtree(txn / STAGING_DIR, ignore_errors=True)
        committed = self._checkpoint
        prepared = self._in_doubt()
        if committed.apply is not None:
            self._load_seals(committed.apply, committed.generation,
                             f"committed checkpoint step {committed.step}")
            self._finish(committed)
        if prepared is not None:
            self._load_seals(prepared.apply or (), prepared.generation,
                             f"prepared checkpoint step {prepared.step}")
            self._prepared = prepared.step
            self._prepared_seals = prepared.apply or ()
        elif (txn / PREPARED_FILE).exists():  # its commit completed; only the removal was missing
            jr.remove_marker(txn, PREPARED_FILE)

    def _load_seals(self, seals: Iterable[SegmentSeal], generation: int, what: str) -> None:
        for seal in seals:
            table, _, role = seal.key.partition("/")
            if table not in self._specs or role not in (WEIGHT, STATE):
                raise CorruptStoreError(self._txn / MARKER_FILE,
                                        f"{what} names array {seal.key!r}, which the store "
                                        f"lacks; restore the store from a backup")
            segment = self._segment(table, role)
            segment.load(seal, generation, self._spec(table).num_rows, what)

    def _segment(self, name: str, role: str) -> RedoSegment:
        key = f"{name}/{role}"
        segment = self._segments.get(key)
        if segment is None:
            files = self._chunk_files(name, role)
            segment = self._segments[key] = RedoSegment(
                self._txn / REDO_DIR / segment_name(key), key, files.layout.row_bytes,
                self._store_id, files.layout.num_rows,
                self._share_slots(files.layout.num_rows, files.layout.row_bytes))
        return segment

    def _share_slots(self, num_rows: int, row_bytes: int) -> int:
        """Redo slots of an array's share of ``redo_memory_bytes``: the budget split over
        the store's arrays in proportion to their slot bytes (row id + row)."""
        def slot_bytes(spec: StoredTableSpec) -> int:
            widths = [spec.dim * spec.dtype.numpy.itemsize]
            if spec.optimizer_state is not None:
                widths.append(4 * spec.state_width)
            return spec.num_rows * sum(8 + width for width in widths)

        total = sum(slot_bytes(spec) for spec in self._specs.values())
        mine = num_rows * (8 + row_bytes)
        if total <= 0 or mine <= 0:
            return 0
        return int(self._redo_budget * mine / max(total, self._redo_budget)) // (8 + row_bytes)

    # ---- description ----------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def checkpoint_step(self) -> int | None:
        """Step of the last completed checkpoint (None before the first)."""
        return self._checkpoint.step

    @property
    def prepared_step(self) -> int | None:
        """Step of a prepared checkpoint awaiting :meth:`commit_prepared` or
        :meth:`rollback` (None when the store is not in doubt)."""
        return self._prepared

    def tables(self) -> tuple[str, ...]:
        """Names of the tables, sorted."""
        return tuple(sorted(self._specs))

    def describe(self, name: str) -> TableInfo:
        return TableInfo.of(self._spec(name))

    def uncommitted_journal_bytes(self) -> int:
        """Bytes of rows held in redo segments since the last checkpoint (0 when none)."""
        return sum(seg.bytes_used - REDO_HEADER_BYTES for seg in self._segments.values()
                   if seg.rows)

    def uncommitted_rows(self) -> int:
        """Distinct rows written since the last checkpoint (all arrays)."""
        return sum(seg.rows for seg in self._segments.values())

    # ---- tables -------------------------------------------------------------------
    def add_table(self, name: str, num_rows: int, dim: int, *, dtype: str | StoreDType = "fp32",
                  init: str | Any = "uniform", seed: int = 0,
                  optimizer_state: str | OptimizerState | None = None,
                  chunk_rows: int | None = None,
                  progress: ProgressFn | None = None) -> TableInfo:
        """Add a table of ``num_rows`` x ``dim`` and write its initial rows.

        ``init``: ``"uniform"`` (U(-sqrt(1/num_rows), +sqrt(1/num_rows)), the DLRM
        paper's init, from ``seed``), ``"zeros"``, a numpy array / torch tensor of
        shape (num_rows, dim) to import, or a callable ``init(row_start, row_stop)``
        returning those rows (:data:`storage.tables.BlockInit`; called for consecutive
        blocks in row order, so a table larger than memory can be imported). ``optimizer_state="rowwise_adagrad"`` adds a
        zero-initialised fp32 (num_rows, 1) state array. ``chunk_rows`` defaults to
        64 MiB chunks (DEFAULT_CHUNK_BYTES). ``progress(rows_done, rows_total)`` is called
        after each written block.
        Durable on return, independent of checkpoints.
        """
        self._check_writable("add_table")
        spec = make_spec(name, num_rows, dim, dtype, init, seed, optimizer_state, chunk_rows)
        if name in self._specs or (self._path / name).exists():
            raise TableExistsError(self._path, name)
        values: Any = None
        if spec.init == "array":
            values = init if _is_block_init(init) else check_init_array(spec, init)
        build_table(self._path, spec, values, progress)
        self._specs[name] = spec
        roles = (WEIGHT, STATE) if spec.optimizer_state is not None else (WEIGHT,)
        for role in roles:
            self._sums.compute(f"{name}/{role}", self._chunk_files(name, role))
        self._sums.save()
        return TableInfo.of(spec)

    def read_table(self, name: str, *, state: bool = False) -> np.ndarray:
        """All rows of a table (or its optimizer state), read in bulk through zarr."""
        import zarr

        spec = self._spec(name)
        role = STATE if state else WEIGHT
        if state and spec.optimizer_state is None:
            raise MissingArrayError(self._path / name, f"table {name!r} has no optimizer state")
        array = zarr.open_array(self._path / name / role, mode="r")
        values = np.array(array[:])
        segment = self._segments.get(f"{name}/{role}")
        if segment is not None and segment.rows:  # rows written since the checkpoint
            ids, raw = segment.items()
            values[ids] = raw.view(values.dtype).reshape(ids.size, -1)
        return values

    # ---- rows ---------------------------------------------------------------------
    def gather(self, name: str, ids: Any, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``ids`` of table ``name`` as a (len(ids), dim) array of its stored dtype."""
        return self._gather(name, WEIGHT, ids, out)

    def gather_state(self, name: str, ids: Any, *, out: np.ndarray | None = None) -> np.ndarray:
        """Optimizer state of rows ``ids``: a (len(ids), state_width) float32 array."""
        return self._gather(name, STATE, ids, out)

    def scatter(self, name: str, ids: Any, rows: Any) -> None:
        """Overwrite rows ``ids`` with ``rows`` (len(ids), dim); duplicate ids: last wins."""
        self._scatter(name, WEIGHT, ids, rows)

    def scatter_state(self, name: str, ids: Any, rows: Any) -> None:
        """Overwrite the optimizer state of rows ``ids`` (last duplicate wins)."""
        self._scatter(name, STATE, ids, rows)

    def prefetch(self, name: str, ids: Any, *, state: bool = False) -> None:
        """Start reading rows ``ids`` into the page cache without waiting for them."""
        files = self._chunk_files(name, STATE if state else WEIGHT)
        files.prefetch(self._ids(name, ids))

    def warm(self, name: str) -> None:
        """Ask the kernel to read the whole table (weights and optimizer state) into the
        page cache in the background (``posix_fadvise(WILLNEED)`` on every chunk file):
        afterwards its rows are served from host memory. Returns at once."""
        self._check_open()
        spec = self._spec(name)
        roles = (WEIGHT, STATE) if spec.optimizer_state is not None else (WEIGHT,)
        for role in roles:
            layout = self._chunk_files(name, role).layout
            for chunk in range(layout.num_chunks):
                try:
                    fd = os.open(layout.chunk_path(chunk), os.O_RDONLY)
                except FileNotFoundError:  # an all-fill chunk zarr never wrote
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)

    def _gather(self, name: str, role: str, ids: Any, out: np.ndarray | None) -> np.ndarray:
        self._check_open()
        files = self._chunk_files(name, role)
        id_array = self._ids(name, ids)
        shape = (id_array.size, files.layout.width)
        dtype = np.dtype(files.layout.dtype_str)
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif (not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype
              or not out.flags.c_contiguous or not out.flags.writeable):
            raise RowShapeError(name, f"out must be a writable C-contiguous {dtype} array of "
                                      f"shape {shape}")
        key = f"{name}/{role}"
        segment = self._segments.get(key)
        if segment is None or not segment.rows:
            files.read(id_array, out)
            self._sums.check(key, files, id_array)
            return out
        rest = segment.serve(id_array, out)  # rows written since the checkpoint
        if rest.size == id_array.size:
            files.read(id_array, out)
            self._sums.check(key, files, id_array)
        elif rest.size:  # the others from the chunk files (their blocks checked)
            ids_rest = id_array[rest]
            part = np.empty((rest.size, files.layout.width), dtype=dtype)
            files.read(ids_rest, part)
            self._sums.check(key, files, ids_rest)
            out[rest] = part
        return out

    def _scatter(self, name: str, role: str, ids: Any, rows: Any) -> None:
        self._check_writable("scatter")
        self._check_not_prepared("scatter")
        files = self._chunk_files(name, role)
        id_array = self._ids(name, ids)
        values = self._rows(name, role, rows, id_array.size, files.layout.width)
        if id_array.size == 0:
            return
        unique, last = _last_occurrence(id_array)
        values = values[last] if last is not None else values
        with self._write_lock:
            self._check_not_broken()
            self._redo_memory += self._segment(name, role).put(
                unique, values, self._checkpoint.generation + 1)
            if self._redo_memory > self._redo_budget:
                self._spill_redo()

    def _spill_redo(self) -> None:
        """Move the largest segments' memory slots to their files until at most half the
        budget is held in memory (under the write lock)."""
        by_size = sorted(self._segments.values(), key=lambda seg: seg.memory_bytes,
                         reverse=True)
        held = sum(seg.memory_bytes for seg in by_size)
        for segment in by_size:
            if held <= self._redo_budget // 2:
                break
            held -= segment.spill()
        self._redo_memory = held

    # ---- durability ---------------------------------------------------------------
    def flush(self) -> None:
        """fsync every chunk file written since the last flush (writes wait in redo
        segments until a checkpoint, so there is normally nothing to sync)."""
        self._check_writable("flush")
        self._sync(self._files.values())

    def _sync(self, arrays: Iterable[ChunkFiles]) -> None:
        arrays = [files for files in arrays if files.has_dirty]
        paths = [path for files in arrays for path in files.dirty_paths()]
        if len(paths) > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="store-sync")
        sync_files(paths, self._pool)
        for files in arrays:
            files.clear_dirty()

    def checkpoint(self, step: int) -> None:
        """Make every write so far durable and record ``step``; a crash at any later
        instant reopens the store in exactly this state."""
        self._check_writable("checkpoint")
        self._check_not_prepared("checkpoint")
        self._check_not_broken()
        step = _check_step(step)
        seals = self._seal()
        committed = jr.Checkpoint(step=step, generation=self._checkpoint.generation + 1,
                                  store_id=self._checkpoint.store_id, apply=seals or None)
        jr.write_checkpoint(self._txn, MARKER_FILE, committed)  # the commit point
        self._checkpoint = committed
        self._finish(committed)

    def prepare(self, step: int) -> None:
        """First phase of a checkpoint at ``step``: every write so far durable (its redo
        segments sealed), not yet applied. Until :meth:`commit_prepared` or
        :meth:`rollback` the store is in doubt (:attr:`prepared_step`): writes are
        refused, reads see the prepared rows, and a crash, :meth:`close` or reopening
        keeps both outcomes possible."""
        self._check_writable("checkpoint")
        self._check_not_prepared("prepare")
        self._check_not_broken()
        step = _check_step(step)
        seals = self._seal()
        jr.write_checkpoint(self._txn, PREPARED_FILE, jr.Checkpoint(
            step=step, generation=self._checkpoint.generation + 1,
            store_id=self._checkpoint.store_id, apply=seals))
        self._prepared = step
        self._prepared_seals = seals

    def commit_prepared(self) -> None:
        """Second phase: the prepared checkpoint becomes the store's last checkpoint
        (the marker's atomic replace is the commit point), then its rows are applied."""
        self._check_writable("commit_prepared")
        self._check_not_broken()
        if self._prepared is None:
            raise StoreArgumentError(f"{self._path}: commit_prepared needs a prepared "
                                     f"checkpoint; call prepare(step) first")
        for seal in self._prepared_seals:  # the chunk files still hold the last checkpoint
            self._check_changed_blocks(seal.key)
        committed = jr.Checkpoint(step=self._prepared,
                                  generation=self._checkpoint.generation + 1,
                                  store_id=self._checkpoint.store_id,
                                  apply=self._prepared_seals or None)
        jr.write_checkpoint(self._txn, MARKER_FILE, committed)  # the commit point
        self._checkpoint = committed
        self._prepared = None
        self._prepared_seals = ()
        self._finish(committed)
        jr.remove_marker(self._txn, PREPARED_FILE)

    def rollback(self) -> None:
        """Discard every write since the last checkpoint (the chunk files never held
        them); for an in-doubt store: abort the prepared checkpoint."""
        self._check_writable("rollback")
        if self._prepared is not None:  # from here on, a crash discards the segments
            jr.remove_marker(self._txn, PREPARED_FILE)
            self._prepared = None
            self._prepared_seals = ()
        for segment in self._segments.values():
            segment.clear()
        self._redo_memory = 0

    def _seal(self) -> tuple[SegmentSeal, ...]:
        """Seal every segment holding rows, after checking the blocks they change (so
        that no damaged block is blessed by new checksums)."""
        seals = []
        for key, segment in sorted(self._segments.items()):
            if not segment.rows:
                continue
            self._check_changed_blocks(key)
            seals.append(segment.seal())
        return tuple(seals)

    def _check_changed_blocks(self, key: str) -> None:
        """Check the blocks that the rows held for ``key`` change and that no read has
        checked yet, before a commit point: applying rows recomputes a block's checksum,
        which must not bless a damaged block."""
        if not self._sums.has(key):
            return
        table, _, role = key.partition("/")
        files = self._chunk_files(table, role)
        ids, _ = self._segments[key].items()
        blocks = np.unique(ids // self._sums.block_rows_of(key))
        for block in self._sums.unchecked(key, blocks).tolist():
            damage = self._sums.check_block(key, files, block)
            if damage is not None:
                raise CorruptStoreError(files.layout.path, f"{damage}; the checkpoint is "
                                                           f"refused: restore the store from "
                                                           f"a backup")

    def _finish(self, committed: jr.Checkpoint) -> None:
        """Apply a committed checkpoint's sealed rows to the chunk files, sync them,
        replace the changed blocks' checksums, then drop ``apply`` from the marker."""
        if committed.apply is not None:
            try:
                self._apply(committed.apply)
                jr.write_checkpoint(self._txn, MARKER_FILE, jr.Checkpoint(
                    step=committed.step, generation=committed.generation,
                    store_id=committed.store_id))
            except BaseException:
                self._broken = (f"applying checkpoint step {committed.step} failed; close and "
                                f"reopen the store with mode='r+' to finish it")
                raise
            self._checkpoint = jr.Checkpoint(committed.step, committed.generation,
                                             committed.store_id)
        for segment in self._segments.values():
            segment.clear()
        self._redo_memory = 0

    def _apply(self, seals: Iterable[SegmentSeal]) -> None:
        touched: list[tuple[str, ChunkFiles, np.ndarray]] = []
        for seal in seals:
            table, _, role = seal.key.partition("/")
            files = self._chunk_files(table, role)
            ids, raw = self._segments[seal.key].items()
            rows = raw.view(files.layout.dtype_str).reshape(ids.size, files.layout.width)
            files.write(ids, rows)
            touched.append((seal.key, files, ids))
        self._sync(files for _, files, _ in touched)
        changed = False
        for key, files, ids in touched:
            if self._sums.has(key):
                self._sums.compute(key, files, np.unique(ids // self._sums.block_rows_of(key)))
                changed = True
        if changed:
            self._sums.save()

    # ---- integrity ------------------------------------------------------------------
    def verify(self, progress: VerifyProgressFn | None = None) -> list[BlockDamage]:
        """Check every block of every array against its checksum (and every chunk file's
        size); the damaged blocks, none when the store is sound. ``progress(done,
        total)`` is called after each block. Arrays recorded without checksums (a store
        made before them) are reported as such."""
        self._check_open()
        arrays = [(name, role) for name in sorted(self._specs)
                  for role in ((WEIGHT, STATE) if self._specs[name].optimizer_state is not None
                               else (WEIGHT,))]
        total = sum(self._sums.blocks_of(f"{name}/{role}") for name, role in arrays)
        done = 0
        damages: list[BlockDamage] = []
        store = str(self._path)
        for name, role in arrays:
            key = f"{name}/{role}"
            try:
                files = self._chunk_files(name, role)
            except (CorruptStoreError, MissingArrayError) as exc:
                damages.append(BlockDamage(store, key, -1, 0, 0, str(exc)))
                done += self._sums.blocks_of(key)
                continue
            if not self._sums.has(key):
                damages.append(BlockDamage(store, key, -1, 0, 0, "no block checksums recorded "
                                                                 "(the array predates them)"))
                continue
            for block in range(self._sums.blocks_of(key)):
                try:
                    problem = self._sums.check_block(key, files, block)
                except OSError as exc:
                    problem = f"block {block} cannot be read ({exc})"
                if problem is not None:
                    rows = self._sums.block_rows_of(key)
                    start = block * rows
                    damages.append(BlockDamage(store, key, block, start,
                                               min(files.layout.num_rows, start + rows),
                                               problem.split(") ", 1)[-1]))
                done += 1
                if progress is not None:
                    progress(done, total)
        return damages

    def on_close(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` at the start of :meth:`close`, before files are unmapped (a row
        cache registers the stop of its background reads and writes here)."""
        self._close_hooks.append(hook)

    def close(self) -> None:
        """Stop registered users (``on_close``), roll back uncommitted writes
        (``mode="r+"``), unmap files, release the lock."""
        if self._closed:
            return
        try:
            for hook in self._close_hooks:
                try:
                    hook()
                except Exception:  # noqa: BLE001 - the cache reports its errors to its own user
                    pass
            if self._mode == "r+" and self._prepared is None:  # in doubt: wait for the decision
                for segment in self._segments.values():
                    segment.clear()
        finally:
            self._release()

    def _release(self) -> None:
        """Unmap, close files, stop the sync threads, unlock; no rollback."""
        self._closed = True
        for files in self._files.values():
            files.close()
        self._files.clear()
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
        if self._pool is not None:
            self._pool.shutdown()
        os.close(self._lock_fd)

    def __enter__(self) -> TableStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TableStore({str(self._path)!r}, mode={self._mode!r}, "
                f"tables={len(self._specs)}, checkpoint_step={self.checkpoint_step})")

    # ---- helpers ------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(self._path)

    def _check_writable(self, operation: str) -> None:
        self._check_open()
        if self._mode != "r+":
            raise ReadOnlyStoreError(self._path, operation)

    def _check_not_prepared(self, operation: str) -> None:
        if self._prepared is not None:
            raise StoreError(f"{self._path}: {operation} refused: the store holds a prepared "
                             f"checkpoint of step {self._prepared}; commit_prepared() or "
                             f"rollback() first")

    def _check_not_broken(self) -> None:
        if self._broken is not None:
            raise StoreError(f"{self._path}: {self._broken}")

    def _spec(self, name: str) -> StoredTableSpec:
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self._specs)) or "none"
            raise MissingArrayError(self._path / str(name), f"no table {name!r} in the store "
                                                           f"(tables: {known}); add it with "
                                                           f"add_table")
        return spec

    def _chunk_files(self, name: str, role: str) -> ChunkFiles:
        self._check_open()
        files = self._files.get((name, role))
        if files is not None:
            return files
        spec = self._spec(name)
        path = self._path / name / role
        if role == STATE and spec.optimizer_state is None:
            raise MissingArrayError(path, f"table {name!r} has no optimizer state; add the "
                                          f"table with optimizer_state='rowwise_adagrad'")
        if not (path / "zarr.json").is_file():
            raise MissingArrayError(path, f"array {role!r} of table {name!r} is missing; "
                                          f"restore the store from a backup")
        layout = read_array_layout(path)
        width = spec.dim if role == WEIGHT else spec.state_width
        expected = spec.dtype.numpy.str if role == WEIGHT else "<f4"
        if ((layout.num_rows, layout.width, layout.chunk_rows, layout.dtype_str)
                != (spec.num_rows, width, spec.chunk_rows, expected)):
            raise CorruptStoreError(path, "array shape, chunks or dtype disagree with the "
                                          "table's attributes; restore the store from a backup")
        files = self._files[(name, role)] = ChunkFiles(layout, writable=self._mode == "r+",
                                                       map_budget_bytes=self._map_budget)
        return files

    def _ids(self, name: str, ids: Any) -> np.ndarray:
        num_rows = self._spec(name).num_rows
        if is_torch_tensor(ids):
            ids = torch_to_numpy(ids)
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise RowShapeError(name, f"ids must be a 1-D integer array, got shape "
                                      f"{array.shape} and dtype {array.dtype}")
        array = array.astype(np.int64, copy=False)
        if array.size:
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= num_rows:
                raise RowIndexError(name, low if low < 0 else high, num_rows)
        return array

    def _rows(self, name: str, role: str, rows: Any, count: int, width: int) -> np.ndarray:
        dtype = self._spec(name).dtype if role == WEIGHT else StoreDType.FP32
        converted = to_stored(rows, dtype)
        if isinstance(converted, str):
            raise RowShapeError(name, converted)
        if converted.shape != (count, width):
            raise RowShapeError(name, f"rows have shape {tuple(converted.shape)}, expected "
                                      f"({count}, {width}) for {count} ids")
        return converted


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise StoreArgumentError(f"checkpoint step must be an int >= 0, got {step!r}")
    return int(step)


def _last_occurrence(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted unique ids and, per unique id, the index of its last occurrence in ``ids``
    (``None`` when ``ids`` is already sorted and unique)."""
    if ids.size < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return ids, None
    reversed_ids = ids[::-1]
    unique, first_in_reversed = np.unique(reversed_ids, return_index=True)
    return unique, ids.size - 1 - first_in_reversed


def _is_block_init(init: Any) -> bool:
    """A :data:`~storage.tables.BlockInit` callable (not an array or tensor to import)."""
    return callable(init) and not isinstance(init, np.ndarray) and not is_torch_tensor(init)


def _check_redo_memory(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreArgumentError(f"redo_memory_bytes must be an integer >= 0, got {value!r}")
    return value


def _check_map_budget(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 * PAGE_BYTES:
        raise StoreArgumentError(f"map_budget_bytes must be an integer >= {16 * PAGE_BYTES} "
                                 f"(16 pages), got {value!r}")
    return value


def checkpoint_state(path: str | os.PathLike[str]) -> tuple[int | None, int | None]:
    """Read-only: ``(checkpoint_step, prepared_step)`` of the store at ``path`` as its
    markers record them (``prepared_step`` None when not in doubt), without opening it
    or waiting for its writer. Raises what :meth:`TableStore.open` raises for a path
    that is not a sound store (missing, foreign, damaged markers)."""
    root = Path(path)
    _check_store(root)
    txn = root / TXN_DIR
    committed = jr.read_checkpoint(txn, MARKER_FILE)
    prepared = jr.read_prepared(txn, PREPARED_FILE)
    if prepared is None or prepared.generation != committed.generation + 1:
        return committed.step, None
    return committed.step, prepared.step


def _is_store(root: Path) -> bool:
    try:
        return STORE_ATTR in read_json(root / "zarr.json").get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


def _check_store(root: Path) -> None:
    meta = root / "zarr.json"
    if not root.is_dir():
        raise StoreNotFoundError(root)
    try:
        doc = read_json(meta)
    except FileNotFoundError as exc:
        raise StoreNotFoundError(root, "no zarr.json") from exc
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(meta, f"unreadable group metadata ({exc}); restore the store "
                                      f"from a backup") from exc
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        raise FormatVersionError(root, None, FORMAT_VERSION)
    attrs = doc.get("attributes", {}).get(STORE_ATTR)
    if not isinstance(attrs, dict):
        raise FormatVersionError(root, None, FORMAT_VERSION)
    found = attrs.get("format_version")
    if found != FORMAT_VERSION:
        raise FormatVersionError(root, found if isinstance(found, int) else None, FORMAT_VERSION)
    if not (root / TXN_DIR / LOCK_FILE).is_file():
        raise CorruptStoreError(root / TXN_DIR, "transaction files are missing; restore the "
                                                "store from a backup")


def _lock(root: Path, mode: Mode) -> int:
    fd = os.open(root / TXN_DIR / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if mode == "r+" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise StoreLockedError(root, mode) from exc
    return fd


