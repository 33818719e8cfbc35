"""What changes between two plans: tables moved, bytes to migrate per device, and the
predicted change of each device's load and of the slowest.

A table's bytes are its weights plus its optimizer state (``Optimizer.
state_bytes_per_row``). A piece of a table *migrates* when, in the new plan, it lies on
a device and tier where the old plan did not hold it; resizing a device cache moves
nothing (the cache warms up). Per device, ``bytes_in`` are the bytes that must arrive
(the migration) and ``bytes_out`` the bytes the old plan held there that the new one
does not. Each plan is costed as it says (under its own specs and cost model).
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from planner.inputs.cost import Sharding, Tier
from planner.inputs.specs import TableSpec
from planner.plan_file import Plan, Shard, TablePlan


class ChangeKind(enum.Enum):
    """How a table's placement changed."""

    UNCHANGED = "unchanged"
    MOVED = "moved"
    """Some of its bytes land on another device or tier."""
    RESHARDED = "resharded"
    """Its shards changed (sharding type, ranges or cache sizes) but no bytes move."""
    ADDED = "added"
    REMOVED = "removed"
    REPLACED = "replaced"
    """Same name, another shape (rows, dim, dtype or optimizer): recreated, not moved."""


@dataclass(frozen=True, slots=True)
class TableChange:
    name: str
    kind: ChangeKind
    old_sharding: Sharding | None
    new_sharding: Sharding | None
    old_devices: tuple[int, ...]
    new_devices: tuple[int, ...]
    moved_bytes: int
    old_tiers: tuple[Tier, ...] = ()
    """The tiers of its shards in the old plan (each once, in :class:`Tier` order)."""
    new_tiers: tuple[Tier, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind.value,
                "old_sharding": None if self.old_sharding is None else self.old_sharding.value,
                "new_sharding": None if self.new_sharding is None else self.new_sharding.value,
                "old_devices": list(self.old_devices), "new_devices": list(self.new_devices),
                "old_tiers": [t.value for t in self.old_tiers],
                "new_tiers": [t.value for t in self.new_tiers],
                "moved_bytes": self.moved_bytes}


@dataclass(frozen=True, slots=True)
class DeviceChange:
    device: int
    old_load_ms: float | None
    """None when the old plan has no such device."""
    new_load_ms: float | None
    bytes_in: int
    bytes_out: int

    @property
    def delta_ms(self) -> float:
        return (self.new_load_ms or 0.0) - (self.old_load_ms or 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "old_load_ms": self.old_load_ms,
                "new_load_ms": self.new_load_ms, "delta_ms": self.delta_ms,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


@dataclass(frozen=True, slots=True)
class PlanDiff:
    tables: tuple[TableChange, ...]
    """Every table of either plan, in the new plan's order, then the removed ones."""
    devices: tuple[DeviceChange, ...]
    old_objective_ms: float
    new_objective_ms: float
    same_tables_spec: bool
    same_topology: bool
    same_cost_model: bool

    @property
    def migrated_bytes(self) -> int:
        return sum(d.bytes_in for d in self.devices)

    @property
    def moved(self) -> tuple[TableChange, ...]:
        return tuple(t for t in self.tables if t.kind is ChangeKind.MOVED)

    @property
    def changed(self) -> tuple[TableChange, ...]:
        return tuple(t for t in self.tables if t.kind is not ChangeKind.UNCHANGED)

    @property
    def objective_change(self) -> float:
        """Relative change of the slowest device (negative: faster)."""
        if self.old_objective_ms <= 0:
            return 0.0
        return self.new_objective_ms / self.old_objective_ms - 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "old_objective_ms": self.old_objective_ms,
            "new_objective_ms": self.new_objective_ms,
            "objective_change": self.objective_change,
            "migrated_bytes": self.migrated_bytes,
            "tables_moved": [t.name for t in self.moved],
            "same_tables_spec": self.same_tables_spec,
            "same_topology": self.same_topology,
            "same_cost_model": self.same_cost_model,
            "tables": [t.to_json() for t in self.changed],
            "devices": [d.to_json() for d in self.devices],
        }


def shard_bytes(spec: TableSpec, rows: int, cols: int) -> int:
    """Weights and optimizer state of ``rows`` x ``cols`` of a table."""
    if rows <= 0 or cols <= 0:
        return 0
    return rows * (cols * spec.dtype.bytes + spec.optimizer.state_bytes_per_row(cols))


def _overlap_bytes(spec: TableSpec, a: Shard, b: Shard) -> int:
    rows = min(a.row_end, b.row_end) - max(a.row_start, b.row_start)
    cols = min(a.col_end, b.col_end) - max(a.col_start, b.col_start)
    return shard_bytes(spec, rows, cols)


def _uncovered(spec: TableSpec, shards: Iterable[Shard], others: Sequence[Shard]
               ) -> dict[int, int]:
    """Per device, the bytes of ``shards`` that ``others`` do not hold on the same device
    and tier (``others`` of one table do not overlap on one device and tier)."""
    at: dict[tuple[int, Tier], list[Shard]] = defaultdict(list)
    for o in others:
        at[(o.device, o.tier)].append(o)
    out: dict[int, int] = defaultdict(int)
    for s in shards:
        kept = sum(_overlap_bytes(spec, s, o) for o in at.get((s.device, s.tier), ()))
        out[s.device] += max(0, shard_bytes(spec, s.row_end - s.row_start,
                                            s.col_end - s.col_start) - kept)
    return out


def table_migration(spec: TableSpec, old: Sequence[Shard], new: Sequence[Shard]
                    ) -> tuple[dict[int, int], dict[int, int]]:
    """Bytes arriving at and leaving each device when a table's shards change from
    ``old`` to ``new`` (one spec: the table's shape is the same in both)."""
    return _uncovered(spec, new, old), _uncovered(spec, old, new)


def same_shape(a: TableSpec, b: TableSpec) -> bool:
    """The two specs describe the same cells (rows, dim, dtype, optimizer state)."""
    return (a.num_embeddings, a.embedding_dim, a.dtype, a.optimizer) == (
        b.num_embeddings, b.embedding_dim, b.dtype, b.optimizer)


def _layout(table: TablePlan) -> tuple:
    return (table.sharding, tuple(sorted((s.device, s.row_start, s.row_end, s.col_start,
                                          s.col_end, s.tier.value, s.cache_rows)
                                         for s in table.shards)))


def _devices(table: TablePlan | None) -> tuple[int, ...]:
    return () if table is None else tuple(sorted({s.device for s in table.shards}))


def _tiers(table: TablePlan | None) -> tuple[Tier, ...]:
    held = set() if table is None else {s.tier for s in table.shards}
    return tuple(t for t in Tier if t in held)


def diff_plans(old: Plan, new: Plan) -> PlanDiff:
    """Compare ``new`` against ``old`` table by table (by name) and device by device
    (by index)."""
    old_tables = {t.name: t for t in old.tables}
    new_tables = {t.name: t for t in new.tables}
    bytes_in: dict[int, int] = defaultdict(int)
    bytes_out: dict[int, int] = defaultdict(int)
    changes = []
    for name in [*new_tables, *(n for n in old_tables if n not in new_tables)]:
        before, after = old_tables.get(name), new_tables.get(name)
        moved = 0
        if before is None:
            kind = ChangeKind.ADDED
        elif after is None:
            kind = ChangeKind.REMOVED
        elif not same_shape(old.tables_spec.by_name(name), new.tables_spec.by_name(name)):
            kind = ChangeKind.REPLACED
        else:
            arriving, leaving = table_migration(new.tables_spec.by_name(name), before.shards,
                                                after.shards)
            for device, count in arriving.items():
                bytes_in[device] += count
            for device, count in leaving.items():
                bytes_out[device] += count
            moved = sum(arriving.values())
            kind = (ChangeKind.MOVED if moved else ChangeKind.UNCHANGED
                    if _layout(before) == _layout(after) else ChangeKind.RESHARDED)
        changes.append(TableChange(name, kind, None if before is None else before.sharding,
                                   None if after is None else after.sharding,
                                   _devices(before), _devices(after), moved, _tiers(before),
                                   _tiers(after)))
    old_load = {d.device: d.load_ms for d in old.devices}
    new_load = {d.device: d.load_ms for d in new.devices}
    devices = tuple(DeviceChange(d, old_load.get(d), new_load.get(d), bytes_in.get(d, 0),
                                 bytes_out.get(d, 0))
                    for d in sorted(set(old_load) | set(new_load)))
    return PlanDiff(tuple(changes), devices, old.solve.objective_ms, new.solve.objective_ms,
                    old.tables_spec.sha256() == new.tables_spec.sha256(),
                    old.topology.sha256() == new.topology.sha256(),
                    old.cost_model == new.cost_model)


__all__ = ["ChangeKind", "DeviceChange", "PlanDiff", "TableChange", "diff_plans", "same_shape",
           "shard_bytes", "table_migration"]
