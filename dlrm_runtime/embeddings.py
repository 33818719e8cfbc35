"""Embedding tables built from a plan, held in device memory (CPU when no GPU)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_runtime.errors import PlanMismatchError
from dlrm_runtime.sparse import SparseBatch
from planner import DType, Plan, Sharding, TablesSpec, Tier

TORCH_DTYPE = {DType.FP32: torch.float32, DType.FP16: torch.float16, DType.BF16: torch.bfloat16}


def device_for(rank: int) -> torch.device:
    """The torch device standing for plan device ``rank`` in this process: that GPU
    when present, else the CPU."""
    if torch.cuda.is_available() and rank < torch.cuda.device_count():
        return torch.device("cuda", rank)
    return torch.device("cpu")


class InMemoryEmbeddings(nn.Module):
    """One sum-pooled embedding bag per table, each whole on one device.

    Weights are initialised as in the paper's reference implementation, uniform in
    +-sqrt(1/rows), from a generator seeded per table so results do not depend on
    placement.
    """

    def __init__(self, tables: TablesSpec, devices: dict[str, torch.device],
                 output_device: torch.device, seed: int = 0) -> None:
        super().__init__()
        self.specs = tables.tables
        self.output_device = output_device
        self.weights = nn.ParameterList()
        for index, spec in enumerate(self.specs):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            bound = math.sqrt(1.0 / spec.num_embeddings)
            weight = torch.empty(spec.num_embeddings, spec.embedding_dim, dtype=torch.float32)
            weight.uniform_(-bound, bound, generator=generator)
            weight = weight.to(device=devices[spec.name], dtype=TORCH_DTYPE[spec.dtype])
            self.weights.append(nn.Parameter(weight))

    def weight(self, name: str) -> nn.Parameter:
        """The weight of table ``name`` ([rows, dim])."""
        for spec, weight in zip(self.specs, self.weights):
            if spec.name == name:
                return weight
        raise KeyError(name)

    def forward(self, sparse: SparseBatch) -> list[torch.Tensor]:
        pooled = []
        for spec, weight, ids, offsets in zip(self.specs, self.weights, sparse.ids, sparse.offsets):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= spec.num_embeddings):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise IndexError(f"table {spec.name!r}: id {bad} outside 0..{spec.num_embeddings - 1}")
            out = F.embedding_bag(ids.to(weight.device), weight, offsets.to(weight.device),
                                  mode="sum", sparse=True, include_last_offset=True)
            pooled.append(out.to(self.output_device, torch.float32))  # [B, D_t]
        return pooled


def embeddings_from_plan(plan: Plan, output_device: torch.device, seed: int = 0) -> InMemoryEmbeddings:
    """Build the tables as the plan places them.

    This runtime executes table-wise plans with every shard in HBM; other sharding
    types and cache tiers raise :class:`PlanMismatchError` naming the table.
    """
    devices = {}
    for table in plan.tables:
        if table.sharding is not Sharding.TABLE_WISE:
            raise PlanMismatchError(f"table {table.name!r}: sharding {table.sharding.value!r} is "
                                    f"not supported by this runtime yet; plan it table-wise")
        shard = table.shards[0]
        if shard.tier is not Tier.HBM:
            raise PlanMismatchError(f"table {table.name!r}: tier {shard.tier.value!r} is not "
                                    f"supported by this runtime yet; plan it in HBM")
        devices[table.name] = device_for(shard.device)
    return InMemoryEmbeddings(plan.tables_spec, devices, output_device, seed)


def embeddings_in_memory(tables: TablesSpec, seed: int = 0) -> InMemoryEmbeddings:
    """Every table on the CPU, no plan needed."""
    cpu = torch.device("cpu")
    return InMemoryEmbeddings(tables, {t.name: cpu for t in tables.tables}, cpu, seed)
