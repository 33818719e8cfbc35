"""How a plan's tables are served across processes: this rank's slice of a global
batch (:func:`local_batch`) and the *lookup jobs* (:class:`LookupJob`), one per
model-parallel shard, each run by the rank that owns the shard for the whole global
batch (see :mod:`dlrm_runtime.distributed`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlrm_runtime.data.batches import Batch
from dlrm_runtime.embeddings import CACHED_TIERS, ShardPlacement, SparseBatch, TablePlacement
from dlrm_runtime.errors import PlanMismatchError
from dlrm_runtime.prepare import check_batch_size
from planner import Sharding, TableSpec, Tier


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


def check_ids(specs: tuple[TableSpec, ...], sparse: SparseBatch) -> None:
    """Range-check the GLOBAL batch on every rank, so that a bad id raises on all ranks
    alike instead of on the one rank that owns the row (leaving the others waiting)."""
    for spec, ids in zip(specs, sparse.ids):
        if ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= spec.num_embeddings:
                bad = low if low < 0 else high
                raise IndexError(f"table {spec.name!r}: id {bad} outside "
                                 f"0..{spec.num_embeddings - 1}")



@dataclass(frozen=True, slots=True)
class LookupJob:
    """One pooled lookup served by the rank owning ``shard`` for the whole global batch:
    the shard (rows, columns, tier, plan device) of table ``table`` (its index in the
    tables spec), split as ``sharding`` says."""

    table: int
    sharding: Sharding
    shard: ShardPlacement

    @property
    def owner(self) -> int:
        return self.shard.plan_device

    @property
    def cols(self) -> int:
        return self.shard.cols

    @property
    def host(self) -> bool:
        """The ``host`` tier: the rows live in the owner's host memory, pooled on its device."""
        return self.shard.tier is Tier.HOST

    @property
    def cached(self) -> bool:
        """In a cached tier the owner serves it through a row cache over its table store
        (:mod:`dlrm_runtime.embeddings.cached`)."""
        return self.shard.tier in CACHED_TIERS


def lookup_jobs(specs: tuple[TableSpec, ...], placements: dict[str, TablePlacement],
                world_size: int) -> tuple[tuple[LookupJob, ...], tuple[int, ...]]:
    """The jobs of every model-parallel table in spec order (shards in row or column
    order), and the indices of the data-parallel tables. Raises
    :class:`PlanMismatchError` for a data-parallel table without a replica on every
    rank."""
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
        jobs.extend(LookupJob(index, placement.sharding, s) for s in placement.shards)
    return tuple(jobs), tuple(replicated)
