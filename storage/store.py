"""The table store: embedding tables as zarr arrays, row access, crash-safe checkpoints.

>>> store = TableStore.create("tables.zarr")
>>> store.add_table("users", num_rows=1_000_000, dim=64, optimizer_state="rowwise_adagrad")
>>> rows = store.gather("users", ids)            # (len(ids), 64) float32
>>> store.scatter("users", ids, rows - lr * grad)
>>> store.checkpoint(step=100)                   # durable: a crash now reopens at step 100
>>> store.close()                                # discards writes after the last checkpoint
>>> store = TableStore.open("tables.zarr", mode="r+")

Layout: :mod:`storage.layout`; row path: :mod:`storage.chunks`; checkpoint protocol:
:mod:`storage.journal`. zarr's API creates the arrays and writes the initial rows;
gather and scatter read and write the chunk files directly.

Semantics worth knowing:

* ``scatter`` with duplicate ids: the last occurrence wins.
* Writes are visible to ``gather`` at once but durable only at ``checkpoint``;
  after a crash at any instant, opening with ``mode="r+"`` rolls every array back
  to the last completed checkpoint (``checkpoint_step``). ``close()`` (and leaving a
  ``with`` block) also rolls back uncommitted writes; call ``checkpoint`` first.
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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from storage import journal as jr
from storage.chunks import MAPPED_BYTES_BUDGET, PAGE_BYTES, ChunkFiles, sync_files
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
    JOURNAL_FILE,
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
SYNC_THREADS = 8
"""Threads that fdatasync chunk files at flush/checkpoint (overlapping device flushes)."""


class TableStore:
    """A directory of embedding tables; see the module docstring. Use as a context manager."""

    def __init__(self, path: Path, mode: Mode, lock_fd: int, map_budget_bytes: int) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        self._path = path
        self._mode = mode
        self._map_budget = map_budget_bytes
        self._lock_fd = lock_fd
        self._txn = path / TXN_DIR
        self._specs: dict[str, StoredTableSpec] = {}
        self._files: dict[tuple[str, str], ChunkFiles] = {}
        self._checkpoint = jr.read_checkpoint(self._txn, MARKER_FILE)
        self._prepared: int | None = None
        """Step of the in-doubt prepared checkpoint (None: not in doubt)."""
        self._journal: jr.UndoJournal | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._close_hooks: list[Callable[[], None]] = []
        self._write_lock = threading.Lock()
        """Serialises :meth:`scatter` calls (the row caches of different tables write
        back on their own threads; the undo journal is shared)."""

    # ---- opening ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, overwrite: bool = False,
               map_budget_bytes: int = MAPPED_BYTES_BUDGET) -> TableStore:
        """Create an empty store at ``path`` and return it open for writing.

        ``overwrite=True`` replaces an existing *table store* (never another directory).
        ``map_budget_bytes``: as for :meth:`open`.
        """
        import zarr

        budget = _check_map_budget(map_budget_bytes)
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
                               "note": "zero-length array whose directory holds the undo "
                                       "journal, checkpoint marker and lock of the table store",
                               "files": [JOURNAL_FILE, MARKER_FILE, LOCK_FILE]}})
        txn = root / TXN_DIR
        (txn / LOCK_FILE).touch()
        jr.write_checkpoint(txn, MARKER_FILE, jr.Checkpoint(step=None, generation=0))
        for directory in (txn, root, root.parent):
            fsync_dir(directory)
        return cls.open(root, mode="r+", map_budget_bytes=budget)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: Mode = "r", *,
             map_budget_bytes: int = MAPPED_BYTES_BUDGET) -> TableStore:
        """Open a store. ``"r+"`` first rolls back writes after the last checkpoint.

        ``map_budget_bytes`` bounds the pages each array keeps mapped (they count in the
        process's resident set): an array up to this size is mapped whole (fastest), a
        larger one in slices whose pages are unmapped as rows are touched, so a table
        larger than RAM trains with a bounded resident set (about this many bytes per
        array in use), at the cost of a minor fault per row touched again.
        """
        if mode not in ("r", "r+"):
            raise StoreArgumentError(f"mode must be 'r' or 'r+', got {mode!r}")
        budget = _check_map_budget(map_budget_bytes)
        root = Path(path)
        _check_store(root)
        lock_fd = _lock(root, mode)
        try:
            store = cls(root, mode, lock_fd, budget)
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            store._load_specs()
            if mode == "r+":
                store._recover()
            elif jr.has_records(store._txn / JOURNAL_FILE, store._checkpoint.generation + 1):
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

    def _recover(self) -> None:
        """Undo the writes of an unfinished generation, then start a fresh journal; an
        in-doubt prepared checkpoint keeps its journal (see :meth:`prepare`)."""
        txn = self._txn
        jr.remove_stale_temporaries(txn, MARKER_FILE)
        jr.remove_stale_temporaries(txn, PREPARED_FILE)
        shutil.rmtree(txn / STAGING_DIR, ignore_errors=True)
        active = self._checkpoint.generation + 1
        path = txn / JOURNAL_FILE
        found = jr.read_generation(path)
        if found is not None and found > active:
            raise CorruptStoreError(path, f"journal generation {found} is ahead of the "
                                          f"checkpoint marker ({active - 1}); restore the "
                                          f"store from a backup")
        prepared = jr.read_prepared(txn, PREPARED_FILE)
        if prepared is not None and prepared.generation > active:
            raise CorruptStoreError(txn / PREPARED_FILE, f"prepared generation "
                                                         f"{prepared.generation} is ahead of "
                                                         f"the checkpoint marker "
                                                         f"({active - 1}); restore the store "
                                                         f"from a backup")
        if prepared is not None and prepared.generation == active:
            self._journal = jr.UndoJournal(path, active, keep_records=True)
            self._prepared = prepared.step
            return
        if prepared is not None:  # its commit completed; only the removal was missing
            jr.remove_marker(txn, PREPARED_FILE)
        if found == active:
            self._undo(path, active)
        self._journal = jr.UndoJournal(path, active)

    def _undo(self, path: Path, generation: int, end: int | None = None) -> None:
        """Restore the old bytes of every valid record (before byte ``end``), newest
        first; fsync the chunks."""
        offsets = [offset for offset, _ in jr.iter_records(path, generation, end)]
        touched: list[ChunkFiles] = []
        for offset in reversed(offsets):
            record = jr.read_record_at(path, offset, generation)
            table, _, role = record.key.partition("/")
            files = self._chunk_files(table, role)
            layout = files.layout
            if record.rows.shape[1] != layout.row_bytes or (
                    record.ids.size and (record.ids.min() < 0
                                         or record.ids.max() >= layout.num_rows)):
                raise CorruptStoreError(path, f"journal record at byte {offset} does not fit "
                                              f"array {record.key!r}; restore the store from a "
                                              f"backup")
            rows = record.rows.view(layout.dtype_str).reshape(record.ids.size, layout.width)
            files.write(record.ids.astype(np.int64), rows)
            if files not in touched:
                touched.append(files)
        self._sync(touched)

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
        """Bytes of undo records written since the last checkpoint (0 when read-only)."""
        return 0 if self._journal is None else self._journal.size_bytes - jr.HEADER_BYTES

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
        return TableInfo.of(spec)

    def read_table(self, name: str, *, state: bool = False) -> np.ndarray:
        """All rows of a table (or its optimizer state), read in bulk through zarr."""
        import zarr

        spec = self._spec(name)
        role = STATE if state else WEIGHT
        if state and spec.optimizer_state is None:
            raise MissingArrayError(self._path / name, f"table {name!r} has no optimizer state")
        array = zarr.open_array(self._path / name / role, mode="r")
        return np.asarray(array[:])

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
        files.read(id_array, out)
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
        with self._write_lock:  # one journal for every table: one writer at a time
            fresh = files.unjournaled(unique)
            journal = self._writer_journal()
            if fresh.any():
                new_ids = unique[fresh]
                old = np.empty((new_ids.size, files.layout.width), dtype=files.layout.dtype_str)
                files.read(new_ids, old)
                journal.append(f"{name}/{role}", new_ids, old)  # durable before the data write
                files.mark_journaled(new_ids)
            files.write(unique, values)

    # ---- durability ---------------------------------------------------------------
    def flush(self) -> None:
        """fsync every chunk file written since the last flush (not yet a checkpoint)."""
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
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise StoreArgumentError(f"checkpoint step must be an int >= 0, got {step!r}")
        journal = self._writer_journal()
        self.flush()
        committed = jr.Checkpoint(step=int(step), generation=journal.generation)
        jr.write_checkpoint(self._txn, MARKER_FILE, committed)
        self._checkpoint = committed
        journal.reset(committed.generation + 1)
        for files in self._files.values():
            files.forget_journaled()

    def prepare(self, step: int) -> None:
        """First phase of a checkpoint at ``step``: every write so far durable, its undo
        records kept. Until :meth:`commit_prepared` or :meth:`rollback` the store is in
        doubt (:attr:`prepared_step`): writes are refused, and a crash, :meth:`close`
        or reopening keeps both outcomes possible."""
        self._check_writable("checkpoint")
        self._check_not_prepared("prepare")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise StoreArgumentError(f"checkpoint step must be an int >= 0, got {step!r}")
        journal = self._writer_journal()
        self.flush()
        jr.write_checkpoint(self._txn, PREPARED_FILE,
                            jr.Checkpoint(step=int(step), generation=journal.generation))
        self._prepared = int(step)

    def commit_prepared(self) -> None:
        """Second phase: the prepared checkpoint becomes the store's last checkpoint
        (the marker's atomic replace is the commit point)."""
        self._check_writable("commit_prepared")
        if self._prepared is None:
            raise StoreArgumentError(f"{self._path}: commit_prepared needs a prepared "
                                     f"checkpoint; call prepare(step) first")
        journal = self._writer_journal()
        committed = jr.Checkpoint(step=self._prepared, generation=journal.generation)
        jr.write_checkpoint(self._txn, MARKER_FILE, committed)
        self._checkpoint = committed
        self._prepared = None
        journal.reset(committed.generation + 1)
        jr.remove_marker(self._txn, PREPARED_FILE)
        for files in self._files.values():
            files.forget_journaled()

    def rollback(self) -> None:
        """Discard every write since the last checkpoint (restores the old rows); for
        an in-doubt store: abort the prepared checkpoint."""
        self._check_writable("rollback")
        journal = self._writer_journal()
        if self._prepared is not None:  # from here on, a crash rolls back on open
            jr.remove_marker(self._txn, PREPARED_FILE)
            self._prepared = None
        if journal.size_bytes > jr.HEADER_BYTES:
            self._undo(journal.path, journal.generation, journal.size_bytes)
        journal.reset(journal.generation)
        for files in self._files.values():
            files.forget_journaled()

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
            if (self._journal is not None and not self._journal.broken
                    and self._prepared is None):  # an in-doubt store waits for its decision
                self.rollback()
        finally:
            self._release()

    def _release(self) -> None:
        """Unmap, close files, stop the sync threads, unlock; no rollback."""
        self._closed = True
        for files in self._files.values():
            files.close()
        self._files.clear()
        if self._journal is not None:
            self._journal.close()
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

    def _writer_journal(self) -> jr.UndoJournal:
        journal = self._journal
        if journal is None:  # pragma: no cover - r+ always has a journal
            raise ReadOnlyStoreError(self._path, "writing")
        if journal.broken:
            raise StoreError(f"{self._path}: the undo journal could not be repaired after a "
                             f"failed write; close and reopen the store with mode='r+' to roll "
                             f"back to the last checkpoint")
        return journal

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


def _check_map_budget(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 * PAGE_BYTES:
        raise StoreArgumentError(f"map_budget_bytes must be an integer >= {16 * PAGE_BYTES} "
                                 f"(16 pages), got {value!r}")
    return value


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


