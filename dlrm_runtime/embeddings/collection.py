"""Every table of a model in one process, as a plan places it (:class:`InMemoryEmbeddings`,
built by :func:`embeddings_from_plan`): whole tables batched
(:class:`~dlrm_runtime.embeddings.batched.TableBatchedBags`), split tables
(:class:`~dlrm_runtime.embeddings.sharded.ShardedTable`) and cached tables
(:class:`~dlrm_runtime.embeddings.cached.CachedTables`), in device or host memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlrm_runtime.embeddings.base import RowBlock, TableSpec
from dlrm_runtime.embeddings.batched import TableBatchedBags, batch_order
from dlrm_runtime.embeddings.cached import CachedTables, CachedTablesOwner
from dlrm_runtime.embeddings.placement import TablePlacement, placements_from_plan, whole_table
from dlrm_runtime.embeddings.sharded import ShardedTable
from dlrm_runtime.embeddings.sparse import SparseBatch
from planner import Plan, TablesSpec


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


class InMemoryEmbeddings(CachedTablesOwner, nn.Module):
    """Every table of a spec, placed as ``placements`` says: in device memory, or (tables
    in a cached tier) through row caches over the tiered store in ``store_dir``
    (:class:`~dlrm_runtime.embeddings.cached.CachedTables`).

    Whole tables (table-wise; data-parallel) are batched per (device, dim, dtype,
    optimizer) in :class:`TableBatchedBags`. A data-parallel table keeps ONE copy in
    one process: its replicas are identical by construction (same initial values,
    and in the multi-process case their gradients are all-reduced before every
    update), so one copy computes exactly what every replica would. Row- and
    column-wise tables are :class:`ShardedTable` modules.

    ``forward`` returns one pooled ``[B, D_t]`` float32 tensor per table, in spec
    order, on ``output_device``; ``forward_stacked`` returns them as one
    ``[T, B, D]`` tensor when all tables share a dim.

    Cached tables (``cached``) train inside ``loss.backward()`` with ``embedding_lr``
    and are not among :meth:`row_blocks`; the training loop drives them through
    :class:`~dlrm_runtime.embeddings.cached.CachedTablesOwner`.
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
        self.cached: CachedTables | None = None
        if any(p.cached for p in placements.values()):
            self.cached = CachedTables.open(tables, placements, output_device, seed, store_dir,
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

    def _cached_tables(self) -> list:
        return list(self.cached.tables) if self.cached is not None else []

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
        self._resolved()
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
                         store_dir: str | None = None, embedding_lr: float | None = None,
                         placements: dict[str, TablePlacement] | None = None
                         ) -> InMemoryEmbeddings:
    """Build the tables as the plan places them, in this one process: every shard on
    ``device_for(shard.device)`` (that GPU when present, else the CPU).

    Executes ``table_wise``, ``row_wise``, ``table_row_wise``, ``column_wise`` and
    ``data_parallel`` tables in the ``hbm`` tier, the same but ``data_parallel`` in the
    ``host`` tier (weights in host memory, pooled on the shards' devices), and
    ``table_wise``, ``row_wise`` and ``table_row_wise`` tables in the cached tiers
    (``dram_cache``, ``store_cache``:
    row caches of the shards' ``cache_rows`` over the table store in ``store_dir``,
    created with :func:`init_table`'s values or opened; see
    :mod:`dlrm_runtime.embeddings.cached`). Shards that break their sharding type's conventions
    raise :class:`PlanMismatchError` naming the table; cached tables without
    ``store_dir`` raise :class:`~dlrm_runtime.errors.ConfigError`. ``embedding_lr``
    is the cached tables' learning rate (settable later as ``.embedding_lr``);
    ``placements``: the plan's, already read (:func:`~dlrm_runtime.prepare.prepare_run`).
    """
    if placements is None:
        placements = placements_from_plan(plan)
    return InMemoryEmbeddings(plan.tables_spec, placements, output_device, seed,
                              store_dir=store_dir, embedding_lr=embedding_lr)


def embeddings_in_memory(tables: TablesSpec, seed: int = 0) -> InMemoryEmbeddings:
    """Every table whole on the CPU, no plan needed."""
    cpu = torch.device("cpu")
    return InMemoryEmbeddings(tables, {t.name: whole_table(t, cpu) for t in tables.tables}, cpu, seed)
