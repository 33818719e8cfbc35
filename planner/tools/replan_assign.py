"""The re-planning ILP: per table its old or its fresh layout, and every shard of a
table-wise or column-wise layout on any device, minimising the slowest device under HBM
per device, DRAM per host and the migration budget.

It contains what the mix ILP and the single-shard moves of :mod:`planner.tools.replan`
search (both are its warm start), and its layouts (the old plan's and the fresh plan's,
aligned) do not depend on the budget. So when it is solved to optimality its answer for
a budget is never worse than its answer for a smaller one: the smaller budget's plan is
feasible for the larger budget too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pulp

from planner.inputs.cost import Sharding
from planner.plan_file import Shard
from planner.search.solvers import solve
from planner.tools.diff import table_migration

if TYPE_CHECKING:  # pragma: no cover
    from planner.tools.replan import _Layout, _Space

ASSIGN_MAX_BINARIES = 20_000
"""Largest number of (shard, device) binaries for which the ILP is built."""
ASSIGN_GAP = 1e-10
"""Relative gap at which the solver stops (as good as proven optimal)."""
TIE_WEIGHT = 1e-7
"""Weight of migrated bytes in the objective, relative to the slowest device's load:
among equally fast plans the one that moves less."""
BYTES_SCALE = 1e-9
"""Bytes enter the ILP in GB (coefficients of 1e10 upset the solvers' tolerances)."""
MOVABLE = (Sharding.TABLE_WISE, Sharding.COLUMN_WISE)
"""Sharding types whose shards may go to any device one by one."""


@dataclass(frozen=True, slots=True)
class AssignResult:
    layouts: list[_Layout]
    proven: bool
    """True when the solver proved these layouts optimal among all it could choose."""


def assign_size(stay: Sequence[_Layout], fresh: Sequence[_Layout] | None, world: int) -> int:
    """Binaries of the ILP: (shard, device) pairs of movable layouts and the choices."""
    total = 0
    for i, layout in enumerate(stay):
        for option in (layout, *(() if fresh is None else (fresh[i],))):
            if option.sharding in MOVABLE:
                total += len(option.shards) * world
            total += 1
    return total


def assign(space: _Space, stay: Sequence[_Layout], fresh: Sequence[_Layout] | None,
           budget_bytes: int | None, lower_bound_ms: float, warm: Sequence[_Layout] | None,
           time_limit_s: float, solver: str, threads: int) -> AssignResult | None:
    """The ILP's best plan within ``budget_bytes`` (None: no limit), warm-started from
    ``warm`` (a plan that fits; None: none); None when the solver returns nothing usable."""
    topology = space.topology
    world = topology.world_size
    prob = pulp.LpProblem("replan_assign", pulp.LpMinimize)
    z = prob.add_variable("max_load_ms", lowBound=max(0.0, lower_bound_ms))
    sums = _Sums(topology)
    moved: list = []
    constant_moved = 0
    choices: list[list[tuple[_Layout, pulp.LpVariable | None]]] = []
    places: dict[tuple[int, int, int], dict[int, tuple[pulp.LpVariable, int]]] = {}
    for i, layout in enumerate(stay):
        options = [layout]
        if fresh is not None and _key(fresh[i]) != _key(layout):
            options.append(fresh[i])
        pick = [(o, prob.add_variable(f"layout_{i}_{n}", cat=pulp.LpBinary) if len(options) > 1
                 else None) for n, o in enumerate(options)]
        choices.append(pick)
        if len(pick) > 1:
            prob += (pulp.lpSum(v for _, v in pick) == 1, f"one_layout_{i}")
        spec = space.tables.tables[i]
        for n, (option, var) in enumerate(pick):
            if option.sharding not in MOVABLE:
                for shard, cost in zip(option.shards, option.costs):
                    sums.charge(shard.device, cost, var)
                if var is None:
                    constant_moved += option.migrated
                elif budget_bytes is not None and option.migrated > budget_bytes:
                    prob += (var == 0, f"over_budget_{i}_{n}")
                elif option.migrated:
                    moved.append((var, option.migrated))
                continue
            for k, (shard, cost) in enumerate(zip(option.shards, option.costs)):
                row = {}
                for d in range(world):
                    arriving, _ = table_migration(spec, space.old[i], [replace(shard, device=d)])
                    bytes_ = sum(arriving.values())
                    if budget_bytes is not None and bytes_ > budget_bytes:
                        continue  # moving this shard there alone breaks the budget
                    x = prob.add_variable(f"place_{i}_{n}_{k}_{d}", cat=pulp.LpBinary)
                    row[d] = (x, bytes_)
                    sums.charge(d, cost, x)
                    if bytes_:
                        moved.append((x, bytes_))
                places[i, n, k] = row
                # (no device within the budget: the layout cannot be chosen)
                total = pulp.lpSum(x for x, _ in row.values())
                prob += (total == (1 if var is None else var), f"place_{i}_{n}_{k}")
    moved_expr = pulp.LpAffineExpression([(v, b * BYTES_SCALE) for v, b in moved])
    scale = max(lower_bound_ms, space.makespan(warm if warm is not None else stay), 1e-12)
    total_gb = max(BYTES_SCALE, BYTES_SCALE * sum(b for _, b in moved))
    prob += z + (TIE_WEIGHT * scale / total_gb) * moved_expr
    if (max(sums.hbm0, default=0) > space.hbm_cap
            or max(sums.dram0, default=0) > space.dram_cap):
        return None  # the fixed layouts alone overflow memory
    for d in range(world):
        prob += (pulp.LpAffineExpression(sums.load[d]) - z <= -sums.load0[d], f"load_{d}")
        if sums.hbm[d]:
            prob += (pulp.LpAffineExpression([(v, b * BYTES_SCALE) for v, b in sums.hbm[d]])
                     <= (space.hbm_cap - sums.hbm0[d]) * BYTES_SCALE, f"hbm_{d}")
    for h in range(topology.hosts):
        if sums.dram[h]:
            prob += (pulp.LpAffineExpression([(v, b * BYTES_SCALE) for v, b in sums.dram[h]])
                     <= (space.dram_cap - sums.dram0[h]) * BYTES_SCALE, f"dram_{h}")
    if budget_bytes is not None:
        prob += (moved_expr <= (budget_bytes - constant_moved) * BYTES_SCALE, "migration_budget")
    warmed = warm is not None and _warm_start(choices, places, warm, z, space)
    outcome = solve(prob, solver=solver, time_limit_s=max(1.0, time_limit_s), threads=threads,
                    warm_start=warmed, gap_rel=ASSIGN_GAP)
    if not outcome.has_solution:
        return None
    layouts = []
    for i, pick in enumerate(choices):
        n, option = next((n, o) for n, (o, v) in enumerate(pick)
                         if v is None or (v.value() or 0.0) > 0.5)
        if option.sharding in MOVABLE:
            shards = tuple(replace(s, device=next(d for d, (x, _) in places[i, n, k].items()
                                                  if (x.value() or 0.0) > 0.5))
                           for k, s in enumerate(option.shards))
            option = replace(option, shards=shards, migrated=space.migration(i, shards))
        layouts.append(option)
    return AssignResult(layouts, outcome.proven_optimal and not outcome.stopped_early)


class _Sums:
    """Per device load and HBM, per host DRAM: variable terms and constants."""

    def __init__(self, topology) -> None:
        self.topology = topology
        self.load: list[list] = [[] for _ in range(topology.world_size)]
        self.hbm: list[list] = [[] for _ in range(topology.world_size)]
        self.dram: list[list] = [[] for _ in range(topology.hosts)]
        self.load0 = [0.0] * topology.world_size
        self.hbm0 = [0] * topology.world_size
        self.dram0 = [0] * topology.hosts

    def charge(self, device: int, cost, var: pulp.LpVariable | None) -> None:
        """A shard's load and memory on ``device``, times ``var`` (None: always)."""
        host = self.topology.host_of(device)
        if var is None:
            self.load0[device] += cost.total_ms
            self.hbm0[device] += cost.hbm_bytes
            self.dram0[host] += cost.dram_bytes
            return
        self.load[device].append((var, cost.total_ms))
        self.hbm[device].append((var, cost.hbm_bytes))
        if cost.dram_bytes:
            self.dram[host].append((var, cost.dram_bytes))


def _key(layout: _Layout) -> tuple:
    return (layout.sharding, tuple(sorted((s.device, s.row_start, s.col_start, s.tier.value,
                                           s.cache_rows) for s in layout.shards)))


def _shape(shard: Shard) -> tuple:
    return (shard.row_start, shard.row_end, shard.col_start, shard.col_end, shard.tier.value,
            shard.cache_rows)


def _warm_start(choices, places, warm: Sequence[_Layout], z: pulp.LpVariable,
                space: _Space) -> bool:
    """Set the ILP's start to ``warm``; False when some table's layout in ``warm`` is
    not one the ILP can express."""
    plan: list[tuple[int, list[int]]] = []
    for i, (pick, layout) in enumerate(zip(choices, warm)):
        for n, (option, _) in enumerate(pick):
            if option.sharding is not layout.sharding:
                continue
            if option.sharding not in MOVABLE:
                if _key(option) == _key(layout):
                    plan.append((n, []))
                    break
                continue
            devices = _match(option.shards, layout.shards)
            if devices is not None:
                plan.append((n, devices))
                break
        else:
            return False
    for i, ((n, devices), pick) in enumerate(zip(plan, choices)):
        for m, (_, var) in enumerate(pick):
            if var is not None:
                var.setInitialValue(1 if m == n else 0)
            for k in range(len(pick[m][0].shards) if pick[m][0].sharding in MOVABLE else 0):
                for d, (x, _) in places[i, m, k].items():
                    x.setInitialValue(1 if m == n and devices[k] == d else 0)
    z.setInitialValue(space.makespan(warm))
    return True


def _match(shards: Sequence[Shard], placed: Sequence[Shard]) -> list[int] | None:
    """The device of each of ``shards`` in ``placed`` (the same pieces, placed), or None."""
    free: dict[tuple, list[int]] = {}
    for s in placed:
        free.setdefault(_shape(s), []).append(s.device)
    out = []
    for s in shards:
        devices = free.get(_shape(s))
        if not devices:
            return None
        out.append(devices.pop())
    return out
