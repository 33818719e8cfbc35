"""User constraints on a plan: per-table allowed options and pins, co-location and
anti-affinity.

A constraints file (JSON or TOML)::

    {"tables": {"big": {"shardings": ["row_wise", "table_row_wise"], "max_shards": 16},
                "user_id": {"tiers": ["hbm"]},
                "ads": {"device": 3},
                "geo": {"host": 0}},
     "colocate": [["query", "query_bigram"]],
     "separate": [["user_id", "item_id"]]}

Pins, co-location and separation restrict where shards go; the planner's bound is
computed without them (a relaxation, so it stays valid) and the exact small-instance
ILP is skipped when they are present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from planner.errors import SpecError
from planner.inputs._fields import Fields
from planner.inputs.cost import Sharding, Tier
from planner.inputs.specs import TablesSpec, Topology, read_document


@dataclass(frozen=True, slots=True)
class TableRules:
    """What one table may do."""

    shardings: frozenset[Sharding] | None = None
    """Allowed sharding types (None: any)."""
    tiers: frozenset[Tier] | None = None
    max_shards: int | None = None
    device: int | None = None
    """Every shard on this device."""
    host: int | None = None
    """Every shard on devices of this host."""

    def allows_device(self, device: int, topology: Topology) -> bool:
        if self.device is not None and device != self.device:
            return False
        return self.host is None or topology.host_of(device) == self.host


@dataclass(frozen=True, slots=True)
class Constraints:
    tables: dict[str, TableRules] = field(default_factory=dict)
    colocate: tuple[tuple[str, ...], ...] = ()
    """Groups of tables that share one device (whole tables)."""
    separate: tuple[tuple[str, str], ...] = ()
    """Pairs of tables that never share a device."""

    def rules(self, name: str) -> TableRules:
        return self.tables.get(name, TableRules())

    @property
    def restricts_placement(self) -> bool:
        return bool(self.colocate or self.separate or any(
            r.device is not None or r.host is not None for r in self.tables.values()))


NO_CONSTRAINTS = Constraints()


def load_constraints(path: str | Path, tables: TablesSpec, topology: Topology) -> Constraints:
    return parse_constraints(read_document(path), tables, topology, str(path))


def parse_constraints(doc: object, tables: TablesSpec, topology: Topology,
                      file: str = "<memory>") -> Constraints:
    """Validate against the tables and topology they constrain."""
    names = {t.name for t in tables.tables}
    root = Fields(doc, file, "")
    root.string("description", default="")
    rules: dict[str, TableRules] = {}
    if root.has("tables"):
        per_table = root.child("tables")
        raw = root.raw("tables")
        for name in raw:
            if name not in names:
                raise per_table.error(name, "no such table in the tables spec", name)
            rules[name] = _table_rules(per_table.child(name), topology)
        per_table.done()
    groups = _name_lists(root, "colocate", names, 2) if root.has("colocate") else ()
    pairs = _name_lists(root, "separate", names, 2, exactly=True) if root.has("separate") else ()
    root.done()
    for group in groups:
        for name in group:
            r = rules.get(name, TableRules())
            if r.shardings is not None and Sharding.TABLE_WISE not in r.shardings:
                raise SpecError(file, "colocate", f"table {name!r} is co-located, so it must "
                                                  f"allow table_wise sharding", sorted(group))
    _check_contradictions(file, rules, groups, pairs, topology)
    return Constraints(rules, tuple(tuple(g) for g in groups), tuple((p[0], p[1]) for p in pairs))


def _check_contradictions(file: str, rules: dict[str, TableRules], groups: list[list[str]],
                          pairs: list[list[str]], topology: Topology) -> None:
    """Pins, co-location and separation that no plan can satisfy together, reported as
    such (before the planner would report them as a shortage of memory)."""
    for name, r in rules.items():
        if r.shardings is None:
            continue
        where = f"tables.{name}.shardings"
        if r.device is not None and Sharding.TABLE_WISE not in r.shardings:
            raise SpecError(file, where, f"contradicts the pin to device {r.device}: a pinned "
                                         f"table is placed whole (allow table_wise)",
                            sorted(s.value for s in r.shardings))
        if any(name in pair for pair in pairs) and not r.shardings & {Sharding.TABLE_WISE,
                                                                      Sharding.COLUMN_WISE}:
            raise SpecError(file, where, "contradicts 'separate': a table kept apart from "
                                         "another needs table_wise or column_wise sharding",
                            sorted(s.value for s in r.shardings))
    # tables co-located through overlapping groups share one device
    component = {name: name for group in groups for name in group}

    def root(name: str) -> str:
        while component[name] != name:
            name = component[name]
        return name

    for group in groups:
        for name in group[1:]:
            component[root(name)] = root(group[0])
    pinned_device: dict[str, tuple[str, int]] = {}
    pinned_host: dict[str, tuple[str, int]] = {}
    for name in component:
        r = rules.get(name, TableRules())
        for pins, value, what in ((pinned_device, r.device, "device"),
                                  (pinned_host, r.host, "host")):
            if value is None:
                continue
            other = pins.setdefault(root(name), (name, value))
            if other[1] != value:
                raise SpecError(file, "colocate", f"contradictory pins: {other[0]!r} is pinned "
                                                  f"to {what} {other[1]} and {name!r} to {what} "
                                                  f"{value}, but they are co-located",
                                sorted(n for n in component if root(n) == root(name)))
    for top, (name, device) in pinned_device.items():
        if top in pinned_host and topology.host_of(device) != pinned_host[top][1]:
            other, host = pinned_host[top]
            raise SpecError(file, "colocate", f"contradictory pins: {name!r} is pinned to device "
                                              f"{device} (host {topology.host_of(device)}) and "
                                              f"{other!r} to host {host}, but they are co-located",
                            sorted(n for n in component if root(n) == top))

    def device_of(name: str) -> int | None:
        if name in component and root(name) in pinned_device:
            return pinned_device[root(name)][1]
        return rules.get(name, TableRules()).device

    for i, (a, b) in enumerate(pairs):
        if a in component and b in component and root(a) == root(b):
            raise SpecError(file, "separate", "these tables are also co-located", [a, b])
        if device_of(a) is not None and device_of(a) == device_of(b):
            raise SpecError(file, f"separate[{i}]", f"contradictory pins: both tables are "
                                                    f"pinned to device {device_of(a)}", [a, b])


def _table_rules(f: Fields, topology: Topology) -> TableRules:
    shardings = tiers = None
    if f.has("shardings"):
        shardings = frozenset(_enum_items(f, "shardings", Sharding))
    if f.has("tiers"):
        tiers = frozenset(_enum_items(f, "tiers", Tier))
    max_shards = f.integer("max_shards") if f.has("max_shards") else None
    device = f.integer("device", minimum=0) if f.has("device") else None
    if device is not None and device >= topology.world_size:
        raise f.error("device", f"must be below the {topology.world_size} devices", device)
    host = f.integer("host", minimum=0) if f.has("host") else None
    if host is not None and host >= topology.hosts:
        raise f.error("host", f"must be below the {topology.hosts} hosts", host)
    if device is not None and host is not None and topology.host_of(device) != host:
        raise f.error("host", f"device {device} is not on host {host}", host)
    f.done()
    return TableRules(shardings, tiers, max_shards, device, host)


def _enum_items(f: Fields, key: str, kind) -> list:
    out = []
    for i, value in enumerate(f.items(key)):
        try:
            out.append(kind(value))
        except ValueError:
            raise f.error(f"{key}[{i}]", f"must be one of {', '.join(k.value for k in kind)}",
                          value) from None
    return out


def _name_lists(f: Fields, key: str, names: set[str], minimum: int,
                exactly: bool = False) -> list[list[str]]:
    out = []
    for i, group in enumerate(f.items(key)):
        if (not isinstance(group, list) or len(group) < minimum
                or (exactly and len(group) != minimum)
                or not all(isinstance(n, str) for n in group) or len(set(group)) != len(group)):
            size = f"{minimum}" if exactly else f"{minimum} or more"
            raise f.error(f"{key}[{i}]", f"must be a list of {size} distinct table names", group)
        for n in group:
            if n not in names:
                raise f.error(f"{key}[{i}]", f"no such table {n!r} in the tables spec", group)
        out.append(group)
    return out
