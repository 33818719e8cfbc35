"""The table stores behind cached tables: which store tables a plan's cached shards
need (:class:`StoreTable`), where their stores live, and the one place that creates,
opens and checks them.

Layout (owned here): one table store per plan device that holds cached shards,
``<store_dir>/device-<d>/`` (:func:`device_store_dir`), holding that device's shards
(a whole table under its name, a row shard as ``<table>.rows-<start>-<end>``). The
layout is the same in one process and under torchrun, where rank ``d`` opens only
``device-<d>``: a run resumes with either.

The store is created with the tables initialised exactly like
:func:`~dlrm_runtime.embeddings.base.init_table` (same generator, consumed block by
block: CPU ``uniform_`` draws serially), so a cached model starts from the same weights
as the in-memory one; a store that already holds the tables is opened as it is (rolled
back to its last checkpoint).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dlrm_runtime.embeddings.base import init_generator
from dlrm_runtime.embeddings.placement import ShardPlacement, TablePlacement
from dlrm_runtime.errors import CheckpointError, ConfigError
from dlrm_runtime.files import fsync_dir
from planner import DType, Optimizer, TableSpec, TablesSpec, Tier
from storage import (
    BlockDamage,
    RecoveryRequiredError,
    StoreError,
    StoreLockedError,
    TableStore,
    checkpoint_state,
)

INIT_BLOCK_ROWS_BYTES = 64 * 1024 * 1024
"""Bytes of fp32 rows drawn at once when skipping to a row shard's first row."""
STORE_DTYPE = {DType.FP32: "fp32", DType.FP16: "fp16", DType.BF16: "bf16"}

DEVICE_DIR = "device-{device}"
"""Name of plan device ``device``'s store under ``store_dir``."""

StoreProgress = Callable[[str, int, int], None]
"""``progress(store_table, rows_done, rows_total)`` while the store's tables are written."""


@dataclass(frozen=True, slots=True)
class StoreTable:
    """The store table of one cached shard: rows ``shard.row_start..shard.row_end`` of
    table ``index`` of the tables spec (the whole table, or one row shard of it)."""

    name: str
    """The table's name in the store: the table's own name, or
    ``<table>.rows-<row_start>-<row_end>`` for a row shard."""
    spec: TableSpec
    index: int
    shard: ShardPlacement

    @property
    def rows(self) -> int:
        return self.shard.rows

    @property
    def tier(self) -> Tier:
        return self.shard.tier

    @property
    def device(self) -> int:
        """The plan device whose store holds it (:func:`device_store_dir`)."""
        return self.shard.plan_device

    @property
    def optimizer_state(self) -> str | None:
        return "rowwise_adagrad" if self.spec.optimizer is Optimizer.ROWWISE_ADAGRAD else None


def store_tables(tables: TablesSpec, placements: dict[str, TablePlacement]) -> list[StoreTable]:
    """The store tables that the cached tables of ``placements`` need, in spec order."""
    out = []
    for index, spec in enumerate(tables.tables):
        placement = placements[spec.name]
        if not placement.cached:
            continue
        whole = len(placement.shards) == 1
        for shard in placement.shards:
            name = spec.name if whole else f"{spec.name}.rows-{shard.row_start}-{shard.row_end}"
            out.append(StoreTable(name, spec, index, shard))
    return out


def device_store_dir(store_dir: str | Path, device: int) -> Path:
    """The store of plan device ``device`` under ``store_dir``."""
    return Path(store_dir) / DEVICE_DIR.format(device=device)


def check_store_dir(store_dir: str | Path) -> Path:
    """``store_dir`` as a directory of per-device stores: missing, empty, or holding
    only ``device-<d>`` entries; :class:`ConfigError` (naming ``--store-dir``)
    otherwise."""
    root = Path(store_dir)
    if not root.exists():
        return root
    if not root.is_dir():
        raise ConfigError(f"--store-dir {root}: is a file; give a directory (new, empty, or "
                          f"the --store-dir of an earlier run)")
    others = sorted(e.name for e in root.iterdir()
                    if not e.name.startswith(("device-", ".device-")))
    if others:
        kind = ("a directory of checkpoints (pass it as --checkpoint-dir)"
                if any(name.startswith("ckpt-") for name in others)
                else "one table store (runs keep one per plan device under --store-dir, "
                     f"as DIR/{DEVICE_DIR.format(device='D')})" if "zarr.json" in others
                else f"a non-empty directory that holds no table stores "
                     f"(DIR/{DEVICE_DIR.format(device='D')}; it holds {others[:3]})")
        raise ConfigError(f"--store-dir {root}: is {kind}; give an empty or new directory, "
                          f"or the --store-dir of an earlier run")
    return root


class _InitBlocks:
    """:data:`storage.tables.BlockInit` for a store table: the rows of
    :func:`~dlrm_runtime.embeddings.init_table`, drawn from the same generator block
    by block (skipping the rows before a row shard's first row)."""

    def __init__(self, table: StoreTable, seed: int) -> None:
        self._generator = init_generator(table.index, seed)
        self._bound = math.sqrt(1.0 / table.spec.num_embeddings)
        self._dim = table.spec.embedding_dim
        self._skip = table.shard.row_start
        self._next = 0

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        if start != self._next:  # pragma: no cover - the store asks in row order
            raise ValueError(f"init blocks must come in row order: {start} after {self._next}")
        skip_block = max(1, INIT_BLOCK_ROWS_BYTES // (4 * self._dim))
        while self._skip:
            rows = min(self._skip, skip_block)
            torch.empty(rows, self._dim).uniform_(-self._bound, self._bound,
                                                  generator=self._generator)
            self._skip -= rows
        self._next = stop
        return torch.empty(stop - start, self._dim).uniform_(-self._bound, self._bound,
                                                             generator=self._generator)


def open_store(store_dir: str | Path | None, needed: Sequence[StoreTable], seed: int = 0,
               progress: StoreProgress | None = None) -> TableStore:
    """The store at ``store_dir`` opened for writing, holding every table of ``needed``:
    created when missing or an empty directory (built beside it and renamed into place
    once every table is written, so a crash while creating leaves no half store);
    tables it lacks are added with :func:`~dlrm_runtime.embeddings.init_table`'s
    values; tables it has must match (rows, dim, dtype, optimizer state) and keep their
    values as of the store's last checkpoint (or stay in doubt, see
    :meth:`~storage.TableStore.prepare`). Raises :class:`ConfigError` for a missing
    ``store_dir``, a path that is not a store, a store held by another writer, or a
    table that does not match."""
    if store_dir is None:
        names = sorted({t.spec.name for t in needed})
        raise ConfigError(f"tables {names} are planned in a cached tier and need a table "
                          f"store: pass store_dir (dlrm-run --store-dir DIR)")
    path = Path(store_dir)
    try:
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            _build_store(path, needed, seed, progress)
        else:
            _check_store_tables(path, needed)  # before r+, which rewrites the journal
        store = TableStore.open(path, mode="r+")
    except StoreError as exc:
        raise ConfigError(f"store_dir {str(path)!r} cannot be used as the table store: "
                          f"{exc}") from exc
    try:
        _check_tables(store.path, set(store.tables()), store.checkpoint_step, needed)
        _add_tables(store, needed, seed, progress)
    except BaseException:
        store.close()
        raise
    return store


def _build_store(path: Path, needed: Sequence[StoreTable], seed: int,
                 progress: StoreProgress | None) -> None:
    """Create the store of ``needed`` at ``path`` atomically: built in a hidden sibling
    (leftovers of a killed builder are removed first), then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with TableStore.create(tmp) as store:
        _add_tables(store, needed, seed, progress)
    if path.exists():
        path.rmdir()  # the empty directory it replaces
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _add_tables(store: TableStore, needed: Sequence[StoreTable], seed: int,
                progress: StoreProgress | None) -> None:
    present = set(store.tables())
    for table in needed:
        if table.name in present:
            _check_matches(store, table)
            continue
        store.add_table(table.name, table.rows, table.spec.embedding_dim,
                        dtype=STORE_DTYPE[table.spec.dtype], init=_InitBlocks(table, seed),
                        optimizer_state=table.optimizer_state,
                        progress=None if progress is None
                        else (lambda done, total, name=table.name: progress(name, done, total)))

def check_store_tables(store_dir: str | Path, needed: Sequence[StoreTable]) -> None:
    """Read-only look at the stores under ``store_dir`` (:func:`device_store_dir`):
    :class:`ConfigError` for a ``store_dir`` that cannot hold them, or a device's store
    that cannot hold its tables of ``needed`` without being made for other tables (see
    :func:`_check_tables`). A store that needs recovery or is open elsewhere is checked
    once opened; a missing one is created by :func:`open_store`."""
    root = check_store_dir(store_dir)
    for device in sorted({t.device for t in needed}):
        _check_store_tables(device_store_dir(root, device),
                            [t for t in needed if t.device == device])


def check_stores_at(store_dir: str | Path, needed: Sequence[StoreTable],
                    committed: int | None, checkpoint_dir: str | Path | None) -> None:
    """Read-only, before any store is created or opened for writing: every device's
    store under ``store_dir`` can settle on ``committed``, the run's newest committed
    step (None: none), as :meth:`~dlrm_runtime.embeddings.CachedTables.recover` would
    (a store in doubt at ``committed`` rolls forward, one in doubt at another step rolls
    back); :class:`CheckpointError` naming the store otherwise, so that a run refused
    for its stores writes nothing."""
    root = check_store_dir(store_dir)
    for device in sorted({t.device for t in needed}):
        path = device_store_dir(root, device)
        if not (path / "zarr.json").is_file():
            if committed is None:
                continue  # created when the model is built
            raise CheckpointError(f"--checkpoint-dir {checkpoint_dir} committed step "
                                  f"{committed}, but --store-dir {root} has no table store "
                                  f"for plan device {device} ({path}); pass the --store-dir "
                                  f"of the run that wrote the checkpoints")
        try:
            have, prepared = checkpoint_state(path)
        except StoreError as exc:
            raise ConfigError(f"store_dir {str(path)!r} cannot be used as the table store: "
                              f"{exc}") from exc
        settled = prepared if prepared is not None and prepared == committed else have
        if settled != committed:
            held = "no checkpoint" if settled is None else f"tables trained to step {settled}"
            wanted = ("no committed checkpoint" if committed is None
                      else f"its last committed checkpoint at step {committed}")
            raise CheckpointError(f"the table store {str(path)!r} holds {held}, but the run "
                                  f"has {wanted}; pass --resume with the --checkpoint-dir of "
                                  f"the run that wrote the store, or use another --store-dir")


def store_paths(path: str | Path) -> list[Path]:
    """The table stores at ``path``: the store itself, or the ``device-<d>`` stores of a
    ``--store-dir`` (:class:`ConfigError` when it holds none)."""
    root = Path(path)
    if (root / "zarr.json").is_file():
        return [root]
    if root.is_dir():
        found = sorted((p for p in root.iterdir()
                        if p.name.startswith("device-") and (p / "zarr.json").is_file()),
                       key=lambda p: (len(p.name), p.name))
        if found:
            return found
    raise ConfigError(f"{root}: holds no table store (a store directory, or a --store-dir "
                      f"holding {DEVICE_DIR.format(device='D')} stores); give one of those")


VerifyProgress = Callable[[str, int, int], None]
"""``progress(store, blocks_done, blocks_total)`` while :func:`verify_stores` runs."""


def verify_stores(path: str | Path,
                  progress: VerifyProgress | None = None) -> list[BlockDamage]:
    """Check every block of every store at ``path`` (see :func:`store_paths`) against its
    checksum, read-only: the damaged blocks (empty when sound). A store that cannot be
    opened (damaged metadata or markers, a writer's unfinished checkpoint) is one entry
    with block -1."""
    damages: list[BlockDamage] = []
    for store_path in store_paths(path):
        try:
            with TableStore.open(store_path, mode="r") as store:
                damages.extend(store.verify(
                    None if progress is None
                    else (lambda done, total, where=str(store_path): progress(where, done,
                                                                              total))))
        except StoreError as exc:
            damages.append(BlockDamage(str(store_path), "-", -1, 0, 0, str(exc)))
    return damages


def _check_store_tables(path: Path, needed: Sequence[StoreTable]) -> None:
    """:func:`check_store_tables` for one store."""
    if not (path / "zarr.json").is_file():
        return
    try:
        with TableStore.open(path, mode="r") as peek:
            present, step = set(peek.tables()), peek.checkpoint_step
    except (RecoveryRequiredError, StoreLockedError):
        return  # checked once open_store has it open
    except StoreError as exc:
        raise ConfigError(f"store_dir {str(path)!r} cannot be used as the table store: "
                          f"{exc}") from exc
    _check_tables(path, present, step, needed)


def _check_tables(path: Path, present: set[str], step: int | None,
                  needed: Sequence[StoreTable]) -> None:
    """Tables are added to an existing store only to complete an interrupted creation
    (no checkpoint yet, no table of another plan): a store made for other tables is
    never modified. (Holding more tables than ``needed`` is fine: one process of a
    multi-process run needs only its own.)"""
    wanted = {t.name for t in needed}
    foreign = sorted(present - wanted)
    missing = sorted(wanted - present)
    if missing and (foreign or step is not None):
        detail = ", ".join(part for part in (
            f"tables {foreign} not in the plan" if foreign else "",
            f"tables {missing} of the plan missing" if missing else "") if part)
        raise ConfigError(f"store {str(path)!r} holds other tables than the plan caches "
                          f"({detail}); it is left as it is: use another store_dir "
                          f"(--store-dir)")


def _check_matches(store: TableStore, table: StoreTable) -> None:
    info = store.describe(table.name)
    have = (info.num_rows, info.dim, info.dtype.value,
            None if info.optimizer_state is None else info.optimizer_state.value)
    want = (table.rows, table.spec.embedding_dim, STORE_DTYPE[table.spec.dtype],
            table.optimizer_state)
    if have != want:
        labels = ("rows", "dim", "dtype", "optimizer state")
        detail = ", ".join(f"{label} {h} there, {w} here"
                           for label, h, w in zip(labels, have, want) if h != w)
        raise ConfigError(f"store {str(store.path)!r}: table {table.name!r} does not match the "
                          f"plan ({detail}); use another store_dir (--store-dir)")



def open_device_stores(store_dir: str | Path | None, needed: Sequence[StoreTable], seed: int,
                       devices: Collection[int] | None = None) -> dict[int, TableStore]:
    """The store of every plan device of ``needed`` (only those in ``devices`` when
    given) opened for writing by :func:`open_store`, the ``dram_cache`` tables' chunk
    files read into the host page cache; :class:`ConfigError` without ``store_dir``."""
    if store_dir is None:
        names = sorted({t.spec.name for t in needed})
        raise ConfigError(f"tables {names} are planned in a cached tier and need a table "
                          f"store: pass store_dir (dlrm-run --store-dir DIR)")
    root = check_store_dir(store_dir)
    wanted = sorted({t.device for t in needed} if devices is None
                    else set(devices) & {t.device for t in needed})
    stores: dict[int, TableStore] = {}
    try:
        for device in wanted:
            stores[device] = open_store(device_store_dir(root, device),
                                        [t for t in needed if t.device == device], seed)
        for table in needed:
            if table.tier is Tier.DRAM_CACHE and table.device in stores:
                stores[table.device].warm(table.name)
    except BaseException:
        for store in stores.values():
            store.close()
        raise
    return stores
