"""One table split row-wise (``row_wise``, ``table_row_wise``) or column-wise
(``column_wise``) in one process; in device memory or (the ``host`` tier) host memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_runtime.embeddings.base import (
    TORCH_DTYPE,
    RowBlock,
    Segment,
    TableSpec,
    bag_of_ids,
    check_range,
    fill_init,
    init_table,
)
from dlrm_runtime.embeddings.lookup import pooled_lookup
from dlrm_runtime.embeddings.memory import empty_weight, host_weight
from dlrm_runtime.embeddings.placement import TablePlacement
from planner import Sharding


class ShardedTable(nn.Module):
    """One table split row-wise (``row_wise``, ``table_row_wise``) or column-wise
    (``column_wise``).

    Row-wise: the shards that live on one torch device share ONE weight (their rows
    concatenated in row order; one :class:`RowBlock` with a :class:`Segment` per
    shard), like :class:`TableBatchedBags`. The pooled sum of a bag is the sum of its
    shards' partial sums, so when every shard lives on one device (always, in one
    process without GPUs) the table is pooled by a single ``embedding_bag`` over the
    unrouted ids: no routing, no partial sums to add. With shards on several devices,
    ids are routed once (one ``bucketize``, one stable sort by device, one
    ``bincount`` for every device's bag offsets), each device pools the ids it owns
    per sample (an empty bag pools to zero) and the partial sums are added on the
    output device. Gradients are kept pooled (:class:`PooledLookup`) for the row
    optimizer. ``merge_devices=False`` keeps one weight per plan device instead (as
    on a machine with a GPU per plan device; on the CPU it exercises the routed path).

    Column-wise: one parameter per shard; every shard pools every id over its
    columns; the outputs are concatenated in column order.

    Every weight is looked up every batch, even with no ids, so each gets a (possibly
    empty) gradient and its optimizer step count stays the table's.
    """

    def __init__(self, spec: TableSpec, index: int, placement: TablePlacement,
                 output_device: torch.device, seed: int = 0, *,
                 merge_devices: bool = True) -> None:
        super().__init__()
        if placement.sharding not in (Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE,
                                      Sharding.COLUMN_WISE):
            raise ValueError(f"ShardedTable serves row- and column-wise tables, "
                             f"not {placement.sharding.value}")
        self.spec = spec
        self.index = index
        self.placement = placement
        self.output_device = output_device
        self.column_wise = placement.sharding is Sharding.COLUMN_WISE
        self.host = placement.host
        """Host tier: every weight lives in host memory and is pooled on its shard's device."""
        shards = placement.shards
        dtype = TORCH_DTYPE[spec.dtype]

        def allocate(rows: int, cols: int, device: torch.device) -> torch.Tensor:
            return host_weight(rows, cols, dtype) if self.host else empty_weight(rows, cols, dtype,
                                                                                  device)

        self.parts = nn.ParameterList()
        """Column-wise: one weight per shard. Row-wise: one weight per device group."""
        self.pending: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        """Per weight, its :class:`PooledLookup` gradients since the last ``zero_grad``
        (row-wise and host-tier column-wise weights; in-device column shards get
        autograd's sparse gradient)."""
        if self.column_wise:
            full = init_table(spec, index, seed)
            for shard in shards:
                weight = allocate(shard.rows, shard.cols, shard.device)
                weight.copy_(full[shard.row_start:shard.row_end, shard.col_start:shard.col_end])
                self.parts.append(nn.Parameter(weight))
                self.pending.append([])
            return
        # ---- row-wise: group the shards by device, one weight per group
        keys: dict[object, int] = {}
        self.shard_group: list[int] = []
        """The group (weight) of every shard."""
        self.shard_base: list[int] = []
        """The first row of every shard in its group's weight."""
        group_rows: list[int] = []
        for shard in shards:
            key = str(shard.device) if merge_devices else shard.plan_device
            g = keys.setdefault(key, len(keys))
            if g == len(group_rows):
                group_rows.append(0)
            self.shard_group.append(g)
            self.shard_base.append(group_rows[g])
            group_rows[g] += shard.rows
        self.group_devices = [shards[self.shard_group.index(g)].device
                              for g in range(len(group_rows))]
        # a single group whose rows are the table's rows: ids need no routing
        self.unrouted = len(group_rows) == 1 and all(
            base == shard.row_start for shard, base in zip(shards, self.shard_base))
        weights = [allocate(rows, spec.embedding_dim, device)
                   for rows, device in zip(group_rows, self.group_devices)]
        if self.unrouted:
            fill_init(weights[0], spec, index, seed)
        else:
            full = init_table(spec, index, seed)
            for shard, g, base in zip(shards, self.shard_group, self.shard_base):
                weights[g][base:base + shard.rows].copy_(full[shard.row_start:shard.row_end])
        for weight in weights:
            self.parts.append(nn.Parameter(weight))
            self.pending.append([])
        # first row of every shard but the first: bucketize gives the owning shard
        self.boundaries = torch.tensor([s.row_start for s in shards[1:]], dtype=torch.int64)
        self.shard_group_t = torch.tensor(self.shard_group, dtype=torch.int64)
        self.shard_shift_t = torch.tensor([base - s.row_start
                                           for s, base in zip(shards, self.shard_base)],
                                          dtype=torch.int64)

    @property
    def weights(self) -> list[torch.Tensor]:
        """Every shard's weight, in shard order: the parameters (column-wise) or views
        of the group weights holding them (row-wise; no autograd history, writes go
        through)."""
        if self.column_wise:
            return list(self.parts)
        return [self.parts[g].detach()[base:base + shard.rows]
                for shard, g, base in zip(self.placement.shards, self.shard_group,
                                          self.shard_base)]

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``ids``, ``offsets`` (``B + 1``) -> pooled ``[B, dim]`` float32 on the
        output device."""
        check_range(self.spec, ids)
        if self.column_wise and self.host:
            outs = [pooled_lookup(w, ids.to(w.device), offsets[:-1].to(w.device), pending, (),
                                  shard.device)
                    for w, pending, shard in zip(self.parts, self.pending, self.placement.shards)]
            return torch.cat([o.to(self.output_device, torch.float32) for o in outs], dim=1)
        if self.column_wise:
            outs = [F.embedding_bag(ids.to(w.device), w, offsets.to(w.device), mode="sum",
                                    sparse=True, include_last_offset=True)
                    for w in self.parts]
            return torch.cat([o.to(self.output_device, torch.float32) for o in outs], dim=1)
        if self.unrouted:
            return self._lookup(0, ids, offsets[:-1]).to(self.output_device, torch.float32)
        batch = offsets.numel() - 1
        n = ids.numel()
        device = ids.device
        groups = len(self.parts)
        owner = torch.bucketize(ids, self.boundaries.to(device), right=True)
        local = ids + self.shard_shift_t.to(device)[owner]
        group = self.shard_group_t.to(device)[owner]
        bags = bag_of_ids(offsets[:-1], n)
        # ids per (group, bag); the ids of a group stay in bag order (stable sort)
        counts = torch.bincount(group * batch + bags, minlength=groups * batch).view(groups, batch)
        starts = torch.cumsum(counts, 1) - counts  # [groups, batch]
        local = local[torch.sort(group, stable=True).indices]
        sizes = counts.sum(1).tolist()
        total = None
        for g, group_ids in enumerate(torch.split(local, sizes)):
            out = self._lookup(g, group_ids, starts[g]).to(self.output_device, torch.float32)
            total = out if total is None else total.add_(out)  # no saved tensor is changed
        assert total is not None
        return total

    def _lookup(self, g: int, ids: torch.Tensor, bag_offsets: torch.Tensor) -> torch.Tensor:
        """Group ``g``'s sum-pooled lookup of its (local) ``ids``, bags starting at
        ``bag_offsets``, on the group's device."""
        weight = self.parts[g]
        ids, bag_offsets = ids.to(weight.device), bag_offsets.to(weight.device)
        return pooled_lookup(weight, ids, bag_offsets, self.pending[g], (),
                             self.group_devices[g] if self.host else None)

    def full_weight(self) -> torch.Tensor:
        """The whole table assembled from its shards: a copy on the output device."""
        dtype = TORCH_DTYPE[self.spec.dtype]
        full = torch.empty(self.spec.num_embeddings, self.spec.embedding_dim, dtype=dtype,
                           device=self.output_device)
        for shard, weight in zip(self.placement.shards, self.weights):
            full[shard.row_start:shard.row_end, shard.col_start:shard.col_end] = weight.detach()
        return full

    def row_blocks(self) -> list[RowBlock]:
        shards = self.placement.shards
        if self.column_wise:
            group = self.spec.name if len(self.parts) > 1 else None
            return [RowBlock(weight, self.spec.optimizer,
                             (Segment(self.spec.name, 0, s.row_start, s.rows, s.col_start, s.cols),),
                             self.spec.embedding_dim, group,
                             pending=pending if self.host else None)
                    for s, weight, pending in zip(shards, self.parts, self.pending)]
        blocks = []
        for g, weight in enumerate(self.parts):
            segments = tuple(Segment(self.spec.name, base, s.row_start, s.rows, 0, s.cols)
                             for s, sg, base in zip(shards, self.shard_group, self.shard_base)
                             if sg == g)
            blocks.append(RowBlock(weight, self.spec.optimizer, segments, self.spec.embedding_dim,
                                   pending=self.pending[g]))
        return blocks

