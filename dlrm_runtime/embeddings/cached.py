"""Embedding tables served through a row cache over the tiered store.

A plan puts a table in a cached tier (``dram_cache`` or ``store_cache``) when its rows
do not all fit in device memory: each of its shards becomes a
:class:`~storage.RowCache` of the shard's ``cache_rows`` slots on the shard's device,
over the shard's rows in a :class:`~storage.TableStore` (one store table per shard, in
the layout of :mod:`dlrm_runtime.embeddings.stores`). For ``dram_cache`` the store's
chunk files are read into the host page cache when the embeddings are built
(:meth:`~storage.TableStore.warm`), so the cache's misses are served from host DRAM;
for ``store_cache`` they come from disk on demand.

Training is exact: the forward pools the cached rows (sum-pooled bags), and the
backward applies the table's fused row optimizer (SGD or row-wise Adagrad, from the
tables spec) to the rows it used: on their slots, with the arithmetic of
:class:`~dlrm_runtime.embeddings.optim.RowOptimizer` (so the weights equal the
in-memory ones bit for bit), or, for a batch with more distinct rows than slots,
through the cache's ``apply_*`` (rows without a slot updated in the store; equal up to
fp32 rounding order, as duplicate ids are summed before the step). The update happens
inside ``loss.backward()``, as in FBGEMM's fused backward-optimizer, so cached tables
give the row optimizer no :class:`~dlrm_runtime.embeddings.base.RowBlock`: they are
invisible to it and to the runtime checkpoint; their weights and optimizer state are
made durable by the store checkpoint. Checkpoints are transactions across the stores
(and the runtime checkpoint): :meth:`CachedTables.prepare` makes every store durable at
a step without committing it, :meth:`CachedTables.commit` commits, and
:meth:`CachedTables.recover` settles a store left in doubt by a crash from the step
the run committed (see :mod:`dlrm_runtime.checkpoint`).

:class:`CachedTablesOwner` is what a model's embeddings (one process, or one rank)
offer the training loop for their cached tables.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlrm_runtime.embeddings.base import (
    TORCH_DTYPE,
    add_pooled_,
    check_range,
    expand_pooled,
    sum_rows,
)
from dlrm_runtime.embeddings.placement import TablePlacement
from dlrm_runtime.embeddings.sparse import SparseBatch
from dlrm_runtime.embeddings.stores import StoreTable, open_device_stores, store_tables
from dlrm_runtime.errors import CheckpointError, ConfigError
from planner import DType, Optimizer, TableSpec, TablesSpec
from storage import ADAGRAD_EPS, RowCache, TableStore, lookup_many, rowwise_adagrad_


class UpdateClock(Protocol):
    """Where the time of the fused row updates (inside ``loss.backward()``) goes, e.g.
    :class:`~dlrm_runtime.measure.timing.Stopwatch`."""

    def timing(self) -> contextlib.AbstractContextManager[object]: ...


CACHE_POLICY = "lru"
"""Replacement policy of the row caches (see :mod:`storage.cache.policy`)."""
WRITE_BEHIND = True
"""Evicted dirty rows are written back after the lookup that evicts them."""


def background_store_work(device: torch.device) -> bool:
    """Whether a row cache on ``device`` does its store work (prefetch reads,
    write-behind) on a background thread: yes beside an accelerator, whose compute
    runs asynchronously; not on the CPU, where the thread only competes with the
    training step for the interpreter lock and the cores (measured with
    bench/store_training.py --small-mlp on 2 cores: 64 against 46 ms of CPU time a step)."""
    return device.type != "cpu"

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
                        write_behind=WRITE_BEHIND,
                        background=background_store_work(self.device))

    def rebuild(self) -> None:
        """A fresh, empty cache (after the store was rolled back)."""
        self.cache.close()
        self.cache = self._new_cache()

    def fits(self, ids: torch.Tensor) -> bool:
        """Whether the distinct rows of local ``ids`` fit in the cache's slots."""
        slots = self.cache.num_slots
        return ids.numel() <= slots or torch.unique(ids).numel() <= slots

    def pool(self, ids: torch.Tensor, offsets: torch.Tensor,
             slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Local ``ids`` and ``offsets`` (``B + 1``) -> pooled ``[B, dim]`` float32 on the
        output device, and the slots of the ids. All rows go through the slots when the
        batch's distinct rows fit; otherwise the cache serves the overflow straight from
        the store (slots None). ``slots``: the ids' slots already looked up
        (:func:`lookup_shards`)."""
        cache = self.cache
        offsets = offsets.to(self.device)
        if slots is not None or self.fits(ids):
            if slots is None:
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
        :class:`~dlrm_runtime.embeddings.optim.RowOptimizer` on an in-memory weight, so results are
        bit-identical), else through the cache's ``apply_*`` (rows without a slot are
        updated in the store)."""
        grad = grad.to(self.device, torch.float32)
        bag_starts = offsets[:-1].to(self.device)
        if slots is not None:
            if self.optimizer is Optimizer.ROWWISE_ADAGRAD:
                touched = self._adagrad_on_slots(ids.to(self.device), slots, bag_starts, grad,
                                                 lr)
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
        add_pooled_(weights, slots, bag_starts, (grad * -lr).to(weights.dtype))
        return slots

    def _adagrad_on_slots(self, ids: torch.Tensor, slots: torch.Tensor,
                          bag_starts: torch.Tensor, grad: torch.Tensor,
                          lr: float) -> torch.Tensor:
        """``RowOptimizer._adagrad`` on the slots: duplicate ids summed per row id by
        :func:`~dlrm_runtime.embeddings.sum_rows`, as the in-memory tables do, so the
        sums do not depend on which slots the rows occupy (nor on the cache's history)."""
        weights, state = self.cache.weights, self.cache.state
        if state is None:  # pragma: no cover - built with_state for row-wise Adagrad
            raise ConfigError(f"table {self.table.spec.name!r}: the cache holds no Adagrad state")
        values = expand_pooled(grad, bag_starts, slots.numel())
        rows, values = sum_rows(ids, values)
        # the slot of each distinct row: every occurrence of a row has the same slot
        slot_of = torch.empty_like(rows)
        slot_of[torch.searchsorted(rows, ids)] = slots.to(rows.device)
        rowwise_adagrad_(weights, state, slot_of, values.float(), lr)
        return slot_of


class _CachedBag(torch.autograd.Function):
    """Sum-pooled lookup through a row cache whose backward applies the row optimizer
    to the cached rows (no gradient leaves it). ``anchor`` is an empty tensor that
    requires grad, so that autograd calls the backward."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, shard: _CacheShard, ids: torch.Tensor,  # type: ignore[override]
                offsets: torch.Tensor, lr: float, clock: UpdateClock | None,
                looked_up: torch.Tensor | None) -> torch.Tensor:
        pooled, slots = shard.pool(ids, offsets, looked_up)
        ctx.shard, ctx.lr, ctx.slots, ctx.clock = shard, lr, slots, clock
        ctx.save_for_backward(ids, offsets)
        return pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ids, offsets = ctx.saved_tensors
        with ctx.clock.timing() if ctx.clock is not None else contextlib.nullcontext():
            ctx.shard.update(ids, offsets, grad, ctx.lr, ctx.slots)
        return None, None, None, None, None, None, None


def lookup_shards(batches: Sequence[tuple[_CacheShard, torch.Tensor]]
                  ) -> list[torch.Tensor | None]:
    """The slots of each ``(shard, local ids)`` whose distinct rows fit in its cache,
    looked up with one :func:`storage.lookup_many` per device (in the order given);
    None for the others, which :meth:`_CacheShard.pool` serves by gathering."""
    out: list[torch.Tensor | None] = [None] * len(batches)
    by_device: dict[torch.device, list[int]] = {}
    for k, (shard, ids) in enumerate(batches):
        if shard.fits(ids):
            by_device.setdefault(shard.cache.device, []).append(k)
    for positions in by_device.values():
        slots = lookup_many([batches[k][0].cache for k in positions],
                                      [batches[k][1] for k in positions])
        for k, found in zip(positions, slots):
            out[k] = found
    return out


Routed = list[tuple[_CacheShard | None, torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""Per shard of a table: its cache (None: another process's), local ids, local bag
offsets (``B + 1``), and the ids' slots when already looked up."""


# ---------------------------------------------------------------- one cached table


class CachedTable(nn.Module):
    """One table in a cached tier: one row cache per shard (table-wise: one; row-wise:
    ids routed to the shard owning their row, partial sums added, as in
    :class:`~dlrm_runtime.embeddings.ShardedTable`)."""

    def __init__(self, spec: TableSpec, index: int, placement: TablePlacement,
                 tables: Sequence[StoreTable], stores: dict[int, TableStore],
                 output_device: torch.device) -> None:
        super().__init__()
        self.spec = spec
        self.index = index
        self.placement = placement
        self.output_device = output_device
        self.shards: list[_CacheShard | None] = [
            _CacheShard(stores[shard.plan_device], table, shard.cache_rows, shard.device,
                        output_device) if shard.plan_device in stores else None
            for shard, table in zip(placement.shards, tables)]
        """One cache per shard of the placement; None for shards of plan devices this
        process does not serve (other ranks)."""
        self.boundaries = torch.tensor([s.row_start for s in placement.shards[1:]],
                                       dtype=torch.int64)
        self.lr: float | None = None
        """The row optimizer's learning rate; needed to train (set by the owner)."""
        self.clock: UpdateClock | None = None
        """When set, the time of the fused updates (in the backward) is added to it."""
        self._resolved: tuple[torch.Tensor, Routed] | None = None
        """The ids of the batch :meth:`CachedTables.resolve` looked up, and their routes."""

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``ids``, ``offsets`` (``B + 1``) -> pooled ``[B, dim]`` float32 on the
        output device; in training (grad enabled) the backward updates the rows."""
        check_range(self.spec, ids)
        train = torch.is_grad_enabled()
        if train and self.lr is None:
            raise ConfigError(f"table {self.spec.name!r} is cached and trains through its "
                              f"cache: set the embeddings' embedding_lr first")
        resolved, self._resolved = self._resolved, None
        if resolved is not None and resolved[0] is ids:
            routes = resolved[1]
        else:
            routes = [(shard, local, local_offsets, None)
                      for shard, local, local_offsets in self._routed(ids, offsets)]
        total = None
        for s, (shard, local, local_offsets, slots) in enumerate(routes):
            if shard is None:
                raise ConfigError(f"table {self.spec.name!r}: the shard of plan device "
                                  f"{self.placement.shards[s].plan_device} is served by "
                                  f"another process")
            out = self.shard_forward(shard, local, local_offsets, slots)
            total = out if total is None else total + out
        if total is None:  # pragma: no cover - a placement has at least one shard
            raise ValueError(f"table {self.spec.name!r} has no shards")
        return total

    def shard_forward(self, shard: _CacheShard, ids: torch.Tensor, offsets: torch.Tensor,
                      slots: torch.Tensor | None = None) -> torch.Tensor:
        """One shard's pooled ``[B, dim]`` float32 for its local ``ids`` and ``offsets``
        (``B + 1``); in training (grad enabled) its backward updates the rows.
        ``slots``: the ids' slots already looked up (:func:`lookup_shards`)."""
        if not torch.is_grad_enabled():
            return shard.pool(ids, offsets, slots)[0]
        if self.lr is None:
            raise ConfigError(f"table {self.spec.name!r} is cached and trains through its "
                              f"cache: set the embeddings' embedding_lr first")
        anchor = torch.empty(0, requires_grad=True)
        return _CachedBag.apply(anchor, shard, ids, offsets, self.lr, self.clock, slots)

    def local_shards(self) -> list[_CacheShard]:
        """The caches this process serves."""
        return [shard for shard in self.shards if shard is not None]

    def shard_at(self, row_start: int) -> _CacheShard:
        """The local cache of the shard starting at row ``row_start``."""
        for shard in self.local_shards():
            if shard.table.shard.row_start == row_start:
                return shard
        raise KeyError(f"table {self.spec.name!r}: no local shard at row {row_start}")

    def _routed(self, ids: torch.Tensor, offsets: torch.Tensor
                ) -> list[tuple[_CacheShard | None, torch.Tensor, torch.Tensor]]:
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
            out.append((shard, ids[mine] - shard.table.shard.row_start, local_offsets))
        return out

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start reading the rows of ``ids`` that are not cached, in the background.
        Caches without a background thread (on the CPU, :func:`background_store_work`)
        are skipped: read at once, the rows would cost what the next lookup pays for
        them, plus a second search of the index."""
        if ids.numel() == 0:
            return
        check_range(self.spec, ids)
        if len(self.shards) == 1:
            if self.shards[0] is not None and self.shards[0].cache.background:
                self.shards[0].cache.prefetch(ids)
            return
        owner = torch.bucketize(ids, self.boundaries, right=True)
        for s, shard in enumerate(self.shards):
            if shard is None or not shard.cache.background:
                continue
            local = ids[owner == s] - shard.table.shard.row_start
            if local.numel():
                shard.cache.prefetch(local)

    def full_weight(self) -> torch.Tensor:
        """The whole table, a copy on the output device (dirty cached rows are written
        to the store first: this is for tests and small tables)."""
        full = torch.empty(self.spec.num_embeddings, self.spec.embedding_dim,
                           dtype=TORCH_DTYPE[self.spec.dtype], device=self.output_device)
        for shard in self.shards:
            if shard is None:
                raise ConfigError(f"table {self.spec.name!r}: full_weight needs every shard in "
                                  f"this process")
            shard.cache.flush()
            rows = shard.store.read_table(shard.table.name)
            values = torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16) \
                if self.spec.dtype is DType.BF16 else torch.from_numpy(rows)
            full[shard.table.shard.row_start:shard.table.shard.row_end] = values
        return full


# ---------------------------------------------------------------- all cached tables


class CachedTables(nn.Module):
    """The cached tables of a model over their open ``stores`` (by plan device, see
    :mod:`dlrm_runtime.embeddings.stores`; they are closed with these tables), and what
    the training loop calls on them: :meth:`prefetch`, :meth:`stats`, the checkpoint
    transaction :meth:`prepare` / :meth:`commit` / :meth:`recover`, and :meth:`close`.
    Shards of plan devices without a store here are other processes'."""

    def __init__(self, tables: TablesSpec, placements: dict[str, TablePlacement],
                 output_device: torch.device, stores: dict[int, TableStore],
                 embedding_lr: float | None = None) -> None:
        super().__init__()
        self.stores = stores
        by_table: dict[int, list[StoreTable]] = {}
        for table in store_tables(tables, placements):
            by_table.setdefault(table.index, []).append(table)
        self.tables = nn.ModuleList(
            CachedTable(tables.tables[index], index, placements[tables.tables[index].name],
                        parts, stores, output_device)
            for index, parts in by_table.items()
            if any(part.device in stores for part in parts))
        self.embedding_lr = embedding_lr

    @classmethod
    def open(cls, tables: TablesSpec, placements: dict[str, TablePlacement],
             output_device: torch.device, seed: int, store_dir: str | Path | None,
             embedding_lr: float | None = None,
             devices: Collection[int] | None = None) -> CachedTables:
        """The cached tables of ``placements`` over the stores under ``store_dir``
        (:func:`~dlrm_runtime.embeddings.stores.open_device_stores`), created with the
        tables' initial values when new. ``devices``: the plan devices this process
        serves (default: every device holding cached shards); only their stores are
        opened and their shards cached."""
        stores = open_device_stores(store_dir, store_tables(tables, placements), seed, devices)
        try:
            return cls(tables, placements, output_device, stores, embedding_lr)
        except BaseException:
            for store in stores.values():
                store.close()
            raise

    @property
    def store(self) -> TableStore:
        """The one store of a single-device run."""
        if len(self.stores) != 1:
            raise ConfigError(f"{len(self.stores)} table stores here; use .stores")
        return next(iter(self.stores.values()))

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

    def time_updates(self, clock: UpdateClock | None) -> None:
        """Add the time of the fused row updates, which run inside ``loss.backward()``,
        to ``clock`` (None: stop)."""
        for table in self.tables:
            table.clock = clock

    def _shards(self) -> list[_CacheShard]:
        return [shard for table in self.tables for shard in table.local_shards()]

    def _caches(self) -> list[RowCache]:
        return [shard.cache for shard in self._shards()]

    def table(self, index: int) -> CachedTable:
        """The cached table of spec position ``index``."""
        for table in self.tables:
            if table.index == index:
                return table
        raise KeyError(f"no cached table at position {index}")

    def resolve(self, sparse: SparseBatch) -> None:
        """Look up the rows of ``sparse`` in every local cache that they fit, with one
        :func:`storage.lookup_many` per device; each table's next forward of these ids
        uses the slots. Does nothing when training without a learning rate (the forward
        refuses that before any lookup)."""
        if torch.is_grad_enabled() and self._lr is None:
            return
        pending: list[tuple[CachedTable, Routed]] = []
        batches: list[tuple[_CacheShard, torch.Tensor]] = []
        for table in self.tables:
            ids = sparse.ids[table.index]
            check_range(table.spec, ids)
            routes = table._routed(ids, sparse.offsets[table.index])
            pending.append((table, [(shard, local, offsets, None)
                                    for shard, local, offsets in routes]))
            batches.extend((shard, local) for shard, local, _ in routes if shard is not None)
        slots = iter(lookup_shards(batches))
        for table, routes in pending:
            table._resolved = (sparse.ids[table.index],
                               [(shard, local, offsets, None if shard is None else next(slots))
                                for shard, local, offsets, _ in routes])

    def prefetch(self, sparse: SparseBatch) -> None:
        """Start reading the uncached rows of ``sparse`` (a whole batch, every table;
        each cache takes the ids of its shard)."""
        for table in self.tables:
            table.prefetch(sparse.ids[table.index])

    def stats(self) -> dict[str, float]:
        """Counters summed over the caches since they were built; see :meth:`InMemoryEmbeddings.cache_stats`."""
        totals: dict[str, float] = {}
        per_table: dict[str, float] = {}
        for table in self.tables:
            hits = accesses = 0
            for shard in table.local_shards():
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

    # ---- checkpoints: a transaction over the stores ----------------------------------
    def prepare(self, step: int) -> None:
        """First phase of the checkpoint of ``step``: every dirty cached row written
        back, every store durable at ``step`` but in doubt until :meth:`commit` (or,
        after a crash, :meth:`recover`)."""
        for cache in self._caches():
            cache.flush()
        for store in self.stores.values():
            store.prepare(step)

    def commit(self, step: int) -> None:
        """Second phase: every store prepared at ``step`` commits it."""
        for store in self.stores.values():
            if store.prepared_step != step:
                raise CheckpointError(f"table store {str(store.path)!r} holds no prepared "
                                      f"checkpoint of step {step} to commit")
            store.commit_prepared()

    def checkpoint(self, step: int) -> None:
        """Both phases at once (a run whose only state is these stores)."""
        self.prepare(step)
        self.commit(step)

    def recover(self, committed: int | None) -> None:
        """Settle every store on ``committed``, the newest step that the whole run
        committed (None: none): a store in doubt at that step rolls forward, one in
        doubt at another step rolls back; then every store must be at ``committed``
        (:class:`CheckpointError` naming the store otherwise). The caches start empty."""
        for store in self.stores.values():
            prepared = store.prepared_step
            if prepared is not None and prepared == committed:
                store.commit_prepared()
            elif prepared is not None:
                self._settle_caches()
                store.rollback()
        for store in self.stores.values():
            have = store.checkpoint_step
            if have != committed:
                held = "no checkpoint" if have is None else f"tables trained to step {have}"
                wanted = ("no committed checkpoint" if committed is None
                          else f"its last committed checkpoint at step {committed}")
                raise CheckpointError(f"the table store {str(store.path)!r} holds {held}, but "
                                      f"the run has {wanted}; pass --resume with the "
                                      f"--checkpoint-dir of the run that wrote the store, or "
                                      f"use another --store-dir")
        self._rebuild()

    @property
    def checkpoint_step(self) -> int | None:
        """The step of the stores' last checkpoint (None: none); they must agree."""
        steps = {store.checkpoint_step for store in self.stores.values()}
        if len(steps) > 1:
            raise CheckpointError(f"the table stores are at different steps "
                                  f"{sorted(steps, key=lambda s: -1 if s is None else s)}: "
                                  f"resume with --resume to settle them")
        return steps.pop() if steps else None

    def restore(self, step: int) -> None:
        """Return the tables to the stores' checkpoint of ``step`` (their last one):
        writes since then are undone and the caches start empty."""
        for store in self.stores.values():
            have = store.checkpoint_step
            if have != step:
                held = "no checkpoint" if have is None else f"the checkpoint of step {have}"
                raise CheckpointError(f"table store {str(store.path)!r} holds {held}, not "
                                      f"step {step}; resume from the checkpoint of step {have} "
                                      f"or start afresh with another store_dir")
        self._settle_caches()
        for store in self.stores.values():
            store.rollback()
        self._rebuild()

    def _settle_caches(self) -> None:
        for cache in self._caches():
            cache.close()

    def _rebuild(self) -> None:
        for shard in self._shards():
            shard.rebuild()

    def close(self) -> None:
        """Stop the caches' background work and close the stores (writes after their
        last checkpoint are rolled back; a store in doubt stays so for :meth:`recover`)."""
        for cache in self._caches():
            cache.close()
        for store in self.stores.values():
            store.close()



class CachedTablesOwner:
    """What a model's embeddings (all tables in one process, or one rank's part) offer
    the training loop for their cached tables, ``cached`` (None without any): the
    learning rate of the fused update, prefetching, counters, store checkpoints and
    closing; each does nothing (or returns None) without cached tables. The owner
    calls :meth:`_resolved` once a forward has looked up its cached rows."""

    cached: CachedTables | None
    specs: tuple[TableSpec, ...]
    _next_batch: SparseBatch | None

    @property
    def embedding_lr(self) -> float | None:
        """Learning rate of the cached tables' fused row optimizer (None: not set)."""
        return self.cached.embedding_lr if self.cached is not None else None

    @embedding_lr.setter
    def embedding_lr(self, lr: float | None) -> None:
        if self.cached is not None:
            self.cached.embedding_lr = lr

    def prefetch(self, next_sparse: SparseBatch) -> None:
        """Announce the batch AFTER the one of the next forward (the global batch under
        torchrun: every rank has it): right after that forward's cache lookups, the rows
        of ``next_sparse`` missing from this process's caches are read from the store on
        background threads, overlapping the rest of the step (caches on the CPU have no
        such thread and read their misses in the lookup). Call it before
        ``Trainer.step(batch)`` with the following batch."""
        if self.cached is not None:
            if len(next_sparse.ids) != len(self.specs):
                raise ValueError(f"the batch has ids for {len(next_sparse.ids)} tables, the "
                                 f"model has {len(self.specs)}")
            self._next_batch = next_sparse

    def _resolved(self) -> None:
        """This forward's cached rows are resident: read the announced batch's misses
        while the rest of the step (MLPs, backward, optimizers) computes."""
        if self._next_batch is not None and self.cached is not None:
            self.cached.prefetch(self._next_batch)
        self._next_batch = None

    def cache_stats(self) -> dict[str, float] | None:
        """None without cached tables; else counters summed over this process's caches
        since they were built: ``hit_rate`` (hits / accesses), ``accesses``, ``hits``,
        ``misses``, ``evictions``, ``write_backs``, ``uncached``, ``prefetched_rows``,
        ``store_read_bytes``, ``store_written_bytes``, ``background_read_s``,
        ``background_wait_s``, ``background_hidden_s``, and ``hit_rate/<table>`` per
        cached table."""
        return self.cached.stats() if self.cached is not None else None

    @property
    def store_checkpoint_step(self) -> int | None:
        """The step of the table stores' last checkpoint (None: none, or no store)."""
        return self.cached.checkpoint_step if self.cached is not None else None

    def checkpoint(self, step: int) -> None:
        """Make the cached tables durable at ``step``: dirty cached rows are written
        back and the stores checkpoint (fsynced; a crash later reopens them at ``step``)."""
        if self.cached is not None:
            self.cached.checkpoint(step)

    def restore(self, step: int) -> None:
        """Return the cached tables to the stores' checkpoint of ``step``
        (:class:`~dlrm_runtime.errors.CheckpointError` if their last checkpoint is of
        another step); the caches start empty."""
        if self.cached is not None:
            self.cached.restore(step)

    @contextlib.contextmanager
    def timing_updates(self, clock: UpdateClock) -> Iterator[None]:
        """Within it, the time of the cached tables' fused row updates, which run inside
        ``loss.backward()``, is added to ``clock``."""
        if self.cached is None:
            yield
            return
        self.cached.time_updates(clock)
        try:
            yield
        finally:
            self.cached.time_updates(None)

    def close(self) -> None:
        """Stop the caches' background threads and close the stores (writes after their
        last checkpoint are rolled back). Cached tables cannot be looked up after."""
        if self.cached is not None:
            self.cached.close()
