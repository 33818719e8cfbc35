"""Embedding tables served through a row cache over the tiered store.

A plan puts a table in a cached tier (``dram_cache`` or ``store_cache``) when its rows
do not all fit in device memory: each of its shards becomes a
:class:`~storage.RowCache` of the shard's ``cache_rows`` slots on the shard's device,
over the shard's rows in a :class:`~storage.TableStore` (one store table per shard).
For ``dram_cache`` the store's chunk files are read into the host page cache when the
embeddings are built (:meth:`~storage.TableStore.warm`), so the cache's misses are
served from host DRAM; for ``store_cache`` they come from disk on demand.

Training is exact: the forward pools the cached rows (sum-pooled bags), and the
backward applies the table's fused row optimizer (SGD or row-wise Adagrad, from the
tables spec) to the rows it used: on their slots, with the arithmetic of
:class:`~dlrm_runtime.optim.RowOptimizer` (so the weights equal the in-memory ones bit
for bit), or, for a batch with more distinct rows than slots, through the cache's
``apply_*`` (rows without a slot updated in the store; equal up to fp32 rounding
order, as duplicate ids are summed before the step). The update happens inside
``loss.backward()``, as in FBGEMM's fused backward-optimizer, so cached tables give
the row optimizer no :class:`~dlrm_runtime.embeddings.RowBlock`: they are invisible
to it and to the runtime checkpoint; their weights and optimizer state are made
durable by the store checkpoint (:meth:`CachedTables.checkpoint`).

The store is created with the tables initialised exactly like
:func:`~dlrm_runtime.embeddings.init_table` (same generator, consumed block by block:
CPU ``uniform_`` draws serially), so a cached model starts from the same weights as
the in-memory one; a store that already holds the tables is opened as it is (rolled
back to its last checkpoint).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlrm_runtime.embeddings import (
    TORCH_DTYPE,
    check_range,
    expand_pooled,
    init_generator,
    uniform_bag_length,
)
from dlrm_runtime.errors import CheckpointError, ConfigError
from dlrm_runtime.sharding import TablePlacement
from dlrm_runtime.sparse import SparseBatch
from dlrm_runtime.timing import Stopwatch
from planner import DType, Optimizer, TableSpec, TablesSpec, Tier
from storage import RecoveryRequiredError, RowCache, StoreError, StoreLockedError, TableStore

__all__ = ["ADAGRAD_EPS", "CACHE_POLICY", "CachedTable", "CachedTables", "StoreTable",
           "check_store_tables", "open_store", "store_tables"]

ADAGRAD_EPS = 1e-8
"""Row-wise Adagrad's epsilon; equals :data:`dlrm_runtime.optim.ADAGRAD_EPS` (tested)."""
CACHE_POLICY = "lru"
WRITE_BEHIND = True
"""Replacement policy of the row caches (see :mod:`storage.cache_policy`)."""
INIT_BLOCK_ROWS_BYTES = 64 * 1024 * 1024
"""Bytes of fp32 rows drawn at once when skipping to a row shard's first row."""
STORE_DTYPE = {DType.FP32: "fp32", DType.FP16: "fp16", DType.BF16: "bf16"}

StoreProgress = Callable[[str, int, int], None]
"""``progress(store_table, rows_done, rows_total)`` while the store's tables are written."""


# ---------------------------------------------------------------- what the store holds


@dataclass(frozen=True, slots=True)
class StoreTable:
    """One table of the store: rows ``[row_start, row_end)`` of table ``index`` of the
    tables spec (the whole table, or one row shard of it)."""

    name: str
    """The table's name in the store: the table's own name, or
    ``<table>.rows-<row_start>-<row_end>`` for a row shard."""
    spec: TableSpec
    index: int
    row_start: int
    row_end: int
    tier: Tier

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

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
            out.append(StoreTable(name, spec, index, shard.row_start, shard.row_end, shard.tier))
    return out


class _InitBlocks:
    """:data:`storage.tables.BlockInit` for a store table: the rows of
    :func:`~dlrm_runtime.embeddings.init_table`, drawn from the same generator block
    by block (skipping the rows before a row shard's first row)."""

    def __init__(self, table: StoreTable, seed: int) -> None:
        self._generator = init_generator(table.index, seed)
        self._bound = math.sqrt(1.0 / table.spec.num_embeddings)
        self._dim = table.spec.embedding_dim
        self._skip = table.row_start
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
    """The store at ``store_dir`` opened for writing (created when missing or an empty
    directory), holding every table of ``needed``: tables it lacks are added with
    :func:`~dlrm_runtime.embeddings.init_table`'s values; tables it has must match
    (rows, dim, dtype, optimizer state) and keep their values as of the store's last
    checkpoint. Raises :class:`ConfigError` for a missing ``store_dir``, a path that
    is not a store, a store held by another writer, or a table that does not match."""
    if store_dir is None:
        names = sorted({t.spec.name for t in needed})
        raise ConfigError(f"tables {names} are planned in a cached tier and need a table "
                          f"store: pass store_dir (dlrm-run --store-dir DIR)")
    path = Path(store_dir)
    try:
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            store = TableStore.create(path, overwrite=path.exists())
        else:
            check_store_tables(path, needed)  # before r+, which rewrites the journal
            store = TableStore.open(path, mode="r+")
    except StoreError as exc:
        raise ConfigError(f"store_dir {str(path)!r} cannot be used as the table store: "
                          f"{exc}") from exc
    try:
        present = set(store.tables())
        _check_tables(store.path, present, store.checkpoint_step, needed)
        for table in needed:
            if table.name in present:
                _check_matches(store, table)
                continue
            store.add_table(table.name, table.rows, table.spec.embedding_dim,
                            dtype=STORE_DTYPE[table.spec.dtype], init=_InitBlocks(table, seed),
                            optimizer_state=table.optimizer_state,
                            progress=None if progress is None
                            else (lambda done, total, name=table.name: progress(name, done, total)))
    except BaseException:
        store.close()
        raise
    return store


def check_store_tables(path: str | Path, needed: Sequence[StoreTable]) -> None:
    """Read-only look at an existing store: :class:`ConfigError` unless it can hold
    ``needed`` without being made for other tables (see :func:`_check_tables`). A store
    that needs recovery or is open elsewhere is checked once opened; a path that is not
    a store, or none, is left to :func:`open_store`."""
    path = Path(path)
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


# ---------------------------------------------------------------- one cached shard


class _CacheShard:
    """One store table behind a row cache on ``device``."""

    def __init__(self, store: TableStore, table: StoreTable, slots: int, device: torch.device,
                 output_device: torch.device) -> None:
        self.store = store
        self.table = table
        self.slots = slots
        self.device = device
        self.output_device = output_device
        self.optimizer = table.spec.optimizer
        self.cache = self._new_cache()

    def _new_cache(self) -> RowCache:
        return RowCache(self.store, self.table.name, slots=self.slots, device=self.device,
                        policy=CACHE_POLICY,
                        with_state=self.optimizer is Optimizer.ROWWISE_ADAGRAD,
                        write_behind=WRITE_BEHIND)

    def rebuild(self) -> None:
        """A fresh, empty cache (after the store was rolled back)."""
        self.cache.close()
        self.cache = self._new_cache()

    def pool(self, ids: torch.Tensor, offsets: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Local ``ids`` and ``offsets`` (``B + 1``) -> pooled ``[B, dim]`` float32 on the
        output device, and the slots of the ids. All rows go through the slots when the
        batch's distinct rows fit; otherwise the cache serves the overflow straight from
        the store (slots None)."""
        cache = self.cache
        offsets = offsets.to(self.device)
        if ids.numel() <= cache.num_slots or torch.unique(ids).numel() <= cache.num_slots:
            slots = cache.lookup(ids)
            out = F.embedding_bag(slots, cache.weights, offsets, mode="sum",
                                  include_last_offset=True)
            return out.to(self.output_device, torch.float32), slots
        rows = cache.gather(ids)
        positions = torch.arange(ids.numel(), device=self.device)
        out = F.embedding_bag(positions, rows, offsets, mode="sum", include_last_offset=True)
        return out.to(self.output_device, torch.float32), None

    def update(self, ids: torch.Tensor, offsets: torch.Tensor, grad: torch.Tensor,
               lr: float, slots: torch.Tensor | None) -> None:
        """The fused optimizer step for the rows of ``ids`` from the pooled gradient:
        on their ``slots`` in place when every id has one (the same arithmetic as
        :class:`~dlrm_runtime.optim.RowOptimizer` on an in-memory weight, so results are
        bit-identical), else through the cache's ``apply_*`` (rows without a slot are
        updated in the store)."""
        grad = grad.to(self.device, torch.float32)
        bag_starts = offsets[:-1].to(self.device)
        if slots is not None:
            if self.optimizer is Optimizer.ROWWISE_ADAGRAD:
                touched = self._adagrad_on_slots(slots, bag_starts, grad, lr)
            else:
                touched = self._sgd_on_slots(slots, bag_starts, grad, lr)
            self.cache.mark_dirty(touched)
            return
        grads = expand_pooled(grad, bag_starts, ids.numel())
        if self.optimizer is Optimizer.ROWWISE_ADAGRAD:
            self.cache.apply_rowwise_adagrad(ids, grads, lr=lr, eps=ADAGRAD_EPS)
        else:
            self.cache.apply_sgd(ids, grads, lr=lr)

    def _sgd_on_slots(self, slots: torch.Tensor, bag_starts: torch.Tensor, grad: torch.Tensor,
                      lr: float) -> torch.Tensor:
        """``RowOptimizer._sgd`` on the slots: the pooled gradient, scaled, added to each
        id's slot (one scatter per id position when all bags hold ``L`` ids)."""
        weights = self.cache.weights
        scaled = (grad * -lr).to(weights.dtype)
        length = uniform_bag_length(bag_starts, slots.numel())
        if length is not None:
            by_position = slots.view(-1, length).t().contiguous() if length > 1 else slots.view(1, -1)
            for position in by_position:
                weights.index_add_(0, position, scaled)
        else:
            weights.index_add_(0, slots, expand_pooled(scaled, bag_starts, slots.numel()))
        return slots

    def _adagrad_on_slots(self, slots: torch.Tensor, bag_starts: torch.Tensor,
                          grad: torch.Tensor, lr: float) -> torch.Tensor:
        """``RowOptimizer._adagrad`` on the slots (coalesced per slot, i.e. per row)."""
        weights, state = self.cache.weights, self.cache.state
        if state is None:  # pragma: no cover - built with_state for row-wise Adagrad
            raise ConfigError(f"table {self.table.spec.name!r}: the cache holds no Adagrad state")
        values = expand_pooled(grad, bag_starts, slots.numel())
        coalesced = torch.sparse_coo_tensor(slots.unsqueeze(0), values,
                                            (weights.shape[0], weights.shape[1]),
                                            check_invariants=False).coalesce()
        rows, values = coalesced.indices()[0], coalesced.values()
        state.index_add_(0, rows, values.pow(2).mean(dim=1))
        scale = (state[rows].sqrt() + ADAGRAD_EPS).reciprocal().unsqueeze(1)
        weights.index_add_(0, rows, (values * (scale * -lr)).to(weights.dtype))
        return rows


class _CachedBag(torch.autograd.Function):
    """Sum-pooled lookup through a row cache whose backward applies the row optimizer
    to the cached rows (no gradient leaves it). ``anchor`` is an empty tensor that
    requires grad, so that autograd calls the backward."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, shard: _CacheShard, ids: torch.Tensor,  # type: ignore[override]
                offsets: torch.Tensor, lr: float, clock: Stopwatch | None) -> torch.Tensor:
        pooled, slots = shard.pool(ids, offsets)
        ctx.shard, ctx.lr, ctx.slots, ctx.clock = shard, lr, slots, clock
        ctx.save_for_backward(ids, offsets)
        return pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ids, offsets = ctx.saved_tensors
        with ctx.clock.timing() if ctx.clock is not None else contextlib.nullcontext():
            ctx.shard.update(ids, offsets, grad, ctx.lr, ctx.slots)
        return None, None, None, None, None, None


# ---------------------------------------------------------------- one cached table


class CachedTable(nn.Module):
    """One table in a cached tier: one row cache per shard (table-wise: one; row-wise:
    ids routed to the shard owning their row, partial sums added, as in
    :class:`~dlrm_runtime.embeddings.ShardedTable`)."""

    def __init__(self, spec: TableSpec, index: int, placement: TablePlacement,
                 tables: Sequence[StoreTable], store: TableStore,
                 output_device: torch.device) -> None:
        super().__init__()
        self.spec = spec
        self.index = index
        self.placement = placement
        self.output_device = output_device
        self.shards = [_CacheShard(store, table, shard.cache_rows, shard.device, output_device)
                       for shard, table in zip(placement.shards, tables)]
        self.boundaries = torch.tensor([s.row_start for s in placement.shards[1:]],
                                       dtype=torch.int64)
        self.lr: float | None = None
        """The row optimizer's learning rate; needed to train (set by the owner)."""
        self.clock: Stopwatch | None = None
        """When set, the time of the fused updates (in the backward) is added to it."""

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``ids``, ``offsets`` (``B + 1``) -> pooled ``[B, dim]`` float32 on the
        output device; in training (grad enabled) the backward updates the rows."""
        check_range(self.spec, ids)
        train = torch.is_grad_enabled()
        if train and self.lr is None:
            raise ConfigError(f"table {self.spec.name!r} is cached and trains through its "
                              f"cache: set the embeddings' embedding_lr first")
        total = None
        for shard, local, local_offsets in self._routed(ids, offsets):
            if train:
                anchor = torch.empty(0, requires_grad=True)
                out = _CachedBag.apply(anchor, shard, local, local_offsets, self.lr,
                                       self.clock)
            else:
                out, _ = shard.pool(local, local_offsets)
            total = out if total is None else total + out
        if total is None:  # pragma: no cover - a placement has at least one shard
            raise ValueError(f"table {self.spec.name!r} has no shards")
        return total

    def _routed(self, ids: torch.Tensor, offsets: torch.Tensor
                ) -> list[tuple[_CacheShard, torch.Tensor, torch.Tensor]]:
        """Per shard: its local ids and bag offsets (``B + 1``)."""
        if len(self.shards) == 1:
            return [(self.shards[0], ids, offsets)]
        batch = offsets.numel() - 1
        bags = torch.repeat_interleave(torch.arange(batch), offsets.diff(),
                                       output_size=ids.numel())
        owner = torch.bucketize(ids, self.boundaries, right=True)
        out = []
        for s, shard in enumerate(self.shards):
            mine = owner == s
            counts = torch.bincount(bags[mine], minlength=batch)
            local_offsets = torch.zeros(batch + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=local_offsets[1:])
            out.append((shard, ids[mine] - shard.table.row_start, local_offsets))
        return out

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start reading the rows of ``ids`` that are not cached, in the background."""
        if ids.numel() == 0:
            return
        check_range(self.spec, ids)
        if len(self.shards) == 1:
            self.shards[0].cache.prefetch(ids)
            return
        owner = torch.bucketize(ids, self.boundaries, right=True)
        for s, shard in enumerate(self.shards):
            local = ids[owner == s] - shard.table.row_start
            if local.numel():
                shard.cache.prefetch(local)

    def full_weight(self) -> torch.Tensor:
        """The whole table, a copy on the output device (dirty cached rows are written
        to the store first: this is for tests and small tables)."""
        full = torch.empty(self.spec.num_embeddings, self.spec.embedding_dim,
                           dtype=TORCH_DTYPE[self.spec.dtype], device=self.output_device)
        for shard in self.shards:
            shard.cache.flush()
            rows = shard.store.read_table(shard.table.name)
            values = torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16) \
                if self.spec.dtype is DType.BF16 else torch.from_numpy(rows)
            full[shard.table.row_start:shard.table.row_end] = values
        return full


# ---------------------------------------------------------------- all cached tables


class CachedTables(nn.Module):
    """The cached tables of a model and the store they share; the training-loop API
    (:meth:`prefetch`, :meth:`stats`, :meth:`checkpoint`, :meth:`restore`,
    :meth:`close`) that :class:`~dlrm_runtime.embeddings.InMemoryEmbeddings` forwards."""

    def __init__(self, tables: TablesSpec, placements: dict[str, TablePlacement],
                 output_device: torch.device, seed: int, store_dir: str | Path | None,
                 embedding_lr: float | None = None) -> None:
        super().__init__()
        needed = store_tables(tables, placements)
        self.store = open_store(store_dir, needed, seed)
        try:
            by_table: dict[int, list[StoreTable]] = {}
            for table in needed:
                by_table.setdefault(table.index, []).append(table)
                if table.tier is Tier.DRAM_CACHE:
                    self.store.warm(table.name)
            self.tables = nn.ModuleList(
                CachedTable(tables.tables[index], index, placements[tables.tables[index].name],
                            parts, self.store, output_device)
                for index, parts in by_table.items())
        except BaseException:
            self.store.close()
            raise
        self.embedding_lr = embedding_lr

    @property
    def embedding_lr(self) -> float | None:
        return self._lr

    @embedding_lr.setter
    def embedding_lr(self, lr: float | None) -> None:
        if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool)
                                   and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"embedding_lr must be a finite number > 0, got {lr!r}")
        self._lr = None if lr is None else float(lr)
        for table in self.tables:
            table.lr = self._lr

    def time_updates(self, clock: Stopwatch | None) -> None:
        """Add the time of the fused row updates, which run inside ``loss.backward()``,
        to ``clock`` (None: stop)."""
        for table in self.tables:
            table.clock = clock

    def _caches(self) -> list[RowCache]:
        return [shard.cache for table in self.tables for shard in table.shards]

    def prefetch(self, sparse: SparseBatch) -> None:
        """Start reading the uncached rows of ``sparse`` (a whole batch, every table)."""
        for table in self.tables:
            table.prefetch(sparse.ids[table.index])

    def stats(self) -> dict[str, float]:
        """Counters summed over the caches since they were built; see :meth:`InMemoryEmbeddings.cache_stats`."""
        totals: dict[str, float] = {}
        per_table: dict[str, float] = {}
        for table in self.tables:
            hits = accesses = 0
            for shard in table.shards:
                s = shard.cache.stats()
                hits += s.hits
                accesses += s.accesses
                for key, value in (("accesses", s.accesses), ("hits", s.hits),
                                   ("misses", s.misses), ("evictions", s.evictions),
                                   ("write_backs", s.write_backs), ("uncached", s.uncached),
                                   ("prefetched_rows", s.prefetched_rows),
                                   ("store_read_bytes", s.store.read),
                                   ("store_written_bytes", s.store.written),
                                   ("background_read_s", s.background_read_s),
                                   ("background_wait_s", s.background_wait_s),
                                   ("background_hidden_s", s.background_hidden_s)):
                    totals[key] = totals.get(key, 0) + value
            per_table[f"hit_rate/{table.spec.name}"] = hits / accesses if accesses else 0.0
        accesses = totals.get("accesses", 0)
        return {"hit_rate": totals.get("hits", 0) / accesses if accesses else 0.0,
                **{k: float(v) for k, v in totals.items()}, **per_table}

    def resident_bytes(self) -> int:
        """Bytes of the cached rows and their optimizer state held on the devices."""
        total = 0
        for cache in self._caches():
            for tensor in (cache.weights, cache.state):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total

    def checkpoint(self, step: int) -> None:
        """Write every dirty cached row back, then make the store durable at ``step``."""
        for cache in self._caches():
            cache.flush()
        self.store.checkpoint(step)

    @property
    def checkpoint_step(self) -> int | None:
        return self.store.checkpoint_step

    def restore(self, step: int) -> None:
        """Return the tables to the store's checkpoint of ``step`` (its last one):
        writes since then are undone and the caches start empty."""
        have = self.store.checkpoint_step
        if have != step:
            held = "no checkpoint" if have is None else f"the checkpoint of step {have}"
            raise CheckpointError(f"table store {str(self.store.path)!r} holds {held}, not "
                                  f"step {step}; resume from the checkpoint of step {have} "
                                  f"or start afresh with another store_dir")
        for cache in self._caches():
            cache.close()
        self.store.rollback()
        for table in self.tables:
            for shard in table.shards:
                shard.rebuild()

    def close(self) -> None:
        """Stop the caches' background work and close the store (writes after its last
        checkpoint are rolled back)."""
        for cache in self._caches():
            cache.close()
        self.store.close()
