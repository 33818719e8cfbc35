"""DLRM trained across processes with torch.distributed (launched by ``torchrun``):
model parallelism for the tables, data parallelism for the MLPs, as TorchRec does.

Plan device ``d`` runs on rank ``d``; the plan's device count must equal the world
size. The global batch of step ``s`` is the one-process batch (``data.batch(s, B)``,
the same on every rank) and rank ``r`` takes samples ``[r b, (r + 1) b)`` with
``b = B / W``. Every table is served by *lookup jobs*: a whole table (table-wise), or
one shard of a row-wise, table-row-wise or column-wise table, each on the rank that
owns it in the plan, for the whole global batch. Per training step:

1. ids to the jobs (``all_to_all_single``, twice: the per-sample lengths, ``W b``
   int64 per job, then the ids themselves; row-wise ids go only to the shard owning
   their row, rebased to it; column-wise ids go to every column shard);
2. each rank pools its jobs for all ``B`` samples (table-batched for whole tables);
3. pooled embeddings back to the samples' ranks (one ``all_to_all_single`` of
   ``B x sum(job widths)`` float32 in all; backward: the same exchange reversed), where
   row-wise partial sums are added and column-wise pieces concatenated;
4. data-parallel tables: every rank holds a replica and pools its own samples locally;
5. after backward, ONE ``all_reduce`` (sum) of a flat buffer: the MLP gradients, the
   dense gradients of the data-parallel tables with a touched-row flag per row (their
   rows x (dim + 1) floats), and the local loss;
6. row-wise Adagrad on a column-wise table split over several ranks: its per-row sums
   of squares are all-reduced among the ranks holding its columns.

Tables in a cached tier (``dram_cache``, ``store_cache``; table-, row- and
table-row-wise) are lookup jobs like the others, served by their owner through row
caches over ITS table store, ``<store_dir>/device-<rank>`` (the layout of one
process too, :mod:`dlrm_runtime.cached`); the reverse exchange brings each cached
job its pooled gradient, and the fused row optimizer updates the cached rows inside
the backward. Since every rank has the global batch, each rank prefetches the next
batch's rows of its own cached shards without an exchange. A checkpoint is one
transaction over rank 0's runtime checkpoint and every rank's store (two-phase, see
:mod:`dlrm_runtime.checkpoint`).

The backward runs on ``local_loss / W``: gradients summed over ranks are then exactly
the gradients of the global mean loss, so the run computes what one process does on
the whole batch (up to float summation order). Only rank 0 writes progress, the
metrics log and checkpoints; a checkpoint holds every table whole (gathered to rank
0), in the format of :mod:`dlrm_runtime.checkpoint`, so a run resumes with any
process count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlrm_runtime.checkpoint import assemble_tables, table_pieces
from dlrm_runtime.collectives import (
    ProcessGroupInfo,
    all_to_all,
    all_to_all_values,
    process_group_info,
)
from dlrm_runtime.config import ModelConfig, TrainConfig
from dlrm_runtime.data import VALIDATION_OFFSET, Batch
from dlrm_runtime.embeddings import (
    TORCH_DTYPE,
    RowBlock,
    Segment,
    TableBatchedBags,
    batch_order,
    init_table,
    pooled_lookup,
)
from dlrm_runtime.errors import (
    ConfigError,
    PlanMismatchError,
)
from dlrm_runtime.memory import empty_weight, host_weight
from dlrm_runtime.metrics import accuracy, roc_auc
from dlrm_runtime.model import DLRM
from dlrm_runtime.optim import RowOptimizer
from dlrm_runtime.sharding import CACHED_TIERS, placements_from_plan
from dlrm_runtime.sparse import SparseBatch
from dlrm_runtime.timing import PhaseTimer, Stopwatch
from dlrm_runtime.train import (
    EvalResult,
    Peers,
    ProgressFactory,
    TrainResult,
    _dense_optimizer,
    checkpoint_state,
    data_for,
    restore_state,
    run_loop,
    torch_settings,
)
from planner import Optimizer, Plan, Sharding, TableSpec, Tier

if TYPE_CHECKING:
    from dlrm_runtime.cached import CachedTables
    from dlrm_runtime.data import ClickSource

__all__ = [
    "DistributedEmbeddings", "DistributedRowOptimizer", "DistributedTrainer", "LookupJob",
    "check_batch_size", "check_world_size", "evaluate_distributed", "local_batch",
    "train_distributed",
]

ROW_SPLIT = (Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE)


# ---------------------------------------------------------------- checks and batches


def check_world_size(plan: Plan, world_size: int) -> None:
    """Plan device ``d`` runs on rank ``d``: the counts must agree."""
    devices = plan.topology.world_size
    if devices != world_size:
        raise PlanMismatchError(
            f"the plan has {devices} devices but the world size is {world_size} (plan device d "
            f"runs on rank d): re-plan with a --topology of {world_size} devices "
            f"(hosts x devices_per_host = {world_size}), or launch {devices} processes "
            f"(torchrun --nproc_per_node {devices})")


def check_batch_size(batch_size: int, world_size: int) -> int:
    """The per-rank batch size; :class:`ConfigError` unless ``world_size`` divides
    ``batch_size``."""
    if batch_size < world_size or batch_size % world_size:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the world size "
                          f"{world_size} (each rank takes batch_size / world_size samples); "
                          f"use a multiple of {world_size}")
    return batch_size // world_size


def local_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Samples ``[rank b, (rank + 1) b)`` of the global ``batch`` (``b = B / W``)."""
    b = check_batch_size(int(batch.labels.numel()), world_size)
    lo, hi = rank * b, (rank + 1) * b
    ids, offsets = [], []
    for table_ids, table_offsets in zip(batch.sparse.ids, batch.sparse.offsets):
        start, end = int(table_offsets[lo]), int(table_offsets[hi])
        ids.append(table_ids[start:end])
        offsets.append(table_offsets[lo:hi + 1] - start)
    return Batch(batch.dense[lo:hi], SparseBatch(tuple(ids), tuple(offsets)),
                 batch.labels[lo:hi], batch.teacher_prob[lo:hi])


def _check_ids(specs: tuple[TableSpec, ...], sparse: SparseBatch) -> None:
    """Range-check the GLOBAL batch on every rank, so that a bad id raises on all ranks
    alike instead of on the one rank that owns the row (leaving the others waiting)."""
    for spec, ids in zip(specs, sparse.ids):
        if ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= spec.num_embeddings:
                bad = low if low < 0 else high
                raise IndexError(f"table {spec.name!r}: id {bad} outside "
                                 f"0..{spec.num_embeddings - 1}")


# ---------------------------------------------------------------- lookup jobs


@dataclass(frozen=True, slots=True)
class LookupJob:
    """One pooled lookup served by rank ``owner`` for the whole global batch: rows
    ``[row_start, row_end)`` and columns ``[col_start, col_end)`` of table ``table``
    (its index in the tables spec)."""

    table: int
    sharding: Sharding
    owner: int
    row_start: int
    row_end: int
    col_start: int
    col_end: int
    host: bool = False
    """The ``host`` tier: the rows live in the owner's host memory, pooled on its device."""
    tier: Tier = Tier.HBM
    """The shard's tier; in a cached tier the owner serves it through a row cache over
    its table store (:mod:`dlrm_runtime.cached`)."""

    @property
    def cols(self) -> int:
        return self.col_end - self.col_start

    @property
    def cached(self) -> bool:
        return self.tier in CACHED_TIERS


def lookup_jobs(plan: Plan, world_size: int) -> tuple[tuple[LookupJob, ...], tuple[int, ...]]:
    """The jobs of every model-parallel table in spec order (shards in row or column
    order), and the indices of the data-parallel tables. Raises
    :class:`PlanMismatchError` for a data-parallel table without a replica on every
    rank (and, from :func:`~dlrm_runtime.sharding.placements_from_plan`, for cached
    tiers of shardings other than table-, row- and table-row-wise)."""
    specs = plan.tables_spec.tables
    placements = placements_from_plan(plan)  # checks every sharding type's conventions
    jobs: list[LookupJob] = []
    replicated: list[int] = []
    for index, spec in enumerate(specs):
        placement = placements[spec.name]
        if placement.sharding is Sharding.DATA_PARALLEL:
            holders = sorted(s.plan_device for s in placement.shards)
            if holders != list(range(world_size)):
                raise PlanMismatchError(f"table {spec.name!r}: a data_parallel table needs a "
                                        f"replica on every device 0..{world_size - 1}, got "
                                        f"{holders}")
            replicated.append(index)
            continue
        jobs.extend(LookupJob(index, placement.sharding, s.plan_device, s.row_start, s.row_end,
                              s.col_start, s.col_end, placement.host, s.tier)
                     for s in placement.shards)
    return tuple(jobs), tuple(replicated)


class ShardBag(nn.Module):
    """The weight of one row- or column-wise shard, initialised with its slice of the
    whole table's initial values (so it equals the one-process model's)."""

    def __init__(self, spec: TableSpec, job: LookupJob, device: torch.device, seed: int,
                 row_group: str | None) -> None:
        super().__init__()
        self.spec = spec
        self.job = job
        self.row_group = row_group
        full = init_table(spec, job.table, seed)
        rows, dtype = job.row_end - job.row_start, TORCH_DTYPE[spec.dtype]
        weight = host_weight(rows, job.cols, dtype) if job.host else empty_weight(rows, job.cols,
                                                                                   dtype, device)
        self.compute_device = device if job.host else None
        weight.copy_(full[job.row_start:job.row_end, job.col_start:job.col_end])
        self.weight = nn.Parameter(weight)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Shard-local ids and ``N + 1`` offsets -> pooled ``[N, cols]`` float32."""
        device = self.weight.device
        ids, starts = ids.to(device), offsets[:-1].to(device)
        return pooled_lookup(self.weight, ids, starts, self.pending, (),
                             self.compute_device).float()

    def row_block(self) -> RowBlock:
        job = self.job
        segment = Segment(self.spec.name, 0, job.row_start, job.row_end - job.row_start,
                          job.col_start, job.cols)
        return RowBlock(self.weight, self.spec.optimizer, (segment,), self.spec.embedding_dim,
                        self.row_group, pending=self.pending)


def _whole_groups(members: list[tuple[int, TableSpec]],
                  host: frozenset[int] = frozenset()) -> list[list[tuple[int, TableSpec]]]:
    """Whole tables batched per (dim, dtype, optimizer, in the ``host`` tier: index in
    ``host``), each group in :func:`~dlrm_runtime.embeddings.batch_order`."""
    groups: dict[tuple, list[tuple[int, TableSpec]]] = {}
    for index, spec in members:
        key = (spec.embedding_dim, spec.dtype, spec.optimizer, index in host)
        groups.setdefault(key, []).append((index, spec))
    return [batch_order(group) for group in groups.values()]


class DistributedEmbeddings(nn.Module):
    """This rank's part of every table, and the exchanges that serve this rank's samples.

    ``forward(sparse)`` takes this rank's ``b`` samples and returns one pooled
    ``[b, D_t]`` float32 tensor per table in spec order (``forward_stacked``: one
    ``[T, b, D]`` tensor), like :class:`~dlrm_runtime.embeddings.InMemoryEmbeddings`,
    so :class:`~dlrm_runtime.model.DLRM` uses it unchanged. Every rank must call it
    with the same ``b`` at the same time (it runs collectives).
    """

    def __init__(self, plan: Plan, rank: int, world_size: int, device: torch.device,
                 seed: int = 0, group: dist.ProcessGroup | None = None, *,
                 store_dir: str | None = None, embedding_lr: float | None = None) -> None:
        super().__init__()
        self.clock: Stopwatch | None = None
        """When set, every exchange's time is added to it (see :mod:`dlrm_runtime.timing`)."""
        self.specs = plan.tables_spec.tables
        self.rank, self.world, self.device, self.group = rank, world_size, device, group
        self.jobs, self.replicated = lookup_jobs(plan, world_size)
        jobs = self.jobs
        self.by_owner = tuple(tuple(j for j, job in enumerate(jobs) if job.owner == d)
                              for d in range(world_size))
        """Job indices served by each rank, in job order (the exchange order)."""
        self.mine = self.by_owner[rank]
        self.width = [sum(jobs[j].cols for j in owned) for owned in self.by_owner]
        """Pooled floats per sample that each rank sends to every rank."""
        self.col_offset = [0] * len(jobs)
        for owned in self.by_owner:
            at = 0
            for j in owned:
                self.col_offset[j] = at
                at += jobs[j].cols
        self.table_jobs: dict[int, list[int]] = {}
        for j, job in enumerate(jobs):
            self.table_jobs.setdefault(job.table, []).append(j)
        self.boundaries = {t: torch.tensor([jobs[j].row_start for j in js[1:]], dtype=torch.int64,
                                           device=device)
                           for t, js in self.table_jobs.items()
                           if jobs[js[0]].sharding in ROW_SPLIT and len(js) > 1}

        # column-wise tables with row-wise Adagrad: row statistics shared by the shards
        self.column_stat_groups: dict[str, dist.ProcessGroup | None] = {}
        subgroups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        row_groups: dict[int, str | None] = {}
        for t, js in self.table_jobs.items():
            spec = self.specs[t]
            if jobs[js[0]].sharding is not Sharding.COLUMN_WISE or len(js) == 1:
                row_groups[t] = None
                continue
            row_groups[t] = spec.name
            owners = tuple(sorted({jobs[j].owner for j in js}))
            if spec.optimizer is not Optimizer.ROWWISE_ADAGRAD or len(owners) == 1:
                continue
            if owners not in subgroups:  # every rank creates every subgroup, in plan order
                subgroups[owners] = (group if len(owners) == world_size
                                     else dist.new_group(list(owners)))
            if rank in owners:
                self.column_stat_groups[spec.name] = subgroups[owners]

        # this rank's jobs: whole tables batched, shards one weight each, cached ones
        # through row caches over this rank's table store
        in_memory = [j for j in self.mine if not jobs[j].cached]
        whole = [(jobs[j].table, self.specs[jobs[j].table]) for j in in_memory
                 if jobs[j].sharding is Sharding.TABLE_WISE]
        position = {jobs[j].table: k for k, j in enumerate(self.mine)
                    if jobs[j].sharding is Sharding.TABLE_WISE and not jobs[j].cached}
        host = frozenset(jobs[j].table for j in self.mine if jobs[j].host)
        members = _whole_groups(whole, host)
        self.whole = nn.ModuleList(TableBatchedBags(m, device, seed, host=m[0][0] in host)
                                   for m in members)
        self.whole_positions = [[position[index] for index, _ in m] for m in members]
        self.cached_positions = [(k, j) for k, j in enumerate(self.mine) if jobs[j].cached]
        self.cached: CachedTables | None = None
        """The cached jobs' row caches and this rank's table store (on every rank when
        any job is cached, so that every rank takes part in the checkpoint protocol)."""
        self._next_batch: SparseBatch | None = None
        if any(job.cached for job in jobs):
            from dlrm_runtime.cached import CachedTables

            placements = {name: replace(p, shards=tuple(
                replace(s, device=device) if s.plan_device == rank else s for s in p.shards))
                for name, p in placements_from_plan(plan).items()}
            self.cached = CachedTables(plan.tables_spec, placements, device, seed, store_dir,
                                       embedding_lr, devices=(rank,))
        shards = [(k, j) for k, j in enumerate(self.mine)
                  if jobs[j].sharding is not Sharding.TABLE_WISE and not jobs[j].cached]
        self.shards = nn.ModuleList(
            ShardBag(self.specs[jobs[j].table], jobs[j], device, seed, row_groups[jobs[j].table])
            for _, j in shards)
        self.shard_positions = [k for k, _ in shards]
        # data-parallel replicas: every rank, its own samples
        dp_members = _whole_groups([(t, self.specs[t]) for t in self.replicated])
        self.replicas = nn.ModuleList(TableBatchedBags(m, device, seed) for m in dp_members)
        self.same_dim = len({spec.embedding_dim for spec in self.specs}) == 1

    # ------------------------------------------------------------ forward

    def _job_inputs(self, sparse: SparseBatch, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per job: this rank's ``b`` lengths and the ids the job's owner needs."""
        out: list[Any] = [None] * len(self.jobs)
        for t, js in self.table_jobs.items():
            ids = sparse.ids[t].to(self.device)
            lengths = sparse.offsets[t].to(self.device).diff()
            boundaries = self.boundaries.get(t)
            if boundaries is None:  # whole table or column shards: every id
                for j in js:
                    out[j] = (lengths, ids)
                continue
            bags = torch.repeat_interleave(torch.arange(b, device=self.device), lengths,
                                           output_size=ids.numel())
            owner = torch.bucketize(ids, boundaries, right=True)
            for s, j in enumerate(js):
                mine = owner == s
                out[j] = (torch.bincount(bags[mine], minlength=b),
                          ids[mine] - self.jobs[j].row_start)
        return out

    def _exchange_ids(self, sparse: SparseBatch, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Input distribution: per job of this rank, its ids and ``W b + 1`` offsets over
        the global batch (rank 0's samples first)."""
        inputs = self._job_inputs(sparse, b)
        order = [j for owned in self.by_owner for j in owned]
        mine, world = len(self.mine), self.world
        lengths = all_to_all_values(torch.cat([inputs[j][0] for j in order]),
                                    [mine * b] * world, [len(o) * b for o in self.by_owner],
                                    self.group, self.clock).view(world, mine, b)
        counts = lengths.sum(2).tolist()  # [W][mine]; a sync
        ids = all_to_all_values(torch.cat([inputs[j][1] for j in order]),
                                [sum(row) for row in counts],
                                [sum(inputs[j][1].numel() for j in o) for o in self.by_owner],
                                self.group, self.clock)
        pieces = ids.split([c for row in counts for c in row])
        out = []
        for k in range(mine):
            job_ids = torch.cat([pieces[q * mine + k] for q in range(world)])
            offsets = torch.zeros(world * b + 1, dtype=torch.int64, device=self.device)
            torch.cumsum(lengths[:, k, :].reshape(-1), 0, out=offsets[1:])
            out.append((job_ids, offsets))
        return out

    def _pool_jobs(self, received: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """This rank's jobs over the global batch: ``[W b, cols]`` float32 each."""
        pooled: list[Any] = [None] * len(self.mine)
        for bags, positions in zip(self.whole, self.whole_positions):
            # TableBatchedBags rebases and range-checks ids on the CPU (a no-op move there)
            out = bags([received[k][0].cpu() for k in positions],
                       [received[k][1].cpu() for k in positions])
            for m, k in enumerate(positions):
                pooled[k] = out[m].float()
        for bag, k in zip(self.shards, self.shard_positions):
            pooled[k] = bag(*received[k])
        if self.cached_positions:
            self._cached_lookups(received, pooled)
        if self._next_batch is not None and self.cached is not None:
            # this step's rows are resident: read the next batch's misses meanwhile
            self.cached.prefetch(self._next_batch)
        self._next_batch = None
        return pooled

    def _cached_lookups(self, received: list[tuple[torch.Tensor, torch.Tensor]],
                        pooled: list[Any]) -> None:
        """The cached jobs over the global batch into ``pooled``: ``[W b, cols]``
        float32 each, their rows looked up together (one read back per device); in
        training the backward (the reverse exchange brings the gradient here) applies
        the row optimizer to the cached rows."""
        if self.cached is None:  # pragma: no cover - built whenever a job is cached
            raise ConfigError("cached job without row caches")
        from dlrm_runtime.cached import lookup_shards  # it builds on the embeddings
        owners = []
        for _, j in self.cached_positions:
            table = self.cached.table(self.jobs[j].table)
            owners.append((table, table.shard_at(self.jobs[j].row_start)))
        slots = lookup_shards([(shard, received[k][0])
                               for (k, _), (_, shard) in zip(self.cached_positions, owners)])
        for (k, _), (table, shard), found in zip(self.cached_positions, owners, slots):
            pooled[k] = table.shard_forward(shard, *received[k], found)

    def _pooled_per_job(self, sparse: SparseBatch, b: int) -> list[torch.Tensor]:
        """Every job's pooled ``[b, cols]`` for this rank's samples, in job order."""
        pooled = self._pool_jobs(self._exchange_ids(sparse, b))
        world = self.world
        if pooled:
            send = torch.cat([p.view(world, b, -1) for p in pooled], dim=2).reshape(-1)
        else:
            send = torch.zeros(0, device=self.device)
        splits = [b * w for w in self.width]
        chunks = all_to_all(send, splits, [b * self.width[self.rank]] * world,
                            self.group, self.clock).split(splits)
        views = [chunk.view(b, w) for chunk, w in zip(chunks, self.width)]
        return [views[job.owner][:, self.col_offset[j]:self.col_offset[j] + job.cols]
                for j, job in enumerate(self.jobs)]

    def forward(self, sparse: SparseBatch) -> list[torch.Tensor]:
        if len(sparse.ids) != len(self.specs):
            raise ValueError(f"the batch has ids for {len(sparse.ids)} tables, the model has "
                             f"{len(self.specs)}")
        b = sparse.batch_size
        tables: list[Any] = [None] * len(self.specs)
        if self.jobs:
            per_job = self._pooled_per_job(sparse, b)
            for t, js in self.table_jobs.items():
                pieces = [per_job[j] for j in js]
                kind = self.jobs[js[0]].sharding
                if kind is Sharding.COLUMN_WISE:
                    tables[t] = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
                else:  # whole table, or row-wise partial sums
                    total = pieces[0]
                    for piece in pieces[1:]:
                        total = total + piece
                    tables[t] = total
        for bags in self.replicas:
            out = bags([sparse.ids[i] for i in bags.indices],
                       [sparse.offsets[i] for i in bags.indices])
            for m, index in enumerate(bags.indices):
                tables[index] = out[m].to(self.device, torch.float32)
        return tables

    def forward_stacked(self, sparse: SparseBatch) -> torch.Tensor:
        """``[T, b, D]`` (needs one dim for all tables)."""
        if not self.same_dim:
            raise ValueError("forward_stacked needs every table to have the same dim")
        return torch.stack(self.forward(sparse))

    # ------------------------------------------------------------ cached tables

    @property
    def embedding_lr(self) -> float | None:
        """Learning rate of the cached jobs' fused row optimizer (None: not set)."""
        return self.cached.embedding_lr if self.cached is not None else None

    @embedding_lr.setter
    def embedding_lr(self, lr: float | None) -> None:
        if self.cached is not None:
            self.cached.embedding_lr = lr

    def prefetch(self, next_sparse: SparseBatch) -> None:
        """Announce the GLOBAL batch after the next forward's: once that forward's
        cached rows are resident, this rank's caches read the rows of ``next_sparse``
        that their shards own and lack (no exchange needed: every rank has the global
        batch)."""
        if self.cached is not None:
            self._next_batch = next_sparse

    def cache_stats(self) -> dict[str, float] | None:
        """This rank's cache counters (None without cached tables anywhere)."""
        return self.cached.stats() if self.cached is not None else None

    def close(self) -> None:
        """Stop the caches' background work and close this rank's table store."""
        if self.cached is not None:
            self.cached.close()

    # ------------------------------------------------------------ what the optimizer sees

    def row_blocks(self) -> list[RowBlock]:
        """This rank's weights: whole tables, shards, then the data-parallel replicas."""
        return ([bags.row_block() for bags in self.whole]
                + [bag.row_block() for bag in self.shards]
                + [bags.row_block() for bags in self.replicas])

    def replica_weights(self) -> set[int]:
        """``id()`` of the replica weights (identical on every rank)."""
        return {id(bags.weight) for bags in self.replicas}

    def replica_grads(self) -> list[torch.Tensor]:
        """Per replica group, its gradient as a dense ``[rows, dim + 1]`` float32 tensor,
        the last column flagging the rows this rank touched (to be all-reduced)."""
        out = []
        for bags in self.replicas:
            dense = torch.zeros(bags.weight.shape[0], bags.dim + 1, device=bags.weight.device)
            if bags.pending:
                rows, values = bags.row_block().row_grads()
                dense[:, :bags.dim].index_add_(0, rows, values.float())
                dense[:, bags.dim].index_fill_(0, rows, 1.0)
            out.append(dense)
        return out

    def set_replica_grads(self, summed: list[torch.Tensor]) -> None:
        """Replace each replica's gradient with the all-reduced one: every rank then
        updates the rows any rank touched, with the gradient of the whole batch."""
        for bags, dense in zip(self.replicas, summed):
            rows = torch.nonzero(dense[:, bags.dim] > 0).squeeze(1)
            bags.pending.clear()
            if rows.numel():
                offsets = torch.arange(rows.numel(), device=rows.device)
                bags.pending.append((rows, offsets, dense[rows, :bags.dim]))


class DistributedRowOptimizer(RowOptimizer):
    """:class:`RowOptimizer` whose row-wise Adagrad on a column-wise table split over
    several ranks takes the mean of squared gradients over the FULL row: the shards'
    per-row sums of squares are all-reduced among the ranks holding the table's
    columns (each holder sees the same rows: every column shard receives every id)."""

    column_stat_groups: dict[str, dist.ProcessGroup | None]

    @classmethod
    def for_embeddings(cls, embeddings: DistributedEmbeddings, lr: float) -> DistributedRowOptimizer:
        self = cls.for_blocks(embeddings.row_blocks(), lr)
        self.column_stat_groups = dict(embeddings.column_stat_groups)
        return self  # type: ignore[return-value]

    @torch.no_grad()
    def step(self) -> None:
        for name, group in self.column_stat_groups.items():
            members = [i for i, block in enumerate(self.blocks) if block.row_group == name]
            grads = [self.blocks[i].sparse_grad() for i in members]
            total = grads[0].values().float().pow(2).sum(dim=1)
            for grad in grads[1:]:
                total = total + grad.values().float().pow(2).sum(dim=1)
            dist.all_reduce(total, group=group)
            mean = total / self.blocks[members[0]].full_dim
            for i, grad in zip(members, grads):
                self._adagrad(i, grad.indices()[0], grad.values().float(), mean)
                block = self.blocks[i]
                block.weight.grad = None
                if block.pending is not None:
                    block.pending.clear()  # done: the one-process step skips it
        super().step()


# ---------------------------------------------------------------- the training step


class DistributedTrainer:
    """The training step of one rank, with :class:`~dlrm_runtime.train.Trainer`'s
    interface: ``step(batch)`` takes the GLOBAL batch (the same on every rank), trains
    on this rank's slice and returns the global mean loss (the same on every rank).

    Built inside an initialised process group (see
    :func:`~dlrm_runtime.collectives.init_from_env`); raises
    :class:`PlanMismatchError` when the plan's device count is not the world size and
    :class:`ConfigError` when the world size does not divide ``config.batch_size``.
    """

    def __init__(self, plan: Plan, model_config: ModelConfig, config: TrainConfig,
                 info: ProcessGroupInfo | None = None) -> None:
        config.check()
        info = info or process_group_info()
        check_world_size(plan, info.world_size)
        check_batch_size(config.batch_size, info.world_size)
        self.plan = plan
        self.config = config
        self.info = info
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        self.embeddings = DistributedEmbeddings(plan, info.rank, info.world_size, info.device,
                                                config.seed, store_dir=config.store_dir,
                                                embedding_lr=config.embedding_lr)
        dims = [t.embedding_dim for t in plan.tables_spec.tables]
        self.model = DLRM(model_config, self.embeddings, dims, config.seed).dense_to(info.device)
        self.dense_params = self.model.dense_parameters()
        self.dense_opt = _dense_optimizer(config.dense_optimizer, self.dense_params, config.lr)
        self.row_opt = DistributedRowOptimizer.for_embeddings(self.embeddings, config.embedding_lr)

    def step(self, batch: Batch, timer: PhaseTimer | None = None) -> float:
        """One step on this rank's slice of the global ``batch``; one all-reduce of
        every dense gradient and the loss; returns the global mean loss. With
        ``timer``, each phase's time on this rank is added to it, the exchanges and
        the all-reduce counted as communication."""
        _check_ids(self.plan.tables_spec.tables, batch.sparse)
        local = local_batch(batch, self.rank, self.world)
        if timer is None:
            logits = self.model(local.dense.to(self.device), local.sparse)
            value = self._backward(logits, local)
            self.dense_opt.step()
            self.row_opt.step()
            return value
        clock = self.embeddings.clock = Stopwatch()
        cached, updates = self.embeddings.cached, Stopwatch()
        if cached is not None:  # cached jobs update inside the backward
            cached.time_updates(updates)
        try:
            with timer.phase("lookup"):
                pooled = self.model.lookup(local.sparse)
            timer.move("lookup", "communication", clock.seconds)
            before = clock.seconds
            with timer.phase("dense"):
                logits = self.model.dense_forward(local.dense.to(self.device), pooled)
                value = self._backward(logits, local, clock)
                self.dense_opt.step()
            timer.move("dense", "communication", clock.seconds - before)
            timer.move("dense", "update", updates.seconds)
            with timer.phase("update"):
                self.row_opt.step()
        finally:
            self.embeddings.clock = None
            if cached is not None:
                cached.time_updates(None)
        timer.step_done()
        return value

    def _backward(self, logits: torch.Tensor, local: Batch, clock: Stopwatch | None = None) -> float:
        loss = F.binary_cross_entropy_with_logits(logits, local.labels.to(self.device))
        for param in self.dense_params:
            param.grad = None
        self.row_opt.zero_grad()
        # gradients of local_mean / W, summed over ranks, are those of the global mean
        (loss / self.world).backward()
        if clock is None:
            return self._all_reduce(loss.detach())
        with clock.timing():
            return self._all_reduce(loss.detach())

    def _all_reduce(self, loss: torch.Tensor) -> float:
        """Sum the MLP gradients, the replicas' gradients and the loss over the ranks in
        one flat all-reduce; write them back; return the global mean loss."""
        replicas = self.embeddings.replica_grads()
        parts = [p.grad.reshape(-1) for p in self.dense_params]  # type: ignore[union-attr]
        parts += [r.reshape(-1) for r in replicas]
        parts.append(loss.float().reshape(1))
        flat = torch.cat(parts)
        dist.all_reduce(flat)  # the step's one sync point besides the exchanges
        at = 0
        for param in self.dense_params:
            n = param.numel()
            param.grad = flat[at:at + n].view_as(param)
            at += n
        summed = []
        for r in replicas:
            summed.append(flat[at:at + r.numel()].view_as(r))
            at += r.numel()
        self.embeddings.set_replica_grads(summed)
        return float(flat[at]) / self.world

    # ------------------------------------------------------------ checkpoints

    def gather_tables(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Every table whole with its optimizer state, on rank 0 (None elsewhere), as
        :func:`dlrm_runtime.checkpoint.export_tables` lays it out. A collective."""
        # replicas are identical on every rank: rank 0's copy
        skip = self.embeddings.replica_weights() if self.rank != 0 else set()
        pieces = table_pieces(self.row_opt, skip)
        gathered: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(pieces, gathered, dst=0)
        if gathered is None:
            return None
        return assemble_tables(self.plan.tables_spec,
                               (piece for rank_pieces in gathered for piece in rank_pieces))

    def state(self, step: int, run_fingerprint: dict, recent: list[float]) -> dict | None:
        """On rank 0, what :meth:`dlrm_runtime.train.Trainer.state` returns for the same
        model (so either runtime resumes it); None on the other ranks. A collective."""
        tables = self.gather_tables()
        if self.rank != 0:
            return None
        return checkpoint_state(self, tables, step, run_fingerprint, recent)

    def restore(self, state: dict, path: Path) -> None:
        """Load a checkpoint (fingerprint already checked) into this rank's part; this
        config's learning rates apply from here on."""
        restore_state(self, state, path)


# ---------------------------------------------------------------- evaluation and the loop


@torch.no_grad()
def evaluate_distributed(trainer: DistributedTrainer, data: Any, batches: int,
                         batch_size: int) -> EvalResult:
    """:func:`dlrm_runtime.train.evaluate` over the ranks: each rank scores its slice,
    the logits are all-gathered, and every rank computes the same result."""
    model, world, device = trainer.model, trainer.world, trainer.device
    model.eval()
    labels, probs, teacher, losses = [], [], [], []
    try:
        for i in range(batches):
            batch = data.batch(VALIDATION_OFFSET + i, batch_size)
            _check_ids(trainer.plan.tables_spec.tables, batch.sparse)
            local = local_batch(batch, trainer.rank, world)
            mine = model(local.dense.to(device), local.sparse).float().contiguous()
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            logits = torch.cat(gathered).cpu()
            losses.append(float(F.binary_cross_entropy_with_logits(logits, batch.labels)))
            labels.append(batch.labels.numpy())
            probs.append(torch.sigmoid(logits).numpy())
            teacher.append(batch.teacher_prob.numpy())
    finally:
        model.train()
    y, p, q = np.concatenate(labels), np.concatenate(probs), np.concatenate(teacher)
    teacher_auc = None if np.isnan(q).any() else roc_auc(y, q)
    return EvalResult(float(np.mean(losses)), roc_auc(y, p), accuracy(y, p), teacher_auc,  # type: ignore[arg-type]
                      y.size)


def train_distributed(
    plan: Plan,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    data: ClickSource | None = None,
    progress: ProgressFactory | None = None,
    metrics_log: IO[str] | None = None,
) -> TrainResult:
    """:func:`dlrm_runtime.train` on every rank of the initialised process group: the
    same steps, losses, checkpoints and validation as one process (to float
    tolerance). Call it on every rank with the same arguments; only rank 0 reports to
    ``progress`` and ``metrics_log`` and writes checkpoints. ``samples_per_s`` counts
    the global batch. Checkpoints gather every table to rank 0 in the one-process
    format (a run resumes with any process count); every rank reads the checkpoint it
    resumes from, so ``checkpoint_dir`` must be visible to all ranks.

    Raises :class:`PlanMismatchError` when the plan's device count is not the world
    size, :class:`ConfigError` when the world size does not divide the batch size, and
    otherwise what :func:`dlrm_runtime.train` raises, on every rank alike.
    """
    config.check()
    with torch_settings(config):
        return _train_distributed(plan, model_config, config, data, progress, metrics_log)


def _train_distributed(plan: Plan, model_config: ModelConfig, config: TrainConfig,
                       data: ClickSource | None, progress: ProgressFactory | None,
                       metrics_log: IO[str] | None) -> TrainResult:
    torch.manual_seed(config.seed)
    trainer = DistributedTrainer(plan, model_config, config)
    try:
        data = data_for(plan, model_config, config, data)
        return run_loop(
            plan, model_config, config, data, trainer, Peers(trainer.rank, trainer.world),
            save_state=trainer.state,
            validate=lambda: evaluate_distributed(trainer, data, config.eval_batches,
                                                  config.batch_size),
            devices=(trainer.rank,), communication=True, progress=progress,
            metrics_log=metrics_log, timing_every=None)
    finally:
        trainer.embeddings.close()  # cached tables: the store rolls back to its checkpoint
