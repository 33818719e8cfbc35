"""Whole tables (table-wise, or one copy of a data-parallel table) of one device, dim,
dtype and optimizer batched in one weight and pooled by one ``embedding_bag`` call, like
FBGEMM's table-batched embedding bags; in device memory or (the ``host`` tier) in host
memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlrm_runtime.embeddings.base import (
    TORCH_DTYPE,
    RowBlock,
    Segment,
    TableSpec,
    UniformRun,
    check_range,
    fill_init,
)
from dlrm_runtime.embeddings.lookup import pooled_lookup, uniform_runs
from dlrm_runtime.embeddings.memory import empty_weight, host_weight


def batch_order(members: Sequence[tuple[int, TableSpec]]) -> list[tuple[int, TableSpec]]:
    """Whole tables of one batched group ordered by ids per sample (then spec order):
    tables of one bag length side by side make one :class:`UniformRun` each."""
    return sorted(members, key=lambda member: (round(member[1].pooling_factor), member[0]))


class TableBatchedBags(nn.Module):
    """Whole tables of one device, dim, dtype and optimizer in one ``[sum rows, dim]``
    weight; one ``embedding_bag`` call pools every table of the group.

    Table ``k`` of the group owns weight rows ``[bases[k], bases[k] + rows_k)``; its
    ids are rebased by ``bases[k]`` and its bags follow the previous table's bags.
    Ids are range-checked once per batch for the whole group (one reduction over the
    concatenated ids); the offending table is looked up only on failure.
    """

    def __init__(self, tables: Sequence[tuple[int, TableSpec]], device: torch.device,
                 seed: int = 0, *, host: bool = False) -> None:
        super().__init__()
        specs = [spec for _, spec in tables]
        first = specs[0]
        if any((s.embedding_dim, s.dtype, s.optimizer) != (first.embedding_dim, first.dtype,
                                                           first.optimizer) for s in specs):
            raise ValueError("a table-batched group needs one dim, dtype and optimizer")
        self.indices = [index for index, _ in tables]
        """Positions of the group's tables in the tables spec."""
        self.specs = specs
        self.dim = first.embedding_dim
        self.optimizer = first.optimizer
        rows = [s.num_embeddings for s in specs]
        bases = [sum(rows[:k]) for k in range(len(rows))]
        self.bases_list = bases
        self.bases = torch.tensor(bases, dtype=torch.int64)
        self.last_rows = torch.tensor(rows, dtype=torch.int64) - 1
        self.compute_device = device if host else None
        """Host tier: the weight lives in host memory and is pooled on this device."""
        dtype = TORCH_DTYPE[first.dtype]
        weight = (host_weight(sum(rows), self.dim, dtype) if host
                  else empty_weight(sum(rows), self.dim, dtype, device))
        for (index, spec), base in zip(tables, bases):
            fill_init(weight[base:base + spec.num_embeddings], spec, index, seed)
        self.weight = nn.Parameter(weight)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def device(self) -> torch.device:
        """Where the group is pooled (its weight's device, but for the host tier)."""
        return self.compute_device or self.weight.device

    def table_weight(self, k: int) -> torch.Tensor:
        """Table ``k`` of the group: a view of the shared weight (writes go through)."""
        base = self.bases_list[k]
        return self.weight.detach()[base:base + self.specs[k].num_embeddings]

    def forward(self, ids: Sequence[torch.Tensor], offsets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per table, ``ids[k]`` and ``offsets[k]`` (``B + 1`` entries, first 0, last
        ``len(ids[k])``) -> pooled ``[T_g, B, dim]`` on the group's device."""
        device = self.weight.device  # ids go where the weight is (host tier: the host)
        offs = torch.stack(list(offsets))  # [T_g, B + 1]
        batch = offs.shape[1] - 1
        # first and last offset of every table, in one small read-back
        edges = offs[:, ::batch].tolist() if batch > 0 else [[v, v] for v in offs[:, 0].tolist()]
        if edges != [[0, t.numel()] for t in ids]:
            raise ValueError("every table's offsets must start at 0 and end at its number of ids")
        if len(self.specs) == 1:
            check_range(self.specs[0], ids[0])
            return self._lookup(ids[0].to(device), offsets[0][:-1].to(device)).unsqueeze(0)
        flat = torch.cat(list(ids))
        counts = offs[:, -1]
        n = flat.numel()
        if n:
            if all(edge[1] == edges[0][1] for edge in edges):  # as many ids in every table
                view = flat.view(len(ids), -1)
                last, bases = self.last_rows.unsqueeze(1), self.bases.unsqueeze(1)
            else:
                view = flat
                last = self.last_rows.repeat_interleave(counts, output_size=n)
                bases = self.bases.repeat_interleave(counts, output_size=n)
            # 0 <= id <= last  <=>  the sign bit of (id | (last - id)) is clear
            if int(torch.bitwise_or(view, last - view).min()) < 0:
                for spec, table_ids in zip(self.specs, ids):
                    check_range(spec, table_ids)
            flat = (view + bases).view(-1)
        starts = torch.cumsum(counts, 0) - counts
        bag_offsets = (offs[:, :-1] + starts.unsqueeze(1)).reshape(-1)
        runs = uniform_runs(offs, [edge[1] for edge in edges]) if n else ()
        out = self._lookup(flat.to(device), bag_offsets.to(device), runs)
        return out.view(len(self.specs), -1, self.dim)

    def _lookup(self, ids: torch.Tensor, bag_offsets: torch.Tensor,
                runs: tuple[UniformRun, ...] = ()) -> torch.Tensor:
        return pooled_lookup(self.weight, ids, bag_offsets, self.pending, runs,
                             self.compute_device)

    def row_block(self) -> RowBlock:
        segments = tuple(Segment(spec.name, base, 0, spec.num_embeddings, 0, self.dim)
                         for spec, base in zip(self.specs, self.bases_list))
        return RowBlock(self.weight, self.optimizer, segments, self.dim, pending=self.pending)

