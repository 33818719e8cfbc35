"""This rank's part of every table (:class:`DistributedEmbeddings`): its lookup jobs'
weights, the exchanges of ids and pooled embeddings that serve this rank's samples,
the data-parallel replicas; and the row optimizer that shares row-wise Adagrad
statistics across column shards on several ranks (:class:`DistributedRowOptimizer`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dlrm_runtime.distributed.collectives import all_to_all, all_to_all_values
from dlrm_runtime.distributed.jobs import LookupJob, lookup_jobs
from dlrm_runtime.embeddings import (
    TORCH_DTYPE,
    CachedTables,
    CachedTablesOwner,
    RowBlock,
    RowOptimizer,
    Segment,
    SparseBatch,
    TableBatchedBags,
    TablePlacement,
    batch_order,
    empty_weight,
    host_weight,
    init_table,
    lookup_shards,
    placements_from_plan,
    pooled_lookup,
)
from dlrm_runtime.errors import ConfigError
from dlrm_runtime.measure.timing import Stopwatch
from planner import Optimizer, Plan, Sharding, TableSpec

ROW_SPLIT = (Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE)

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
        shard, dtype = job.shard, TORCH_DTYPE[spec.dtype]
        weight = (host_weight(shard.rows, shard.cols, dtype) if job.host
                  else empty_weight(shard.rows, shard.cols, dtype, device))
        self.compute_device = device if job.host else None
        weight.copy_(full[shard.row_start:shard.row_end, shard.col_start:shard.col_end])
        self.weight = nn.Parameter(weight)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Shard-local ids and ``N + 1`` offsets -> pooled ``[N, cols]`` float32."""
        device = self.weight.device
        ids, starts = ids.to(device), offsets[:-1].to(device)
        return pooled_lookup(self.weight, ids, starts, self.pending, (),
                             self.compute_device).float()

    def row_block(self) -> RowBlock:
        shard = self.job.shard
        segment = Segment(self.spec.name, 0, shard.row_start, shard.rows, shard.col_start,
                          shard.cols)
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


class DistributedEmbeddings(CachedTablesOwner, nn.Module):
    """This rank's part of every table, and the exchanges that serve this rank's samples.

    ``forward(sparse)`` takes this rank's ``b`` samples and returns one pooled
    ``[b, D_t]`` float32 tensor per table in spec order (``forward_stacked``: one
    ``[T, b, D]`` tensor), like :class:`~dlrm_runtime.embeddings.InMemoryEmbeddings`,
    so :class:`~dlrm_runtime.model.DLRM` uses it unchanged. Every rank must call it
    with the same ``b`` at the same time (it runs collectives).
    """

    def __init__(self, plan: Plan, rank: int, world_size: int, device: torch.device,
                 seed: int = 0, group: dist.ProcessGroup | None = None, *,
                 store_dir: str | None = None, embedding_lr: float | None = None,
                 placements: dict[str, TablePlacement] | None = None) -> None:
        super().__init__()
        placements = placements_from_plan(plan) if placements is None else placements
        self.clock: Stopwatch | None = None
        """When set, every exchange's time is added to it (see :mod:`dlrm_runtime.measure.timing`)."""
        self.specs = plan.tables_spec.tables
        self.rank, self.world, self.device, self.group = rank, world_size, device, group
        self.jobs, self.replicated = lookup_jobs(self.specs, placements, world_size)
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
        self.boundaries = {t: torch.tensor([jobs[j].shard.row_start for j in js[1:]], dtype=torch.int64,
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
            mine = {name: replace(p, shards=tuple(
                replace(s, device=device) if s.plan_device == rank else s for s in p.shards))
                for name, p in placements.items()}
            self.cached = CachedTables.open(plan.tables_spec, mine, device, seed, store_dir,
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
                          ids[mine] - self.jobs[j].shard.row_start)
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
        self._resolved()  # this step's rows are resident: read the next batch's misses
        return pooled

    def _cached_lookups(self, received: list[tuple[torch.Tensor, torch.Tensor]],
                        pooled: list[Any]) -> None:
        """The cached jobs over the global batch into ``pooled``: ``[W b, cols]``
        float32 each, their rows looked up together (one read back per device); in
        training the backward (the reverse exchange brings the gradient here) applies
        the row optimizer to the cached rows."""
        if self.cached is None:  # pragma: no cover - built whenever a job is cached
            raise ConfigError("cached job without row caches")
        owners = []
        for _, j in self.cached_positions:
            table = self.cached.table(self.jobs[j].table)
            owners.append((table, table.shard_at(self.jobs[j].shard.row_start)))
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


