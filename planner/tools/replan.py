"""Re-plan for new specs (a drifted access profile, new pooling factors, another
network) moving at most a budget of bytes away from an old plan.

Migration is measured as in :mod:`planner.tools.diff`: the bytes of table shards (weights and
optimizer state) that land on another device or tier than in the old plan. The search:

1. *Stay*: the old placement re-costed under the new specs.
2. *Fresh*: the planner's plan for the new specs, ignoring the budget
   (:func:`planner.plan`); its lower bound holds for every plan, so for budgeted ones too.
3. *Mix*: an ILP picks, per table, its old or its fresh layout, minimising the slowest
   device under HBM per device, DRAM per host and the budget (tables' migrations add up).
4. *Moves*: a local search moves single table-wise and column-wise shards off the
   slowest device while that lowers it, memory fits and the budget holds.
5. *Assign*: an ILP over both (:mod:`planner.tools.replan_assign`): per table its old or
   fresh layout, every table-wise and column-wise shard on any device, warm-started
   from the best of the above. Its layouts do not depend on the budget, so where it
   proves optimality (``ReplanResult.optimal``) a larger budget never gives a slower
   plan.

The result is checked (:func:`planner.tools.diff.diff_plans` recounts its migration; memory
per device and host); when it breaks the budget or memory, or is no faster than
staying, the old placement re-costed is returned.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pulp

from planner.errors import InfeasibleError, PlannerError, Resource
from planner.inputs.cost import AnalyticCostModel, CostModel, ShardCost, Sharding, check_cost_model
from planner.inputs.specs import GB, TablesSpec, Topology
from planner.plan_file import OPTIMAL_GAP, DeviceLoad, Plan, Shard, SolveReport, TablePlan, check_plan
from planner.search.api import PlanOptions, cost_model_name, plan
from planner.search.solvers import solve
from planner.tools.diff import diff_plans, same_shape, shard_bytes, table_migration
from planner.tools.evaluate import shard_option
from planner.tools.replan_assign import ASSIGN_MAX_BINARIES, MOVABLE, assign, assign_size

FRESH_SHARE = 0.6
"""Share of ``PlanOptions.time_limit_s`` for the fresh plan."""
MIX_SHARE = 0.25
"""Share for the mix ILP (0.1 when the assignment ILP follows); the moves follow."""
ASSIGN_SHARE = 0.25
"""Share for the assignment ILP (:mod:`planner.tools.replan_assign`), at most what is left
of 95 % of the budget."""
MIX_GAP = 1e-4
"""The mix ILP stops within this relative gap of its bound."""


@dataclass(frozen=True, slots=True)
class ReplanResult:
    plan: Plan
    """The plan for the new specs within the budget (``stay`` when nothing better fits)."""
    stay: Plan
    """The old placement re-costed under the new specs."""
    fresh: Plan | None
    """The planner's plan for the new specs without a budget (None: it found none)."""
    budget_bytes: int | None
    """None: no limit."""
    migrated_bytes: int
    """Bytes ``plan`` moves, counted by :func:`planner.tools.diff.diff_plans`."""
    fresh_migrated_bytes: int | None
    kept_old: bool
    """True when the result is the old placement (nothing better fits the budget)."""
    stay_fits: bool
    """False when the old placement overflows the new topology's memory."""
    optimal: bool = False
    """True when the assignment ILP (:mod:`planner.tools.replan_assign`) proved ``plan``
    the fastest within the budget of every plan that takes per table its old or its
    fresh layout and puts table-wise and column-wise shards on any device; then a
    larger budget never gives a slower plan."""

    @property
    def gain_ms(self) -> float:
        """How much faster the slowest device is than when staying."""
        return self.stay.solve.objective_ms - self.plan.solve.objective_ms

    @property
    def gain(self) -> float:
        """``gain_ms`` as a share of staying's slowest device."""
        stay = self.stay.solve.objective_ms
        return self.gain_ms / stay if stay > 0 else 0.0


@dataclass(frozen=True, slots=True)
class _Layout:
    """One table's shards with their costs under the new specs, and its migration."""

    sharding: Sharding
    shards: tuple[Shard, ...]
    costs: tuple[ShardCost, ...]
    migrated: int


def replan(
    old: Plan,
    tables: TablesSpec,
    topology: Topology,
    *,
    max_migrate_bytes: int | None = None,
    cost_model: CostModel | None = None,
    options: PlanOptions = PlanOptions(),
) -> ReplanResult:
    """Plan ``tables`` on ``topology`` moving at most ``max_migrate_bytes`` away from
    ``old`` (None: no limit), and re-cost staying put for comparison.

    The new specs must keep the old plan's tables (names and shapes: rows, dim, dtype,
    optimizer) and device layout (hosts, devices per host). Raises
    :class:`PlannerError` when they do not, :class:`InfeasibleError` when neither the
    old placement nor any plan within the budget fits the new topology's memory.
    """
    start = time.perf_counter()
    check_replan(old, tables, topology, max_migrate_bytes, options)
    model = AnalyticCostModel() if cost_model is None else check_cost_model(cost_model)
    name = cost_model_name(model)
    budget = options.time_limit_s
    space = _Space(tables, topology, model, old)
    stay = [space.layout(old.table(t.name).sharding, old.table(t.name).shards, i)
            for i, t in enumerate(tables.tables)]
    stay_fits = space.fits(stay)

    fresh_plan: Plan | None
    try:
        fresh_plan = plan(tables, topology, cost_model=model,
                          options=replace(options, time_limit_s=FRESH_SHARE * budget))
    except InfeasibleError:
        fresh_plan = None
    bound = 0.0
    fresh: list[_Layout] | None = None
    if fresh_plan is not None:
        bound = fresh_plan.solve.lower_bound_ms
        planned = [fresh_plan.table(t.name) for t in tables.tables]
        device = align_devices(tables, old, planned, topology)
        fresh = [space.layout(p.sharding, tuple(replace(s, device=device[s.device])
                                                for s in p.shards), i)
                 for i, p in enumerate(planned)]
        fresh_plan = space.plan(fresh, name, fresh_plan.solve)

    chosen = list(stay)
    exact_size_ok = assign_size(stay, fresh, topology.world_size) <= ASSIGN_MAX_BINARIES
    if fresh is not None:
        share = MIX_SHARE * (0.4 if exact_size_ok else 1.0)
        chosen = _mix(space, stay, fresh, max_migrate_bytes, share * budget, options) or chosen
    deadline = start + 0.95 * budget
    chosen = _moves(space, chosen, max_migrate_bytes, deadline)
    proven = False
    if exact_size_ok and time.perf_counter() < deadline:
        exact = assign(space, stay, fresh, max_migrate_bytes, bound,
                       chosen if space.fits(chosen) else None,
                       min(ASSIGN_SHARE * budget, deadline - time.perf_counter()),
                       options.solver, options.threads)
        if exact is not None and space.fits(exact.layouts) and (
                max_migrate_bytes is None
                or sum(x.migrated for x in exact.layouts) <= max_migrate_bytes):
            proven = exact.proven
            if not space.fits(chosen) or space.makespan(exact.layouts) <= space.makespan(chosen):
                chosen = exact.layouts

    solver = fresh_plan.solve.solver if fresh_plan is not None else "none"
    stay_plan = space.plan(stay, name, _report("replan", solver, "Kept", space.makespan(stay),
                                               bound, start, options))
    candidate = space.plan(chosen, name, _report("replan", solver, "Replanned",
                                                 space.makespan(chosen), bound, start, options))
    moved = diff_plans(old, candidate).migrated_bytes
    better = space.makespan(chosen) < space.makespan(stay) * (1 - 1e-12) or not stay_fits
    accept = (space.fits(chosen) and better
              and (max_migrate_bytes is None or moved <= max_migrate_bytes))
    if not accept:
        if not stay_fits:
            raise InfeasibleError(
                Resource.HBM, 1,
                f"the old placement overflows the new topology's memory and no plan found "
                f"moves at most {max_migrate_bytes} bytes",
                fixes=("raise --max-migrate-gb", "plan afresh (drop --from)"))
        candidate, moved = stay_plan, 0
    fresh_moved = diff_plans(old, fresh_plan).migrated_bytes if fresh_plan is not None else None
    return ReplanResult(candidate, stay_plan, fresh_plan, max_migrate_bytes, moved, fresh_moved,
                        kept_old=not accept, stay_fits=stay_fits, optimal=proven)


def align_devices(tables: TablesSpec, old: Plan, new: Sequence[TablePlan],
                  topology: Topology) -> list[int]:
    """A renumbering of the devices of a new plan (``new``: its tables in ``tables``'
    order) that keeps each host's devices together and maximises the bytes that stay
    where the old plan has them. Devices are identical, so a renumbered plan costs the
    same; only its migration changes. Tables replicated in either plan are left out
    (they overlap every device alike)."""
    from scipy.optimize import linear_sum_assignment  # only here: keeps `import planner` light

    world, per_host = topology.world_size, topology.devices_per_host
    kept = np.zeros((world, world))
    """kept[n, o]: bytes that stay if new device n becomes old device o."""
    for spec, after in zip(tables.tables, new):
        before = old.table(spec.name)
        if Sharding.DATA_PARALLEL in (before.sharding, after.sharding):
            continue
        by_start = sorted(before.shards, key=lambda s: s.row_start)
        starts = [s.row_start for s in by_start]
        for s in after.shards:
            for o in by_start[:bisect.bisect_left(starts, s.row_end)]:
                if o.row_end > s.row_start and o.tier is s.tier:
                    rows = min(o.row_end, s.row_end) - max(o.row_start, s.row_start)
                    cols = min(o.col_end, s.col_end) - max(o.col_start, s.col_start)
                    kept[s.device, o.device] += shard_bytes(spec, rows, cols)
    hosts = topology.hosts
    within: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    value = np.zeros((hosts, hosts))
    for n in range(hosts):
        for o in range(hosts):
            block = kept[n * per_host:(n + 1) * per_host, o * per_host:(o + 1) * per_host]
            rows, cols = linear_sum_assignment(block, maximize=True)
            within[n, o] = (rows, cols)
            value[n, o] = block[rows, cols].sum()
    device = list(range(world))
    for n, o in zip(*(a.tolist() for a in linear_sum_assignment(value, maximize=True))):
        rows, cols = within[n, o]
        for r, c in zip(rows, cols):
            device[n * per_host + int(r)] = o * per_host + int(c)
    return device


def check_replan(old: Plan, tables: TablesSpec, topology: Topology,
                 max_migrate_bytes: int | None, options: PlanOptions) -> None:
    """What :func:`replan` checks before any work: :class:`PlannerError` when ``old``
    cannot be re-planned into ``tables`` on ``topology`` (other tables or shapes,
    other devices, pins, a baseline, a bad budget)."""
    if max_migrate_bytes is not None and (isinstance(max_migrate_bytes, bool)
                                          or not isinstance(max_migrate_bytes, int)
                                          or max_migrate_bytes < 0):
        raise PlannerError(f"the migration budget must be an integer >= 0 bytes, "
                           f"got {max_migrate_bytes!r}")
    if options.baseline is not None:
        raise PlannerError("re-planning uses the ILP planner; drop the baseline")
    if options.constraints.restricts_placement:
        raise PlannerError("re-planning does not take device or host pins, co-location or "
                           "separation; plan afresh to honour them")
    if (topology.hosts, topology.devices_per_host) != (old.topology.hosts,
                                                       old.topology.devices_per_host):
        raise PlannerError(
            f"the old plan has {old.topology.hosts} host(s) of {old.topology.devices_per_host} "
            f"device(s), the new topology {topology.hosts} of {topology.devices_per_host}; "
            f"re-planning keeps the devices (plan afresh and compare with dlrm-plan diff)")
    old_names = {t.name for t in old.tables_spec.tables}
    new_names = {t.name for t in tables.tables}
    if old_names != new_names:
        raise PlannerError(
            f"re-planning keeps the tables: missing from the new spec "
            f"{sorted(old_names - new_names)[:5]}, new {sorted(new_names - old_names)[:5]}")
    for t in tables.tables:
        if not same_shape(t, old.tables_spec.by_name(t.name)):
            raise PlannerError(f"table {t.name!r} changed shape (rows, dim, dtype or optimizer) "
                               f"since the old plan; re-planning keeps table shapes")


class _Space:
    """Costs, memory and migration of layouts under the new specs."""

    def __init__(self, tables: TablesSpec, topology: Topology, model: CostModel, old: Plan) -> None:
        self.tables = tables
        self.topology = topology
        self.model = model
        self.old = [old.table(t.name).shards for t in tables.tables]
        self.hbm_cap = topology.usable_hbm_bytes
        self.dram_cap = int(topology.host.dram_gb * GB)

    def layout(self, sharding: Sharding, shards: Sequence[Shard], table: int) -> _Layout:
        spec = self.tables.tables[table]
        world = self.topology.world_size
        costs = tuple(self.model.cost(shard_option(spec, sharding, tuple(shards), s, world),
                                      self.topology) for s in shards)
        return _Layout(sharding, tuple(shards), costs, self.migration(table, shards))

    def migration(self, table: int, shards: Sequence[Shard]) -> int:
        arriving, _ = table_migration(self.tables.tables[table], self.old[table], shards)
        return sum(arriving.values())

    def usage(self, layouts: Sequence[_Layout]) -> tuple[list[float], list[int], list[int]]:
        world = self.topology.world_size
        loads, hbm, dram = [0.0] * world, [0] * world, [0] * self.topology.hosts
        for layout in layouts:
            for shard, cost in zip(layout.shards, layout.costs):
                loads[shard.device] += cost.total_ms
                hbm[shard.device] += cost.hbm_bytes
                dram[self.topology.host_of(shard.device)] += cost.dram_bytes
        return loads, hbm, dram

    def makespan(self, layouts: Sequence[_Layout]) -> float:
        return max(self.usage(layouts)[0], default=0.0)

    def fits(self, layouts: Sequence[_Layout]) -> bool:
        _, hbm, dram = self.usage(layouts)
        return max(hbm, default=0) <= self.hbm_cap and max(dram, default=0) <= self.dram_cap

    def plan(self, layouts: Sequence[_Layout], cost_model: str, report: SolveReport) -> Plan:
        loads, hbm, _ = self.usage(layouts)
        planned = []
        for spec, layout in zip(self.tables.tables, layouts):
            total = ShardCost(0.0, 0.0, 0.0, 0.0, 0, 0)
            for cost in layout.costs:
                total = total + cost
            shards = tuple(sorted(layout.shards,
                                  key=lambda s: (s.row_start, s.col_start, s.device)))
            planned.append(TablePlan(spec.name, layout.sharding, shards, total))
        devices = tuple(DeviceLoad(d, self.topology.host_of(d), loads[d], hbm[d], self.hbm_cap)
                        for d in range(self.topology.world_size))
        result = Plan(self.tables, self.topology, cost_model, tuple(planned), devices, report)
        check_plan(result)
        return result


def _report(method: str, solver: str, status: str, objective: float, bound: float,
            start: float, options: PlanOptions) -> SolveReport:
    lower = min(bound, objective)
    return SolveReport(method, solver, status,
                       "Optimal Solution Found" if objective <= bound * (1 + OPTIMAL_GAP)
                       else "Solution Found",
                       objective, lower, time.perf_counter() - start, options.time_limit_s,
                       options.threads)


def _mix(space: _Space, stay: Sequence[_Layout], fresh: Sequence[_Layout],
         budget_bytes: int | None, time_limit_s: float,
         options: PlanOptions) -> list[_Layout] | None:
    """Per table its old or its fresh layout: the ILP minimising the slowest device under
    memory and the budget. None when the solver finds nothing."""
    topology = space.topology
    switch = [i for i, (a, b) in enumerate(zip(stay, fresh))
              if sorted(a.shards, key=_key) != sorted(b.shards, key=_key)]
    if not switch:
        return list(stay)
    loads, hbm, dram = space.usage(stay)
    delta_load: list[dict[int, float]] = [{} for _ in range(topology.world_size)]
    delta_hbm: list[dict[int, int]] = [{} for _ in range(topology.world_size)]
    delta_dram: list[dict[int, int]] = [{} for _ in range(topology.hosts)]
    for i in switch:
        for layout, sign in ((fresh[i], 1), (stay[i], -1)):
            for shard, cost in zip(layout.shards, layout.costs):
                d, h = shard.device, topology.host_of(shard.device)
                delta_load[d][i] = delta_load[d].get(i, 0.0) + sign * cost.total_ms
                delta_hbm[d][i] = delta_hbm[d].get(i, 0) + sign * cost.hbm_bytes
                delta_dram[h][i] = delta_dram[h].get(i, 0) + sign * cost.dram_bytes
    prob = pulp.LpProblem("replan_mix", pulp.LpMinimize)
    x = prob.add_variable_dicts("fresh", switch, cat=pulp.LpBinary)
    z = prob.add_variable("max_load_ms", lowBound=0)
    moved = pulp.LpAffineExpression([(x[i], fresh[i].migrated) for i in switch])
    total_moved = max(1, sum(fresh[i].migrated for i in switch))
    tie = 1e-6 * max(max(loads, default=0.0), 1e-12) / total_moved
    prob += z + tie * moved
    for d in range(topology.world_size):
        terms = [(x[i], v) for i, v in delta_load[d].items() if v]
        prob += (pulp.LpAffineExpression(terms) - z <= -loads[d], f"load_{d}")
        terms = [(x[i], v) for i, v in delta_hbm[d].items() if v]
        if terms or hbm[d] > space.hbm_cap:
            prob += (pulp.LpAffineExpression(terms) <= space.hbm_cap - hbm[d], f"hbm_{d}")
    for h in range(topology.hosts):
        terms = [(x[i], v) for i, v in delta_dram[h].items() if v]
        if terms or dram[h] > space.dram_cap:
            prob += (pulp.LpAffineExpression(terms) <= space.dram_cap - dram[h], f"dram_{h}")
    if budget_bytes is not None:
        prob += (moved <= budget_bytes, "migration_budget")
    # Warm start from the better of staying and the whole fresh plan (when it fits the
    # budget); either is returned when the solver's incumbent is worse.
    starts = [list(stay)]
    if budget_bytes is None or sum(f.migrated for f in fresh) <= budget_bytes:
        starts.append(list(fresh))
    starts = [s for s in starts if space.fits(s)]
    start = min(starts, key=space.makespan, default=None)
    if start is not None:
        for i in switch:
            x[i].setInitialValue(1 if start[i] is fresh[i] else 0)
        z.setInitialValue(space.makespan(start))
    outcome = solve(prob, solver=options.solver, time_limit_s=max(1.0, time_limit_s),
                    threads=options.threads, warm_start=start is not None, gap_rel=MIX_GAP)
    found = list(starts)
    if outcome.has_solution:
        take = {i for i in switch if (x[i].value() or 0.0) > 0.5}
        mixed = [fresh[i] if i in take else stay[i] for i in range(len(stay))]
        moved_bytes = sum(layout.migrated for layout in mixed)
        if space.fits(mixed) and (budget_bytes is None or moved_bytes <= budget_bytes):
            found.append(mixed)
    return min(found, key=space.makespan, default=None)


def _key(shard: Shard) -> tuple:
    return (shard.device, shard.row_start, shard.col_start, shard.tier.value, shard.cache_rows)


def _moves(space: _Space, layouts: list[_Layout], budget_bytes: int | None,
           deadline: float) -> list[_Layout]:
    """Move single table-wise and column-wise shards off the slowest device onto the
    least-loaded device where they fit, while that lowers it and the budget holds."""
    topology = space.topology
    layouts = list(layouts)
    loads, hbm, dram = space.usage(layouts)
    moved = sum(layout.migrated for layout in layouts)
    limit = 10 * sum(len(layout.shards) for layout in layouts)
    for _ in range(limit):
        if time.perf_counter() > deadline:
            break
        worst = max(range(len(loads)), key=loads.__getitem__)
        peak = loads[worst]
        order = sorted(range(len(loads)), key=loads.__getitem__)
        best: tuple[float, int, int, int, int, _Layout] | None = None
        for i, layout in enumerate(layouts):
            if layout.sharding not in MOVABLE:
                continue
            for k, (shard, cost) in enumerate(zip(layout.shards, layout.costs)):
                if shard.device != worst or cost.total_ms <= 0:
                    continue
                for target in order:
                    after = max(peak - cost.total_ms, loads[target] + cost.total_ms)
                    if after >= peak * (1 - 1e-12) or (best is not None and after >= best[0]):
                        break
                    if target == worst or hbm[target] + cost.hbm_bytes > space.hbm_cap:
                        continue
                    host = topology.host_of(target)
                    if (host != topology.host_of(worst)
                            and dram[host] + cost.dram_bytes > space.dram_cap):
                        continue
                    shards = list(layout.shards)
                    shards[k] = replace(shard, device=target)
                    migrated = space.migration(i, shards)
                    extra = migrated - layout.migrated
                    if budget_bytes is not None and moved + extra > budget_bytes:
                        continue
                    best = (after, extra, i, k, target,
                            replace(layout, shards=tuple(shards), migrated=migrated))
                    break
        if best is None:
            break
        _, extra, i, k, target, layout = best
        cost = layouts[i].costs[k]
        source = layouts[i].shards[k].device
        loads[source] -= cost.total_ms
        loads[target] += cost.total_ms
        hbm[source] -= cost.hbm_bytes
        hbm[target] += cost.hbm_bytes
        dram[topology.host_of(source)] -= cost.dram_bytes
        dram[topology.host_of(target)] += cost.dram_bytes
        layouts[i] = layout
        moved += extra
    return layouts


__all__ = ["ReplanResult", "check_replan", "replan"]
