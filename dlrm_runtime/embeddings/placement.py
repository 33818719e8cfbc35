"""Where each piece of each table lives, read from a plan and checked against the
plan's shard conventions.

Conventions (one :class:`~planner.Shard` = a row range and a column range on one device):

- ``table_wise``: one shard, the whole table, on one device;
- ``row_wise``: several shards, each a half-open row range ``[row_start, row_end)``
  over all columns; the ranges tile the table's rows;
- ``table_row_wise``: row-wise, with every shard on a device of one host;
- ``column_wise``: several shards, each a half-open column range
  ``[col_start, col_end)`` over all rows; the ranges tile the table's columns;
  pooled outputs are concatenated in column order;
- ``data_parallel``: one shard per device, each the whole table (replicas).

Tiers: ``hbm`` shards hold their rows in device memory; ``host`` shards hold them in
host memory and are pooled on their device (:func:`~dlrm_runtime.embeddings.host_pooled`);
``dram_cache`` and ``store_cache`` shards are a row cache of ``cache_rows`` slots on the
device over the table in the tiered store (:mod:`dlrm_runtime.embeddings.cached`). A cached table
must be ``table_wise``, ``row_wise`` or ``table_row_wise``, a host-tier table anything
but ``data_parallel``, with every shard in the same tier; other combinations raise
:class:`PlanMismatchError` naming the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlrm_runtime.errors import PlanMismatchError
from planner import Plan, Sharding, TablePlan, TableSpec, Tier, Topology


def device_for(rank: int) -> torch.device:
    """The torch device standing for plan device ``rank`` in this process: that GPU
    when present, else the CPU."""
    if torch.cuda.is_available() and rank < torch.cuda.device_count():
        return torch.device("cuda", rank)
    return torch.device("cpu")


@dataclass(frozen=True, slots=True)
class ShardPlacement:
    """One shard: rows ``[row_start, row_end)`` and columns ``[col_start, col_end)`` of
    a table on plan device ``plan_device`` (torch device ``device`` in this process)."""

    plan_device: int
    device: torch.device
    row_start: int
    row_end: int
    col_start: int
    col_end: int
    tier: Tier = Tier.HBM
    """Where the shard's rows live (see the module docstring)."""
    cache_rows: int = 0
    """Device cache slots of a cached shard (0 for ``hbm``)."""

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def cols(self) -> int:
        return self.col_end - self.col_start


@dataclass(frozen=True, slots=True)
class TablePlacement:
    """How one table is split, with its shards in execution order (row order for
    row-wise, column order for column-wise)."""

    sharding: Sharding
    shards: tuple[ShardPlacement, ...]

    @property
    def whole(self) -> bool:
        """True when one copy of the whole table serves every lookup (table-wise, or
        data-parallel replicas, which are identical by construction)."""
        return self.sharding in (Sharding.TABLE_WISE, Sharding.DATA_PARALLEL)

    @property
    def cached(self) -> bool:
        """True when the table's shards are row caches over the tiered store."""
        return self.shards[0].tier in CACHED_TIERS

    @property
    def host(self) -> bool:
        """True when the table's rows live in host memory (the ``host`` tier)."""
        return self.shards[0].tier is Tier.HOST

    def home(self, output_device: torch.device) -> torch.device:
        """The device of the one copy kept for a whole table: the replica on the
        output device when there is one, else the first shard's device."""
        for shard in self.shards:
            if shard.device == output_device:
                return shard.device
        return self.shards[0].device


def whole_table(spec: TableSpec, device: torch.device, plan_device: int = 0) -> TablePlacement:
    """The whole table on one device (table-wise)."""
    shard = ShardPlacement(plan_device, device, 0, spec.num_embeddings, 0, spec.embedding_dim)
    return TablePlacement(Sharding.TABLE_WISE, (shard,))


def placement_from_plan(spec: TableSpec, table: TablePlan, topology: Topology) -> TablePlacement:
    """Check ``table``'s shards against its sharding type's conventions and map them to
    torch devices; every violation is a :class:`PlanMismatchError` naming the table."""
    name = table.name
    _check_tiers(table)
    for s in table.shards:
        if not 0 <= s.device < topology.world_size:
            raise PlanMismatchError(f"table {name!r}: device {s.device} outside "
                                    f"0..{topology.world_size - 1}")
    rows, dim = spec.num_embeddings, spec.embedding_dim
    shards = tuple(ShardPlacement(s.device, device_for(s.device), s.row_start, s.row_end,
                                  s.col_start, s.col_end, s.tier, s.cache_rows)
                   for s in table.shards)
    kind = table.sharding

    def whole(s: ShardPlacement) -> bool:
        return (s.row_start, s.row_end, s.col_start, s.col_end) == (0, rows, 0, dim)

    if kind is Sharding.TABLE_WISE:
        if len(shards) != 1 or not whole(shards[0]):
            raise PlanMismatchError(f"table {name!r}: table_wise needs exactly one shard "
                                    f"covering all {rows} rows and {dim} columns")
    elif kind is Sharding.DATA_PARALLEL:
        if not all(whole(s) for s in shards):
            raise PlanMismatchError(f"table {name!r}: every data_parallel shard must be the "
                                    f"whole table ({rows} x {dim})")
        devices = [s.plan_device for s in shards]
        if len(set(devices)) != len(devices):
            raise PlanMismatchError(f"table {name!r}: data_parallel replicas need distinct "
                                    f"devices, got {devices}")
    elif kind in (Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE):
        if any((s.col_start, s.col_end) != (0, dim) for s in shards):
            raise PlanMismatchError(f"table {name!r}: {kind.value} shards must span all "
                                    f"{dim} columns")
        shards = tuple(sorted(shards, key=lambda s: s.row_start))
        _check_tiling(name, kind, "rows", [(s.row_start, s.row_end) for s in shards], rows)
        if kind is Sharding.TABLE_ROW_WISE:
            hosts = sorted({topology.host_of(s.plan_device) for s in shards})
            if len(hosts) != 1:
                raise PlanMismatchError(f"table {name!r}: table_row_wise shards must lie on "
                                        f"one host, got hosts {hosts}")
    elif kind is Sharding.COLUMN_WISE:
        if any((s.row_start, s.row_end) != (0, rows) for s in shards):
            raise PlanMismatchError(f"table {name!r}: column_wise shards must span all "
                                    f"{rows} rows")
        shards = tuple(sorted(shards, key=lambda s: s.col_start))
        _check_tiling(name, kind, "columns", [(s.col_start, s.col_end) for s in shards], dim)
    else:  # pragma: no cover - every Sharding member is handled above
        raise PlanMismatchError(f"table {name!r}: sharding {kind.value!r} is not supported")
    return TablePlacement(kind, shards)


CACHED_TIERS = (Tier.DRAM_CACHE, Tier.STORE_CACHE)
"""Tiers whose shards are row caches over the tiered store."""

CACHED_SHARDINGS = (Sharding.TABLE_WISE, Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE)
"""Shardings whose shards may be row caches (a column shard's cache would need the
row-wise Adagrad statistics of the other column shards)."""


def _check_tiers(table: TablePlan) -> None:
    """A table is all ``hbm``, all ``host`` (not data-parallel), or all in one cached
    tier with a sharding that supports it."""
    tiers = {s.tier for s in table.shards}
    if tiers == {Tier.HBM} or not tiers:
        return
    name = table.name
    if tiers == {Tier.HOST}:
        if table.sharding is Sharding.DATA_PARALLEL:
            raise PlanMismatchError(f"table {name!r}: data_parallel replicas in tier 'host' "
                                    f"are not supported; plan the replicas in hbm")
        return
    if len(tiers) > 1:
        cached = sorted(t.value for t in tiers if t is not Tier.HBM)
        raise PlanMismatchError(f"table {name!r}: tier {cached[0]!r} is not supported mixed "
                                f"with other tiers in one table (its shards use "
                                f"{sorted(t.value for t in tiers)}); plan every shard of a "
                                f"table in one tier")
    tier = next(iter(tiers))
    if table.sharding not in CACHED_SHARDINGS:
        raise PlanMismatchError(
            f"table {name!r}: {table.sharding.value} shards in tier {tier.value!r} are not "
            f"supported (cached tiers need {', '.join(k.value for k in CACHED_SHARDINGS)}); "
            f"plan it in hbm or with one of those shardings")
    for s in table.shards:
        if s.cache_rows < 1:
            raise PlanMismatchError(f"table {name!r}: tier {tier.value!r} is not supported "
                                    f"without cache rows (a shard has cache_rows = "
                                    f"{s.cache_rows}); give every cached shard cache_rows >= 1")


def _check_tiling(name: str, kind: Sharding, what: str, ranges: list[tuple[int, int]],
                  size: int) -> None:
    """Sorted half-open ranges must tile ``[0, size)`` with no gap and no overlap."""
    expected = 0
    for start, end in ranges:
        if start != expected:
            problem = "overlap" if start < expected else "gap"
            raise PlanMismatchError(
                f"table {name!r}: {kind.value} shards must tile {what} 0..{size} without gap "
                f"or overlap; {problem} at {what[:-1]} {min(start, expected)} "
                f"(ranges {[list(r) for r in ranges]})")
        expected = end
    if expected != size:
        raise PlanMismatchError(f"table {name!r}: {kind.value} shards cover {what} 0..{expected}"
                                f" of 0..{size} (ranges {[list(r) for r in ranges]})")


def placements_from_plan(plan: Plan) -> dict[str, TablePlacement]:
    """Every table's placement, by name (see :func:`placement_from_plan`)."""
    return {table.name: placement_from_plan(plan.tables_spec.by_name(table.name), table,
                                            plan.topology)
            for table in plan.tables}
