"""Plan tables onto a topology: the Python entry point behind ``dlrm-plan``.

1. Options: every sharding type and tier per table, priced by the cost model.
2. Choice: the aggregate ILP picks one option per table; its optimum is a lower
   bound on every plan made of these options.
3. Placement: the chosen shards are packed onto devices (greedy, local search, and
   the exact packing ILP on small instances). If packing fails for memory, the
   choice is re-solved with less HBM (a cut) and packed again.
4. Small instances: the device-indexed ILP improves the plan and the bound.
5. The best of these plans and the greedy baselines is returned, with the bound and
   the gap between them, and why the search stopped.

The search is anytime (``planner.search.anytime``): it stops as soon as the best plan is
within ``PlanOptions.gap`` of the bound, when neither improved for
``PlanOptions.stall_s`` seconds, or at the time limit.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from planner.errors import InfeasibleError, PlannerError, Resource
from planner.inputs.constraints import NO_CONSTRAINTS, Constraints
from planner.inputs.cost import (
    AnalyticCostModel,
    CostModel,
    ShardCost,
    Sharding,
    Tier,
    check_cost_model,
)
from planner.inputs.specs import GB, TablesSpec, Topology, check_limits
from planner.plan_file import DeviceLoad, Plan, Shard, SolveReport, StopReason, TablePlan
from planner.search.aggregate import AggregateCut, solve_aggregate
from planner.search.anytime import SearchProgress
from planner.search.baselines import BASELINES, BaselineMiss, BaselineResult, run_baseline
from planner.search.exact import EXACT_MAX_TERMS, exact_size, solve_exact, useful_options
from planner.search.load_bound import STEP_SHARE, load_packing_bound
from planner.search.options import OptionSettings, TableOption, table_options
from planner.search.packing import makespan_lower_bound
from planner.search.placement import PlacedShard, PlacementRules, place
from planner.search.solvers import AUTO, SOLVERS, resolve_solver

PACKING_CUTS = ((1.0, 1 / 2), (1.0, 1 / 4), (0.97, 1 / 4), (0.92, 1 / 4), (0.85, 1 / 4),
                (0.85, None))
"""When the chosen shards cannot be packed, the choice is re-solved with these cuts in
turn: (share of the total HBM, largest shard as a share of a device's HBM or None)."""


FEW_TABLES_PER_DEVICE = 2
"""Below this many tables per device the load-packing bound runs before the exact ILP
(on Criteo Terabyte over 68 devices it closes a gap that HiGHS's exact ILP leaves at 30 %)."""

PACKED_CHOICES = 2
"""Option choices from the load-packing bound (lowest limit first) that are placed."""

DEFAULT_GAP = 0.01
DEFAULT_STALL_S = 4.0


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """How to plan."""

    time_limit_s: float = 60.0
    """Budget of the solver stages (option choice 30 %, placement 20 %, re-solves after
    packing cuts 5 % each, no new cut after half the budget; the exact ILP on small
    instances 40 %, or what the others left of 90 %); the best plan found within it
    is returned with its gap. Most searches stop much earlier, on ``gap`` or
    ``stall_s``."""
    threads: int = 1
    solver: str = "cbc"
    """Solver of the option-choice, placement and load-packing ILPs: ``cbc`` (bundled
    with PuLP) or ``highs`` (needs highspy)."""
    baseline: str | None = None
    """Plan with this greedy baseline only (one of ``BASELINES``)."""
    seed: int = 0
    """Seed of the random baseline."""
    candidates: OptionSettings = field(default_factory=OptionSettings)
    """Which sharding types, tiers and cache sizes to consider."""
    constraints: Constraints = NO_CONSTRAINTS
    """Per-table allowed options and pins, co-location, separation."""
    gap: float = DEFAULT_GAP
    """Stop once the best plan is proven within this relative gap of the lower bound,
    (plan - bound) / bound; 0 searches on until the plan is proven optimal, the
    search stalls or the time limit."""
    stall_s: float = DEFAULT_STALL_S
    """Stop when neither the best plan nor the lower bound improved over this many
    seconds of search work (CPU seconds of the planner and its solver, so that a busy
    machine does not cut the search short)."""
    exact_solver: str = AUTO
    """Solver of the device-indexed exact ILP on small instances: ``auto`` (HiGHS where
    highspy is installed, else CBC), ``cbc`` or ``highs``. On memory-bound instances
    HiGHS finds better plans and raises the bound several times faster than CBC
    (bench/README.md, Criteo Terabyte on 4 x 4 GB)."""


def cost_model_name(model: CostModel) -> str:
    """``module:Class`` of the model, as :func:`load_cost_model` reads it back. A
    planner's own model is named at the ``planner`` door (``planner:AnalyticCostModel``),
    so that plan files do not record where inside the package it lives."""
    cls = type(model)
    module = cls.__module__
    door = sys.modules["planner"]
    if module.startswith("planner.") and getattr(door, cls.__qualname__, None) is cls:
        module = "planner"
    return f"{module}:{cls.__qualname__}"


def check_plan_inputs(tables: TablesSpec, topology: Topology,
                      options: PlanOptions = PlanOptions()) -> list[OptionSettings]:
    """What :func:`plan` checks before any work (the options, the sizes, each table's
    constraints against the planner's shardings and tiers): :class:`PlannerError`
    naming the field. Returns each table's allowed options (spec order)."""
    _check_options(options)
    check_limits(tables, topology)
    if options.baseline is not None:
        if options.baseline not in BASELINES:
            raise PlannerError(f"unknown baseline {options.baseline!r}; "
                               f"choose one of {', '.join(BASELINES)}")
        if options.constraints != NO_CONSTRAINTS:
            raise PlannerError("the baselines ignore constraints; plan with the ILP "
                               "(drop --baseline) to honour them")
    return [_settings_for(t.name, options.candidates, options.constraints, topology)
            for t in tables.tables]


def plan(
    tables: TablesSpec,
    topology: Topology,
    *,
    cost_model: CostModel | None = None,
    options: PlanOptions = PlanOptions(),
) -> Plan:
    """Minimise the slowest device's predicted step time under HBM per device and
    DRAM per host.

    Raises :class:`InfeasibleError` naming the binding resource, the table(s) and the
    shortfall, :class:`SolverError` when the MIP solver fails.
    """
    start = time.perf_counter()
    per_table = check_plan_inputs(tables, topology, options)
    model = AnalyticCostModel() if cost_model is None else check_cost_model(cost_model)
    name = cost_model_name(model)
    if options.baseline is not None:
        result = run_baseline(options.baseline, tables, topology, model, options.seed)
        if isinstance(result, BaselineMiss):
            raise _baseline_infeasible(options.baseline, result)
        return _baseline_plan(result, tables, topology, name, options, start)

    progress = SearchProgress(options.time_limit_s, options.gap, options.stall_s, started=start)
    rules = _placement_rules(tables, options.constraints)
    found = [] if rules.active else _baseline_plans(tables, topology, model, per_table)
    for f in found:
        progress.found(f.makespan_ms)
    # Cached tiers only trade time for memory. First search with HBM options alone:
    # without memory constraints that problem is a relaxation of the full one (a cached
    # option is never faster than its HBM twin), so its bounds hold for every plan.
    # Only when memory binds are the cache options generated and searched.
    search = None
    if all(Tier.HBM in s.tiers for s in per_table) and any(s.tiers != {Tier.HBM} for s in per_table):
        candidates = [table_options(t, topology, model, replace(s, tiers=frozenset({Tier.HBM})))
                      for t, s in zip(tables.tables, per_table)]
        if all(candidates):
            search = _search(candidates, topology, options, rules, relaxed=True, progress=progress)
    if search is None:
        candidates = [table_options(t, topology, model, s) for t, s in zip(tables.tables, per_table)]
        check_tables_fit(tables, topology, candidates, model, per_table)
        search = _search(candidates, topology, options, rules, relaxed=False, progress=progress)
        if search is None:
            raise _choice_infeasible(tables, topology, candidates)
    found.extend(search.found)
    if not found:
        raise _choice_infeasible(tables, topology, candidates)
    best = min(found, key=lambda f: f.makespan_ms)
    if all(len(opts) == 1 and opts[0].num_shards == 1 for opts in candidates):
        # Whole tables, one option each: the pigeonhole bounds hold.
        progress.bounded(makespan_lower_bound([o[0].total_ms for o in candidates],
                                              topology.world_size))
    progress.found(best.makespan_ms)
    bound = min(progress.bound_ms, best.makespan_ms)
    stop = progress.outcome()
    proven = stop is StopReason.OPTIMAL
    report = SolveReport(
        method="ilp",
        solver=search.solver,
        status="Optimal" if proven else "Feasible",
        sol_status="Optimal Solution Found" if proven else "Solution Found",
        objective_ms=best.makespan_ms,
        lower_bound_ms=bound,
        solve_seconds=time.perf_counter() - start,
        time_limit_s=options.time_limit_s,
        threads=options.threads,
        stop_reason=stop,
        target_gap=options.gap,
    )
    result = assemble_plan(tables, topology, name, best.options, best.placed, report)
    return replace(result, tables=tuple(
        replace(t, limited_by=limited_by(t.name, options)) for t in result.tables))


def limited_by(name: str, options: PlanOptions) -> str | None:
    """In words, what narrowed table ``name``'s options (its constraints, the
    planner's ``--tiers`` and ``--sharding``); None when nothing did."""
    rules = options.constraints.rules(name)
    settings = options.candidates
    parts = []
    for what, values in (("tiers", rules.tiers), ("shardings", rules.shardings)):
        if values:
            parts.append(f"constraint {what} {sorted(v.value for v in values)}")
    if rules.device is not None:
        parts.append(f"constraint device {rules.device}")
    if rules.host is not None:
        parts.append(f"constraint host {rules.host}")
    if rules.max_shards is not None:
        parts.append(f"constraint max_shards {rules.max_shards}")
    if any(name in group for group in options.constraints.colocate):
        parts.append("constraint colocate")
    if any(name in pair for pair in options.constraints.separate):
        parts.append("constraint separate")
    if settings.tiers != frozenset(Tier):
        parts.append(f"--tiers {','.join(sorted(t.value for t in settings.tiers))}")
    if settings.shardings != frozenset(Sharding):
        parts.append(f"--sharding {','.join(sorted(s.value for s in settings.shardings))}")
    return "; ".join(parts) or None


def _check_options(options: PlanOptions) -> None:
    if not options.time_limit_s > 0:
        raise PlannerError(f"the time limit must be > 0 s, got {options.time_limit_s}")
    if not 0 <= options.gap < math.inf:
        raise PlannerError(f"the target gap must be a number >= 0, got {options.gap}")
    if options.exact_solver not in (AUTO, *SOLVERS):
        raise PlannerError(f"unknown exact solver {options.exact_solver!r}; choose "
                           f"{', '.join((AUTO, *SOLVERS))}")
    if not options.stall_s > 0:
        raise PlannerError(f"the stall window must be > 0 s, got {options.stall_s}")


@dataclass(frozen=True, slots=True)
class _Search:
    found: list["_Found"]
    solver: str
    """The backends that ran, ``+``-joined (the option choice's first)."""
    relaxed: bool


def _search(candidates: list[list[TableOption]], topology: Topology, options: PlanOptions,
            rules: PlacementRules, relaxed: bool, progress: SearchProgress) -> _Search | None:
    """Choice, placement and (small instances) the exact ILP over ``candidates``;
    plans and bounds go to ``progress``, whose rule ends the search early.

    ``relaxed``: the candidates lack the cache tiers, so only memory-free problems give
    valid bounds; returns ``None`` when memory binds (the caller then searches with
    every option)."""
    budget = options.time_limit_s
    choice = solve_aggregate(candidates, topology, time_limit_s=0.3 * budget,
                             threads=options.threads, solver=options.solver)
    if not choice.choice or (relaxed and choice.memory_binds):
        return None
    progress.bounded(choice.lower_bound_ms)
    found: list[_Found] = []
    heuristic = _choose_and_place(candidates, topology, choice.choice, options, rules, progress)
    if heuristic is not None:
        found.append(heuristic)
        progress.found(heuristic.makespan_ms)
    elif relaxed:
        return None
    small = not rules.active and exact_size(candidates, topology) <= EXACT_MAX_TERMS
    exact_solver = resolve_solver(options.exact_solver)
    few_per_device = len(candidates) < FEW_TABLES_PER_DEVICE * topology.world_size
    if (progress.stop() is None and math.isfinite(progress.best_ms)
            and (few_per_device or not (small and exact_solver == "highs"))):
        # Few large shards per device: the average-load bound is weak; the shards'
        # packing proves more (planner.search.load_bound). Small instances with several
        # tables per device skip it when HiGHS runs the exact ILP below: that proves
        # more, and sooner.
        packing = load_packing_bound(
            candidates, topology, lower_ms=progress.bound_ms, upper_ms=progress.best_ms,
            memory=not relaxed, time_limit_s=STEP_SHARE * budget, threads=options.threads,
            solver=options.solver, stop=lambda: progress.stop() is not None)
        progress.bounded(packing.bound_ms)
        for pick in packing.choices[:PACKED_CHOICES]:
            if progress.stop() is not None:
                break
            chosen = tuple(candidates[t][o] for t, o in enumerate(pick))
            placement = place(chosen, topology, time_limit_s=STEP_SHARE * budget,
                              solver=options.solver, threads=options.threads,
                              alternatives=candidates, rules=rules,
                              watch=progress.watch(plans=not relaxed))
            if placement is not None:
                final = tuple(candidates[t].index(o) for t, o in enumerate(placement.options))
                packed = _Found(placement.makespan_ms, placement.options, placement.shards,
                                final)
                found.append(packed)
                progress.found(packed.makespan_ms)
                if heuristic is None or packed.makespan_ms < heuristic.makespan_ms:
                    heuristic = packed
    solver = choice.solver
    if progress.stop() is None and small:
        # 40 % of the budget, or what the earlier stages left of 90 % of it
        left = 0.9 * budget - (time.perf_counter() - progress.started)
        warm = heuristic.choice if heuristic is not None else None
        kept = useful_options(candidates, topology, progress.best_ms, warm)
        exact = solve_exact([[candidates[t][i] for i in k] for t, k in enumerate(kept)],
                            topology,
                            time_limit_s=max(0.1, min(max(0.4 * budget, left), progress.left_s())),
                            threads=options.threads,
                            warm_choice=None if warm is None else tuple(
                                k.index(o) for k, o in zip(kept, warm)),
                            warm_placed=heuristic.placed if heuristic is not None else (),
                            memory=not relaxed, watch=progress.watch(plans=not relaxed),
                            solver=exact_solver)
        if exact is not None:
            if exact.solver != solver:
                solver = f"{solver}+{exact.solver}"
            # No plan with an option left out beats the best one (see useful_options).
            progress.bounded(min(exact.lower_bound_ms, progress.best_ms))
            if exact.fits_memory:
                found.append(_Found(exact.makespan_ms,
                                    tuple(candidates[t][kept[t][o]]
                                          for t, o in enumerate(exact.choice)),
                                    exact.placed))
                progress.found(exact.makespan_ms)
    return _Search(found, solver, relaxed)


def _baseline_plans(tables: TablesSpec, topology: Topology, model: CostModel,
                    allowed: Sequence[OptionSettings]) -> list["_Found"]:
    """The greedy baselines' plans whose options are allowed (warm starts and a floor
    under the ILP's result)."""
    found = []
    for name in ("greedy", "size-lookup"):
        result = run_baseline(name, tables, topology, model)
        if isinstance(result, BaselineResult) and all(
                o.sharding in a.shardings and o.tier in a.tiers
                for o, a in zip(result.options, allowed)):
            placed = tuple(PlacedShard(t, o.shards[0], d)
                           for t, (o, d) in enumerate(zip(result.options, result.devices)))
            found.append(_Found(_makespan(placed, topology), result.options, placed))
    return found


@dataclass(frozen=True, slots=True)
class _Found:
    """A complete plan found along the way."""

    makespan_ms: float
    options: tuple[TableOption, ...]
    placed: tuple[PlacedShard, ...]
    choice: tuple[int, ...] | None = None
    """Index of each table's option among the candidates, when it is one."""


def _choose_and_place(candidates: Sequence[Sequence[TableOption]], topology: Topology,
                      choice: tuple[int, ...], options: PlanOptions,
                      rules: PlacementRules, progress: SearchProgress) -> _Found | None:
    """Pack the chosen options; when packing fails for memory, re-solve the choice
    with less HBM (a cut) and try again. The cut loop stops at the first packing, after
    the last cut, after half the budget, or when ``progress`` says stop (a plan found
    elsewhere, e.g. a baseline's, is within the gap; nothing improved for the stall
    window; the time limit)."""
    budget = options.time_limit_s
    capacity = topology.usable_hbm_bytes
    give_up = time.perf_counter() + 0.5 * budget
    for share, shard in ((1.0, None), *PACKING_CUTS):
        if (share, shard) != (1.0, None):
            if time.perf_counter() > give_up or progress.stop() is not None:
                return None
            cut = AggregateCut(int(capacity * topology.world_size * share),
                               None if shard is None else int(capacity * shard))
            again = solve_aggregate(candidates, topology, time_limit_s=0.05 * budget,
                                    threads=options.threads, solver=options.solver, cut=cut)
            if not again.choice:
                return None
            choice = again.choice
        chosen = tuple(candidates[t][o] for t, o in enumerate(choice))
        placement = place(chosen, topology, time_limit_s=0.2 * budget,
                          solver=options.solver, threads=options.threads,
                          alternatives=candidates, rules=rules,
                          watch=progress.watch(plans=True))
        if placement is not None:
            final = tuple(candidates[t].index(o) for t, o in enumerate(placement.options))
            return _Found(placement.makespan_ms, placement.options, placement.shards, final)
    return None


def _settings_for(name: str, settings: OptionSettings, constraints: Constraints,
                  topology: Topology) -> OptionSettings:
    """The options one table may take under the user's constraints."""
    rules = constraints.rules(name)
    shardings = settings.shardings & (rules.shardings or frozenset(Sharding))
    tiers = settings.tiers & (rules.tiers or frozenset(Tier))
    if not tiers:
        raise PlannerError(f"table {name!r}: its constraint allows tiers "
                           f"{sorted(t.value for t in rules.tiers or ())}, the planner's tiers "
                           f"(--tiers) are {sorted(t.value for t in settings.tiers)}: no tier is "
                           f"left; add one of the constraint's to --tiers or widen the constraint")
    if not shardings:
        raise PlannerError(f"table {name!r}: its constraint allows shardings "
                           f"{sorted(s.value for s in rules.shardings or ())}, the planner's "
                           f"(--sharding) {sorted(s.value for s in settings.shardings)}: no "
                           f"sharding is left; add one of the constraint's to --sharding or "
                           f"widen the constraint")
    whole_device = rules.device is not None or any(name in g for g in constraints.colocate)
    if whole_device:
        shardings &= {Sharding.TABLE_WISE}
    if rules.host is not None and topology.hosts > 1:
        shardings -= {Sharding.ROW_WISE, Sharding.DATA_PARALLEL}
    if any(name in pair for pair in constraints.separate):
        shardings -= {Sharding.ROW_WISE, Sharding.DATA_PARALLEL, Sharding.TABLE_ROW_WISE}
    max_shards = rules.max_shards if settings.max_shards is None else (
        min(settings.max_shards, rules.max_shards or settings.max_shards))
    return replace(settings, shardings=frozenset(shardings), tiers=frozenset(tiers),
                   max_shards=max_shards)


def _placement_rules(tables: TablesSpec, constraints: Constraints) -> PlacementRules:
    index = {t.name: i for i, t in enumerate(tables.tables)}
    group = [None] * len(index)
    for g, members in enumerate(constraints.colocate):
        for name in members:
            group[index[name]] = g
    apart: list[set[int]] = [set() for _ in index]
    for a, b in constraints.separate:
        apart[index[a]].add(index[b])
        apart[index[b]].add(index[a])
    return PlacementRules(
        device=tuple(constraints.rules(t.name).device for t in tables.tables),
        host=tuple(constraints.rules(t.name).host for t in tables.tables),
        group=tuple(group),
        apart=tuple(frozenset(a) for a in apart),
    )


def _makespan(placed: Sequence[PlacedShard], topology: Topology) -> float:
    loads = [0.0] * topology.world_size
    for shard in placed:
        loads[shard.device] += shard.slot.cost.total_ms
    return max(loads)


def _baseline_plan(result: BaselineResult, tables: TablesSpec, topology: Topology, name: str,
                   options: PlanOptions, start: float) -> Plan:
    placed = tuple(PlacedShard(t, o.shards[0], d)
                   for t, (o, d) in enumerate(zip(result.options, result.devices)))
    objective = _makespan(placed, topology)
    # A baseline proves nothing about the problem: a bound over its own options
    # (whole tables) says nothing of plans that shard or cache differently.
    report = SolveReport(method=f"baseline:{result.name}", solver="none", status="Heuristic",
                         sol_status="Solution Found", objective_ms=objective,
                         lower_bound_ms=None,
                         solve_seconds=time.perf_counter() - start,
                         time_limit_s=options.time_limit_s, threads=1)
    return assemble_plan(tables, topology, name, result.options, placed, report)


def assemble_plan(
    tables: TablesSpec,
    topology: Topology,
    cost_model: str,
    options: Sequence[TableOption],
    placed: Sequence[PlacedShard],
    report: SolveReport,
) -> Plan:
    """Build a :class:`Plan` from each table's option and the placed shards."""
    world = topology.world_size
    loads, hbm = [0.0] * world, [0] * world
    shards_of: list[list[Shard]] = [[] for _ in tables.tables]
    costs: list[ShardCost] = [ShardCost(0.0, 0.0, 0.0, 0.0, 0, 0) for _ in tables.tables]
    for p in placed:
        s = p.slot
        loads[p.device] += s.cost.total_ms
        hbm[p.device] += s.cost.hbm_bytes
        shards_of[p.table].append(Shard(p.device, s.row_start, s.row_end, s.col_start, s.col_end,
                                        s.tier, s.cache_rows))
        costs[p.table] = costs[p.table] + s.cost
    planned = tuple(
        TablePlan(t.name, option.sharding,
                  tuple(sorted(shards_of[i], key=lambda s: (s.row_start, s.col_start, s.device))),
                  costs[i])
        for i, (t, option) in enumerate(zip(tables.tables, options))
    )
    devices = tuple(DeviceLoad(d, topology.host_of(d), loads[d], hbm[d], topology.usable_hbm_bytes)
                    for d in range(world))
    return Plan(tables, topology, cost_model, planned, devices, report)


def check_tables_fit(tables: TablesSpec, topology: Topology,
                   candidates: Sequence[Sequence[TableOption]], model: CostModel,
                   settings: Sequence[OptionSettings]) -> None:
    """Fail fast, with numbers and fixes, when no option of a table fits a device or
    the smallest options of all tables exceed the total memory."""
    capacity = topology.usable_hbm_bytes
    for table, opts, allowed in zip(tables.tables, candidates, settings):
        if not opts:
            unbounded = table_options(table, topology, model, allowed, capacity_bytes=2**62)
            if not unbounded:
                raise InfeasibleError(
                    Resource.HBM, table.weight_bytes,
                    f"the constraints leave table {table.name!r} no sharding type and tier "
                    f"(allowed shardings {sorted(s.value for s in allowed.shardings)}, tiers "
                    f"{sorted(t.value for t in allowed.tiers)}, at most {allowed.max_shards} shards)",
                    tables=(table.name,), fixes=("relax the table's constraints",))
            need = min(o.max_shard_hbm_bytes for o in unbounded)
            raise InfeasibleError(
                Resource.HBM, need - capacity,
                f"no allowed option of table {table.name!r} fits a device's {capacity} bytes "
                f"of usable HBM ({topology.device.hbm_gb:g} GB minus "
                f"{topology.reserved_hbm_gb:g} GB reserved); its smallest allowed shard "
                f"needs {need} bytes",
                tables=(table.name,),
                fixes=("allow row-wise or column-wise sharding",
                       "allow a cache tier (dram_cache or store_cache) or the host tier",
                       f"devices of at least {need / GB + topology.reserved_hbm_gb:.3g} GB HBM",
                       "fp16 or bf16 storage (half the bytes)"),
            )
    world = topology.world_size
    least = sum(min(o.hbm_bytes for o in opts) for opts in candidates)
    if least > capacity * world:
        more = math.ceil((least - capacity * world) / capacity)
        raise InfeasibleError(
            Resource.HBM, least - capacity * world,
            f"even the smallest options of the tables need {least} bytes of HBM, "
            f"{world} devices offer {capacity * world}",
            fixes=(f"{more} more device(s)", "allow cache tiers or smaller cache sizes",
                   "fp16 or bf16 storage (half the bytes)"),
        )


def _choice_infeasible(tables: TablesSpec, topology: Topology,
                       candidates: Sequence[Sequence[TableOption]]) -> InfeasibleError:
    """HBM and DRAM together cannot hold the tables, or their shards cannot be packed."""
    dram_cap = int(topology.host.dram_gb * GB) * topology.hosts
    hbm_cap = topology.usable_hbm_bytes * topology.world_size
    # DRAM needed if every table took its smallest-HBM option.
    dram = sum(min(opts, key=lambda o: (o.hbm_bytes, o.dram_bytes)).dram_bytes for opts in candidates)
    if dram > dram_cap:
        return InfeasibleError(
            Resource.DRAM, dram - dram_cap,
            f"with the smallest device caches the tables need {dram} bytes of host DRAM, "
            f"{topology.hosts} host(s) offer {dram_cap}",
            fixes=("allow the store_cache tier", "more hosts or more DRAM per host"),
        )
    largest = max(range(len(tables.tables)),
                  key=lambda i: min(o.max_shard_hbm_bytes for o in candidates[i]))
    return InfeasibleError(
        Resource.HBM, 1,
        f"the tables' shards cannot be packed into {topology.world_size} devices of "
        f"{topology.usable_hbm_bytes} bytes ({hbm_cap} in all)",
        tables=(tables.tables[largest].name,),
        fixes=("one more device", "allow row-wise sharding or cache tiers",
               "fp16 or bf16 storage (half the bytes)"),
    )


def _baseline_infeasible(name: str, miss: BaselineMiss) -> InfeasibleError:
    memory = "HBM" if miss.hbm else "host DRAM"
    return InfeasibleError(
        Resource.HBM if miss.hbm else Resource.DRAM, miss.shortfall_bytes,
        f"baseline {name} places whole tables, in HBM or with a 20 % cache over DRAM, and "
        f"after {miss.placed} tables table {miss.table!r} fits on no device: the emptiest "
        f"needs {miss.shortfall_bytes} bytes more {memory}",
        tables=(miss.table,),
        fixes=("plan with the ILP (drop --baseline)", "more devices"),
    )


__all__ = ["PlanOptions", "assemble_plan", "check_plan_inputs", "check_tables_fit",
           "cost_model_name", "plan"]
