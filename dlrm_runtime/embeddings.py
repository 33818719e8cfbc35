"""Embedding tables built from a plan, held in device memory (CPU when no GPU).

Two kinds of modules serve the tables, both sum-pooled bags:

- :class:`TableBatchedBags` holds whole tables (table-wise, or data-parallel: one copy)
  that share a device, dim, dtype and optimizer in ONE weight, rows concatenated, and
  looks all of them up with one ``embedding_bag`` call (a "table-batched" embedding
  bag, like FBGEMM's TBE): one kernel and one sparse gradient per group instead of
  one per table;
- :class:`ShardedTable` holds one row-, table-row- or column-wise table. Row shards
  that share a torch device share one weight (one kernel pools them; ids are routed
  and partial sums added only across devices); column shards are one parameter each,
  their pooled outputs concatenated.

Tables in a cached tier (``dram_cache``, ``store_cache``) are
:class:`~dlrm_runtime.cached.CachedTable` modules: row caches over the table store,
trained inside the backward; :class:`InMemoryEmbeddings` holds them beside the others.
Tables in the ``host`` tier are the same two kinds of modules with their weights in
host memory (pinned when CUDA is present): each lookup gathers the batch's unique rows
on the host, copies them to the compute device and pools them there
(:func:`host_pooled`); the pooled gradient comes back to the host, where the row
optimizer updates the host rows and their state (:class:`HostLookup`).

Both describe their weights to the row optimizer as :class:`RowBlock` objects, whose
:class:`Segment` entries say which rows and columns of which table each block holds;
checkpoints use the same description to save tables independently of placement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_runtime.memory import empty_weight, host_weight
from dlrm_runtime.sharding import (
    TablePlacement,
    device_for,
    placements_from_plan,
    whole_table,
)
from dlrm_runtime.sparse import SparseBatch
from planner import DType, Optimizer, Plan, Sharding, TablesSpec, TableSpec

__all__ = [
    "HostLookup", "InMemoryEmbeddings", "PooledLookup", "RowBlock", "Segment", "ShardedTable",
    "TORCH_DTYPE", "TableBatchedBags", "UniformRun", "bag_of_ids", "batch_order", "check_range",
    "device_for", "embeddings_from_plan", "embeddings_in_memory", "expand_pooled",
    "host_pooled", "init_generator", "init_table", "pooled_lookup", "uniform_runs",
]

TORCH_DTYPE = {DType.FP32: torch.float32, DType.FP16: torch.float16, DType.BF16: torch.bfloat16}


# ---------------------------------------------------------------- initialisation


def init_generator(index: int, seed: int) -> torch.Generator:
    """The generator of table ``index``'s initial values (see :func:`init_table`)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


_generator = init_generator


def init_table(spec: TableSpec, index: int, seed: int) -> torch.Tensor:
    """The initial fp32 weight of table ``index`` of the spec on the CPU: uniform in
    +-sqrt(1/rows) as in the paper's reference implementation, from a generator
    seeded per table so that values do not depend on placement or sharding."""
    weight = torch.empty(spec.num_embeddings, spec.embedding_dim, dtype=torch.float32)
    _fill_init(weight, spec, index, seed)
    return weight


def _fill_init(out: torch.Tensor, spec: TableSpec, index: int, seed: int) -> None:
    """Write :func:`init_table`'s values into ``out`` ([rows, dim], any dtype/device)
    without a full fp32 copy when ``out`` is an fp32 CPU tensor (CPU ``uniform_``
    draws serially, so filling a slice yields the same values as a fresh tensor)."""
    bound = math.sqrt(1.0 / spec.num_embeddings)
    if out.dtype == torch.float32 and out.device.type == "cpu":
        out.uniform_(-bound, bound, generator=_generator(index, seed))
    else:
        out.copy_(init_table(spec, index, seed))


# ---------------------------------------------------------------- what the optimizer sees


@dataclass(frozen=True, slots=True)
class Segment:
    """Block rows ``[block_row, block_row + rows)`` hold rows ``[row_start, row_start +
    rows)`` and columns ``[col_start, col_start + cols)`` of table ``table``."""

    table: str
    block_row: int
    row_start: int
    rows: int
    col_start: int
    cols: int


@dataclass(eq=False, slots=True)
class RowBlock:
    """One embedding weight the row optimizer updates from its sparse gradient."""

    weight: nn.Parameter
    optimizer: Optimizer
    segments: tuple[Segment, ...]
    full_dim: int
    """Width of the table rows (all column shards together): row-wise Adagrad's mean
    of squared gradients is taken over this many columns."""
    row_group: str | None = None
    """Column shards of one table share this key: their row statistics are combined."""
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    """For a batched weight: the gradients of its lookups since the last ``zero_grad``
    as ``(ids, bag_offsets, pooled_grad)``, kept unexpanded (see :class:`PooledLookup`);
    ``None`` for a weight whose gradient is autograd's sparse ``weight.grad``."""

    def has_grad(self) -> bool:
        return bool(self.pending) if self.pending is not None else self.weight.grad is not None

    def row_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's gradient as ``(rows, values)``, uncoalesced: row ``rows[i]``
        receives ``values[i]`` (rows may repeat; their values add up)."""
        if self.pending is None:
            grad = self.weight.grad
            return grad._indices()[0], grad._values()
        if len(self.pending) == 1:
            ids, offsets, pooled = self.pending[0]
            return ids, expand_pooled(pooled, offsets, ids.numel())
        rows = torch.cat([ids for ids, _, _ in self.pending])
        first = self.pending[0][2]
        values = first.new_empty(rows.numel(), first.shape[1])
        at = 0
        for ids, offsets, pooled in self.pending:  # each expanded in place: no second copy
            expand_pooled(pooled, offsets, ids.numel(), out=values[at:at + ids.numel()])
            at += ids.numel()
        return rows, values

    def sparse_grad(self) -> torch.Tensor:
        """This step's gradient as a coalesced sparse COO tensor shaped like the weight
        (duplicate rows summed by :func:`sum_rows`)."""
        rows, values = sum_rows(*self.row_grads())
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values, self.weight.shape,
                                       check_invariants=False, is_coalesced=True)


def sum_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``rows`` (sorted) and the sum of each one's ``values``, added in the
    order the row occurs in ``rows`` (one sequential scatter over the positions), so
    the result depends only on the rows and their order (on CUDA: in deterministic
    mode), never on how rows are numbered elsewhere (torch's ``coalesce`` sorts
    unstably: duplicates were summed in an order that changed with the keys). In-memory and cached tables both use it;
    measured 1.3-1.8x faster than ``coalesce`` (163,840 Zipf ids of dim 64, 1 thread)."""
    distinct, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    summed = values.new_zeros(distinct.numel(), values.shape[1])
    summed.index_add_(0, inverse, values)
    return distinct, summed


def bag_of_ids(offsets: torch.Tensor, num_ids: int) -> torch.Tensor:
    """For bags starting at ``offsets`` (``include_last_offset=False`` convention), the
    bag of each of the ``num_ids`` ids."""
    lengths = torch.diff(offsets, append=offsets.new_full((1,), num_ids))
    return torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), lengths,
                                   output_size=num_ids)


def uniform_bag_length(offsets: torch.Tensor, num_ids: int) -> int | None:
    """``L`` when every bag holds exactly ``L >= 1`` ids (offsets ``0, L, 2L, ...``),
    else None: then the per-id gradient is the pooled one repeated, no index needed."""
    bags = offsets.numel()
    if bags == 0 or num_ids % bags or num_ids == 0:
        return None
    length = num_ids // bags
    step = torch.arange(0, num_ids, length, device=offsets.device)
    return length if torch.equal(offsets, step) else None


def expand_pooled(pooled: torch.Tensor, offsets: torch.Tensor, num_ids: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of every id (its bag's pooled gradient), ``[num_ids, dim]``, written
    into ``out`` when given. Uniform bags avoid building a per-id index: one id per
    bag returns ``pooled`` itself (copied into ``out`` when given), ``L`` ids a
    broadcast copy."""
    length = uniform_bag_length(offsets, num_ids)
    if length == 1:
        return pooled if out is None else out.copy_(pooled)
    if out is None:
        out = pooled.new_empty(num_ids, pooled.shape[1])
    if length is not None:
        out.view(-1, length, pooled.shape[1]).copy_(pooled.unsqueeze(1).expand(-1, length, -1))
        return out
    return torch.index_select(pooled, 0, bag_of_ids(offsets, num_ids), out=out)


@dataclass(frozen=True, slots=True)
class UniformRun:
    """Bags ``[bag_start, bag_end)`` of a batched lookup hold exactly ``length`` ids
    each: ids ``[id_start, id_end)``."""

    id_start: int
    id_end: int
    bag_start: int
    bag_end: int
    length: int


class PooledLookup(torch.autograd.Function):
    """Sum-pooled lookup whose backward does not build the weight's gradient: it
    records ``(ids, offsets, pooled_grad)`` in ``pending`` for the row optimizer, which
    applies it without materialising autograd's ``[num_ids, dim]`` sparse gradient
    (FBGEMM's table-batched embeddings likewise fuse backward and update). The weight
    gets no ``.grad``; see :meth:`RowBlock.row_grads`.

    ``runs`` (optional) splits a lookup whose bags are ragged as a whole but uniform
    piecewise (tables of different bag lengths batched together) into one entry per
    :class:`UniformRun`: each is then applied on the uniform path (no per-id index).
    Measured here on the demo's tables, 4096 samples, lookup and update: 5.0 -> 4.5 ms
    for its SGD group (1 and 2 ids per bag), 6.5 -> 5.6 ms for its row-wise Adagrad
    group (3 and 1)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,  # type: ignore[override]
                pending: list, runs: tuple[UniformRun, ...] = ()) -> torch.Tensor:
        ctx.save_for_backward(ids, offsets)
        ctx.pending = pending
        ctx.runs = runs
        return F.embedding_bag(ids, weight, offsets, mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ids, offsets = ctx.saved_tensors
        _record_pending(ctx.pending, ctx.runs, ids, offsets, grad)
        return None, None, None, None, None


def _record_pending(pending: list, runs: tuple[UniformRun, ...], ids: torch.Tensor,
                    offsets: torch.Tensor, grad: torch.Tensor) -> None:
    """Keep a lookup's pooled gradient for the row optimizer (see :class:`PooledLookup`)."""
    if not runs:
        pending.append((ids, offsets, grad))
    for run in runs:
        pending.append((ids[run.id_start:run.id_end],
                        torch.arange(0, run.id_end - run.id_start, run.length, device=ids.device),
                        grad[run.bag_start:run.bag_end]))


# ---------------------------------------------------------------- host tier


def host_pooled(weight: torch.Tensor, ids: torch.Tensor, bag_offsets: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """Sum-pooled lookup of a weight held in host memory, computed on ``device``: the
    batch's unique rows are gathered on the host (into page-locked memory when the
    weight is pinned), copied to ``device`` and pooled there through the ids' inverse
    index. Each bag adds the same rows in the same order as ``embedding_bag`` over
    the weight itself, so the result is the same to the bit."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.empty(unique.numel(), weight.shape[1], dtype=weight.dtype,
                       pin_memory=weight.is_pinned())
    torch.index_select(weight, 0, unique, out=rows)  # the host gather
    staged = rows.to(device, non_blocking=True)  # the host-to-device link
    return F.embedding_bag(inverse.to(device, non_blocking=True), staged,
                           bag_offsets.to(device, non_blocking=True), mode="sum")


class HostLookup(torch.autograd.Function):
    """:class:`PooledLookup` for a weight in host memory (the ``host`` tier): forward
    as :func:`host_pooled`; backward the pooled gradient comes back to the host, where
    it is recorded in ``pending`` with the host ids for the row optimizer, which then
    updates the host rows and their optimizer state in place."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,  # type: ignore[override]
                pending: list, runs: tuple[UniformRun, ...], device: torch.device) -> torch.Tensor:
        ctx.save_for_backward(ids, offsets)
        ctx.pending = pending
        ctx.runs = runs
        ctx.host = weight.device
        return host_pooled(weight, ids, offsets, device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ids, offsets = ctx.saved_tensors
        _record_pending(ctx.pending, ctx.runs, ids, offsets, grad.to(ctx.host))  # device-to-host
        return None, None, None, None, None, None


def pooled_lookup(weight: torch.Tensor, ids: torch.Tensor, bag_offsets: torch.Tensor,
                  pending: list, runs: tuple[UniformRun, ...] = (),
                  compute_device: torch.device | None = None) -> torch.Tensor:
    """Sum-pooled lookup whose gradient goes to ``pending`` when autograd records
    (:class:`PooledLookup`); with ``compute_device``, of a host-tier weight pooled on
    that device (:class:`HostLookup`). ``ids`` and ``bag_offsets`` on the weight's
    device."""
    if compute_device is not None:
        if torch.is_grad_enabled() and weight.requires_grad:
            return HostLookup.apply(weight, ids, bag_offsets, pending, runs, compute_device)
        return host_pooled(weight, ids, bag_offsets, compute_device)
    if torch.is_grad_enabled() and weight.requires_grad:
        return PooledLookup.apply(weight, ids, bag_offsets, pending, runs)
    return F.embedding_bag(ids, weight, bag_offsets, mode="sum")


# ---------------------------------------------------------------- whole tables, batched


def _range_error(spec: TableSpec, ids: torch.Tensor) -> IndexError:
    low, high = (int(v) for v in torch.aminmax(ids))
    bad = low if low < 0 else high
    return IndexError(f"table {spec.name!r}: id {bad} outside 0..{spec.num_embeddings - 1}")


def check_range(spec: TableSpec, ids: torch.Tensor) -> None:
    """:class:`IndexError` naming the table, the id and the row count for an id outside
    the table."""
    if ids.numel():
        low, high = torch.aminmax(ids)
        if int(low) < 0 or int(high) >= spec.num_embeddings:
            raise _range_error(spec, ids)


_check_range = check_range


def uniform_runs(offsets: torch.Tensor, counts: Sequence[int]) -> tuple[UniformRun, ...]:
    """For tables batched bag after bag (``offsets``: ``[T, B + 1]``, each table's own;
    ``counts``: each table's ids), the runs of consecutive tables whose bags all hold
    the same number of ids, when every table's bags are uniform but not all of one
    length (else ``()``: the lookup is uniform as a whole, or ragged). Tables without
    ids have no gradient and belong to no run."""
    tables, batch = offsets.shape[0], offsets.shape[1] - 1
    if batch <= 0 or any(count % batch for count in counts):
        return ()
    lengths = [count // batch for count in counts]
    if len(set(lengths)) == 1:
        return ()
    expected = torch.arange(batch + 1, device=offsets.device).unsqueeze(0) * torch.tensor(
        lengths, device=offsets.device).unsqueeze(1)
    if not torch.equal(offsets, expected):
        return ()
    runs: list[UniformRun] = []
    id_at = 0
    for k in range(tables):
        length = lengths[k]
        if length and runs and runs[-1].length == length and runs[-1].bag_end == k * batch:
            last = runs[-1]
            runs[-1] = UniformRun(last.id_start, id_at + counts[k], last.bag_start,
                                  (k + 1) * batch, length)
        elif length:
            runs.append(UniformRun(id_at, id_at + counts[k], k * batch, (k + 1) * batch, length))
        id_at += counts[k]
    return tuple(runs)


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
            _fill_init(weight[base:base + spec.num_embeddings], spec, index, seed)
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
            _check_range(self.specs[0], ids[0])
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
                    _check_range(spec, table_ids)
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


# ---------------------------------------------------------------- sharded tables


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
            _fill_init(weights[0], spec, index, seed)
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
        _check_range(self.spec, ids)
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


# ---------------------------------------------------------------- all tables


class StackInOrder(torch.autograd.Function):
    """Parts ``[T_i, B, D]`` (batched groups, single tables) into one ``[T, B, D]``
    stack in spec order, part ``i``'s tables going to stack ``positions[i]``: one copy
    forward (``cat`` when the parts come in spec order, nothing for one such part);
    backward hands every part its rows of the gradient (a view where they are
    consecutive). ``cat`` then ``index_select`` made two copies forward and a zero
    fill plus a scatter backward: 4-5 ms of the demo's 14 ms embedding step, measured
    here."""

    @staticmethod
    def forward(ctx, positions: tuple[tuple[int, ...], ...],  # type: ignore[override]
                *parts: torch.Tensor) -> torch.Tensor:
        ctx.positions = positions
        if _consecutive([place for places in positions for place in places]) is not None:
            # already in order (positions start at 0)
            return parts[0].view_as(parts[0]) if len(parts) == 1 else torch.cat(parts)
        first = parts[0]
        out = first.new_empty(sum(map(len, positions)), *first.shape[1:])
        for places, part in zip(positions, parts):
            run = _consecutive(places)
            if run is not None:
                out[run[0]:run[1]].copy_(part)
                continue
            for k, place in enumerate(places):  # measured 2x faster than index_copy_
                out[place].copy_(part[k])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        parts = []
        for places in ctx.positions:
            run = _consecutive(places)
            parts.append(grad[run[0]:run[1]] if run is not None else
                         grad.index_select(0, torch.tensor(places, device=grad.device)))
        return None, *parts


def _consecutive(places: Sequence[int]) -> tuple[int, int] | None:
    """``(start, stop)`` when ``places`` are ``start, start + 1, ..., stop - 1``."""
    start, stop = places[0], places[0] + len(places)
    return (start, stop) if list(places) == list(range(start, stop)) else None


class InMemoryEmbeddings(nn.Module):
    """Every table of a spec, placed as ``placements`` says: in device memory, or (tables
    in a cached tier) through row caches over the tiered store in ``store_dir``
    (:class:`~dlrm_runtime.cached.CachedTables`).

    Whole tables (table-wise; data-parallel) are batched per (device, dim, dtype,
    optimizer) in :class:`TableBatchedBags`. A data-parallel table keeps ONE copy in
    one process: its replicas are identical by construction (same initial values,
    and in the multi-process case their gradients are all-reduced before every
    update), so one copy computes exactly what every replica would. Row- and
    column-wise tables are :class:`ShardedTable` modules.

    ``forward`` returns one pooled ``[B, D_t]`` float32 tensor per table, in spec
    order, on ``output_device``; ``forward_stacked`` returns them as one
    ``[T, B, D]`` tensor when all tables share a dim.

    Cached tables train inside ``loss.backward()`` with ``embedding_lr`` and are not
    among :meth:`row_blocks`. The training loop drives them with :meth:`prefetch`,
    :meth:`cache_stats`, :meth:`checkpoint`, :meth:`restore` and :meth:`close`, which
    do nothing (or return None) for a model without cached tables.
    """

    def __init__(self, tables: TablesSpec, placements: dict[str, TablePlacement],
                 output_device: torch.device, seed: int = 0, *,
                 store_dir: str | None = None, embedding_lr: float | None = None) -> None:
        super().__init__()
        self.specs = tables.tables
        self.names = [spec.name for spec in self.specs]
        self.placements = placements
        self.output_device = output_device
        groups: dict[tuple, list[tuple[int, TableSpec]]] = {}
        sharded: list[ShardedTable] = []
        for index, spec in enumerate(self.specs):
            placement = placements[spec.name]
            if placement.cached:
                continue
            if placement.whole:
                key = (str(placement.home(output_device)), placement.host, spec.embedding_dim,
                       spec.dtype, spec.optimizer)
                groups.setdefault(key, []).append((index, spec))
            else:
                sharded.append(ShardedTable(spec, index, placement, output_device, seed))
        self.groups = nn.ModuleList(
            TableBatchedBags(batch_order(members),
                             placements[members[0][1].name].home(output_device), seed,
                             host=placements[members[0][1].name].host)
            for members in groups.values())
        self.sharded = nn.ModuleList(sharded)
        self.cached = None
        if any(p.cached for p in placements.values()):
            from dlrm_runtime.cached import CachedTables  # it builds on this module

            self.cached = CachedTables(tables, placements, output_device, seed, store_dir,
                                       embedding_lr)
        self._next_batch: SparseBatch | None = None
        self._where: dict[str, tuple[str, int, int]] = {}
        for g, group in enumerate(self.groups):
            for k, index in enumerate(group.indices):
                self._where[self.specs[index].name] = ("group", g, k)
        for s, table in enumerate(self.sharded):
            self._where[table.spec.name] = ("sharded", s, 0)
        for c, table in enumerate(self._cached_tables()):
            self._where[table.spec.name] = ("cached", c, 0)
        self.same_dim = len({spec.embedding_dim for spec in self.specs}) == 1
        self._positions = tuple(tuple(group.indices) for group in self.groups) + tuple(
            (table.index,) for table in [*self.sharded, *self._cached_tables()])
        """Per part of :meth:`_parts`: the spec positions of its tables."""

    def weight(self, name: str) -> torch.Tensor:
        """The weight of table ``name`` ([rows, dim]). For a whole table: a view of the
        trained weight (no autograd history; writes go through). For a sharded table:
        a COPY assembled from its shards (writes do not go through)."""
        if name not in self._where:
            raise KeyError(name)
        kind, m, k = self._where[name]
        if kind == "group":
            return self.groups[m].table_weight(k)
        if kind == "cached":
            return self._cached_tables()[m].full_weight()
        return self.sharded[m].full_weight()

    def row_blocks(self) -> list[RowBlock]:
        """Every in-memory weight with what it holds, for the row optimizer and
        checkpoints (cached tables update themselves and live in the store)."""
        blocks = [group.row_block() for group in self.groups]
        for table in self.sharded:
            blocks.extend(table.row_blocks())
        return blocks

    # ---- cached tables: what the training loop calls -------------------------------
    def _cached_tables(self) -> list:
        return list(self.cached.tables) if self.cached is not None else []

    @property
    def embedding_lr(self) -> float | None:
        """Learning rate of the cached tables' fused row optimizer (None: not set)."""
        return self.cached.embedding_lr if self.cached is not None else None

    @embedding_lr.setter
    def embedding_lr(self, lr: float | None) -> None:
        if self.cached is not None:
            self.cached.embedding_lr = lr

    def prefetch(self, next_sparse: SparseBatch) -> None:
        """Announce the batch AFTER the one of the next forward: right after that
        forward's cache lookups, the rows of ``next_sparse`` missing from the caches
        are read from the store on background threads, overlapping the rest of the
        step. Call it before ``Trainer.step(batch)`` with the following batch."""
        if self.cached is not None:
            if len(next_sparse.ids) != len(self.specs):
                raise ValueError(f"the batch has ids for {len(next_sparse.ids)} tables, the "
                                 f"model has {len(self.specs)}")
            self._next_batch = next_sparse

    def cache_stats(self) -> dict[str, float] | None:
        """None without cached tables; else counters summed over every cache since it
        was built: ``hit_rate`` (hits / accesses), ``accesses``, ``hits``, ``misses``,
        ``evictions``, ``write_backs``, ``uncached``, ``prefetched_rows``,
        ``store_read_bytes``, ``store_written_bytes``, ``background_read_s``,
        ``background_wait_s``, ``background_hidden_s``, and ``hit_rate/<table>`` per
        cached table."""
        return self.cached.stats() if self.cached is not None else None

    @property
    def store_checkpoint_step(self) -> int | None:
        """The step of the table store's last checkpoint (None: none, or no store)."""
        return self.cached.checkpoint_step if self.cached is not None else None

    def checkpoint(self, step: int) -> None:
        """Make the cached tables durable at ``step``: dirty cached rows are written
        back and the store checkpoints (fsynced; a crash later reopens it at ``step``)."""
        if self.cached is not None:
            self.cached.checkpoint(step)

    def restore(self, step: int) -> None:
        """Return the cached tables to the store's checkpoint of ``step``
        (:class:`~dlrm_runtime.errors.CheckpointError` if its last checkpoint is of
        another step); the caches start empty."""
        if self.cached is not None:
            self.cached.restore(step)

    def close(self) -> None:
        """Stop the caches' background threads and close the store (writes after its
        last checkpoint are rolled back). The model cannot look up cached tables after."""
        if self.cached is not None:
            self.cached.close()

    def _parts(self, sparse: SparseBatch) -> list[torch.Tensor]:
        if len(sparse.ids) != len(self.specs):
            raise ValueError(f"the batch has ids for {len(sparse.ids)} tables, the model has "
                             f"{len(self.specs)}")
        parts = []
        for group in self.groups:
            out = group([sparse.ids[i] for i in group.indices],
                        [sparse.offsets[i] for i in group.indices])
            parts.append(out.to(self.output_device, torch.float32))
        for table in self.sharded:
            parts.append(table(sparse.ids[table.index], sparse.offsets[table.index]).unsqueeze(0))
        if self.cached is not None:
            self.cached.resolve(sparse)
        for table in self._cached_tables():
            parts.append(table(sparse.ids[table.index], sparse.offsets[table.index]).unsqueeze(0))
        if self._next_batch is not None and self.cached is not None:
            # the caches are resolved for this batch: read the next one's misses while
            # the rest of the step (MLPs, backward, optimizers) computes
            self.cached.prefetch(self._next_batch)
        self._next_batch = None
        return parts

    def forward(self, sparse: SparseBatch) -> list[torch.Tensor]:
        if self.same_dim:
            return list(self.forward_stacked(sparse).unbind(0))
        pooled: list[torch.Tensor] = [torch.empty(0)] * len(self.specs)
        parts = self._parts(sparse)
        for group, out in zip(self.groups, parts):
            for k, index in enumerate(group.indices):
                pooled[index] = out[k]
        for table, out in zip([*self.sharded, *self._cached_tables()], parts[len(self.groups):]):
            pooled[table.index] = out[0]
        return pooled

    def forward_stacked(self, sparse: SparseBatch) -> torch.Tensor:
        """Pooled outputs as one ``[T, B, D]`` tensor (tables in spec order); needs one
        dim for all tables."""
        if not self.same_dim:
            raise ValueError("forward_stacked needs every table to have the same dim")
        return StackInOrder.apply(self._positions, *self._parts(sparse))


def embeddings_from_plan(plan: Plan, output_device: torch.device, seed: int = 0, *,
                         store_dir: str | None = None,
                         embedding_lr: float | None = None) -> InMemoryEmbeddings:
    """Build the tables as the plan places them, in this one process: every shard on
    ``device_for(shard.device)`` (that GPU when present, else the CPU).

    Executes ``table_wise``, ``row_wise``, ``table_row_wise``, ``column_wise`` and
    ``data_parallel`` tables in the ``hbm`` tier, the same but ``data_parallel`` in the
    ``host`` tier (weights in host memory, pooled on the shards' devices), and
    ``table_wise``, ``row_wise`` and ``table_row_wise`` tables in the cached tiers
    (``dram_cache``, ``store_cache``:
    row caches of the shards' ``cache_rows`` over the table store in ``store_dir``,
    created with :func:`init_table`'s values or opened; see
    :mod:`dlrm_runtime.cached`). Shards that break their sharding type's conventions
    raise :class:`PlanMismatchError` naming the table; cached tables without
    ``store_dir`` raise :class:`~dlrm_runtime.errors.ConfigError`. ``embedding_lr``
    is the cached tables' learning rate (settable later as ``.embedding_lr``).
    """
    return InMemoryEmbeddings(plan.tables_spec, placements_from_plan(plan), output_device, seed,
                              store_dir=store_dir, embedding_lr=embedding_lr)


def embeddings_in_memory(tables: TablesSpec, seed: int = 0) -> InMemoryEmbeddings:
    """Every table whole on the CPU, no plan needed."""
    cpu = torch.device("cpu")
    return InMemoryEmbeddings(tables, {t.name: whole_table(t, cpu) for t in tables.tables}, cpu, seed)
