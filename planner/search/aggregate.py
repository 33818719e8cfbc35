"""The aggregate option-choice ILP: a lower bound on every plan, and the options to pack.

One binary ``y[t,o]`` picks option ``o`` for table ``t``. Every feasible plan
satisfies, for its own choice of options:

- ``G * z >= sum of chosen options' total time`` (the work spread over G devices),
- ``z >= chosen option's largest shard`` (for tables whose shards can be large),
- ``sum of chosen HBM <= G * usable HBM`` and ``sum of chosen DRAM <= hosts * DRAM``,
- for k = 1, 2, 3: ``sum over chosen shards of u_k(shard HBM / usable HBM) <= G``,
  where ``u_k(x) = floor((k + 1) x) / k`` (``x`` itself when ``(k + 1) x`` is an
  integer) is a dual feasible function (Fekete and Schepers 2001): shards that share
  a device sum to at most 1 under it. With k = 1 this says that no two shards above
  half a device's HBM share one; the total-HBM constraint alone lets the choice take
  more of them than there are devices, and packing then fails,

so the optimum ``z*`` of this problem is a lower bound on the slowest device's time
of any plan built from these options. A small secondary term (total work, weighted so
that it moves the bound by at most ``1e-6`` relative) steers ties towards less work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pulp

from planner.errors import SolverError
from planner.inputs.specs import GB, Topology
from planner.search.options import TableOption
from planner.search.solvers import solve

PACKING_DFF_ORDERS = (1, 2, 3)
"""The ``k`` of the packing constraints ``sum u_k(shard HBM / capacity) <= devices``."""
TIE_BREAK_WEIGHT = 1e-6
MIP_GAP = 1e-4
"""The solver stops once its incumbent is within this relative gap of its bound; the
bound (not the incumbent) is what certifies plans, so this costs no validity."""


@dataclass(frozen=True, slots=True)
class AggregateCut:
    """An extra restriction, used when the chosen options could not be packed. A cut
    choice is a plan candidate only: its value bounds nothing."""

    hbm_limit_bytes: int
    """At most this much HBM in all (room for packing losses)."""
    max_shard_hbm_bytes: int | None = None
    """No option with a larger shard, for tables that have an option within it
    (smaller shards pack better)."""


@dataclass(frozen=True, slots=True)
class AggregateSolution:
    choice: tuple[int, ...]
    """Index of the chosen option per table."""
    objective_ms: float
    """z of the chosen options."""
    lower_bound_ms: float
    """Proven lower bound on z* (equal to it when solved to optimality)."""
    status: str
    sol_status: str
    solver: str
    memory_binds: bool = False
    """True when the choice without memory constraints did not fit memory."""


def solve_aggregate(
    options: Sequence[Sequence[TableOption]],
    topology: Topology,
    *,
    time_limit_s: float,
    threads: int = 1,
    solver: str = "cbc",
    cut: AggregateCut | None = None,
    relax: bool = False,
) -> AggregateSolution:
    """Choose one option per table. ``relax=True`` solves the LP relaxation instead
    (its value is a weaker but equally valid bound).

    The problem without memory constraints is solved first: it is small (options that
    only trade speed for memory drop out) and its optimum is a lower bound of the full
    problem's, so when its choice fits memory it is optimal for the full problem too.
    """
    if cut is not None and cut.max_shard_hbm_bytes is not None:
        keep = [[i for i, o in enumerate(opts) if o.max_shard_hbm_bytes <= cut.max_shard_hbm_bytes]
                or list(range(len(opts))) for opts in options]
        sub = solve_aggregate([[opts[i] for i in k] for opts, k in zip(options, keep)], topology,
                              time_limit_s=time_limit_s, threads=threads, solver=solver,
                              cut=replace(cut, max_shard_hbm_bytes=None), relax=relax)
        return replace(sub, choice=tuple(k[c] for k, c in zip(keep, sub.choice)))
    devices = topology.world_size
    hbm = topology.usable_hbm_bytes * devices
    if cut is not None:
        hbm = min(hbm, cut.hbm_limit_bytes)
    dram = int(topology.host.dram_gb * GB) * topology.hosts
    average = sum(min(o.total_ms for o in opts) for opts in options) / devices
    worst_work = sum(max(o.total_ms for o in opts) for opts in options)
    tie = TIE_BREAK_WEIGHT * max(average, 1e-12) / max(worst_work, 1e-12)
    capacity = topology.usable_hbm_bytes
    packing = tuple(tuple(tuple(_packing_weight(o, capacity, k) for k in PACKING_DFF_ORDERS)
                          for o in opts) for opts in options)
    problem = _Problem(options, devices, average, tie, hbm, dram, packing)

    start = time.perf_counter()
    first = problem.solve(memory=False, time_limit_s=time_limit_s / 2, threads=threads,
                          solver=solver, relax=relax)
    if first.choice and problem.fits_memory(first.choice):
        solution = first
    else:
        left = max(1.0, time_limit_s - (time.perf_counter() - start))
        solution = replace(problem.solve(memory=True, time_limit_s=left, threads=threads,
                                         solver=solver, relax=relax), memory_binds=True)
    if not solution.choice:
        return solution
    # Remove the tie-break term's largest possible contribution from the bound.
    bound = max(0.0, solution.lower_bound_ms - tie * worst_work)
    return replace(solution, lower_bound_ms=min(bound, solution.objective_ms))


@dataclass(frozen=True, slots=True)
class _Problem:
    options: Sequence[Sequence[TableOption]]
    devices: int
    average_ms: float
    """The least possible average device load: z can never be below it."""
    tie: float
    hbm_bytes: int
    dram_bytes: int
    packing: tuple[tuple[tuple[float, ...], ...], ...]
    """Per table and option: its shards' summed ``u_k`` weights, one per order k."""

    def fits_memory(self, choice: Sequence[int]) -> bool:
        chosen = [self.options[t][o] for t, o in enumerate(choice)]
        weights = [sum(self.packing[t][o][j] for t, o in enumerate(choice))
                   for j in range(len(PACKING_DFF_ORDERS))]
        return (sum(o.hbm_bytes for o in chosen) <= self.hbm_bytes
                and sum(o.dram_bytes for o in chosen) <= self.dram_bytes
                and all(w <= self.devices + 1e-9 for w in weights))

    def solve(self, *, memory: bool, time_limit_s: float, threads: int, solver: str,
              relax: bool) -> AggregateSolution:
        """The option-choice MIP; ``memory=False`` drops the memory constraints (and the
        options that only they could favour). Its objective includes the tie term."""
        options, average = self.options, self.average_ms
        # z >= the least average load, so a largest-shard constraint can bind only for
        # tables with a shard above it, and shards below it can be charged as the
        # average. Options dominated on every remaining figure are dropped: a solution
        # using one stays feasible and no worse with the dominating option.
        kept = [_front(opts, average, self.packing[t] if memory else None)
                for t, opts in enumerate(options)]
        prob = pulp.LpProblem("option_choice", pulp.LpMinimize)
        keys = [(t, o) for t, idx in enumerate(kept) for o in idx]
        y = prob.add_variable_dicts("choose", keys, lowBound=0, upBound=1,
                                    cat=pulp.LpContinuous if relax else pulp.LpBinary)
        z = prob.add_variable("max_load_ms", lowBound=average)

        def weighted(attr: str, scale: float = 1.0) -> pulp.LpAffineExpression:
            # Built from (variable, coefficient) pairs: far faster than lpSum at 100k terms.
            return pulp.LpAffineExpression(
                [(y[t, o], scale * getattr(options[t][o], attr)) for t, o in keys])

        prob += weighted("total_ms", self.tie) + z
        for t, idx in enumerate(kept):
            prob += (pulp.LpAffineExpression([(y[t, o], 1) for o in idx]) == 1, f"one_option_{t}")
            if max(options[t][o].max_shard_ms for o in idx) > average:
                prob += (pulp.LpAffineExpression(
                    [(y[t, o], max(options[t][o].max_shard_ms, average)) for o in idx]) - z <= 0,
                    f"largest_shard_{t}")
        prob += (weighted("total_ms") - self.devices * z <= 0, "average_load")
        if memory:
            prob += (weighted("hbm_bytes") <= self.hbm_bytes, "hbm_total")
            if any(options[t][o].dram_bytes for t, o in keys):
                prob += (weighted("dram_bytes") <= self.dram_bytes, "dram_total")
            for j, k in enumerate(PACKING_DFF_ORDERS):
                terms = [(y[t, o], self.packing[t][o][j]) for t, o in keys if self.packing[t][o][j]]
                if sum(max((self.packing[t][o][j] for o in idx), default=0.0)
                       for t, idx in enumerate(kept)) > self.devices:
                    prob += (pulp.LpAffineExpression(terms) <= self.devices, f"hbm_packing_u{k}")

        outcome = solve(prob, solver=solver, time_limit_s=time_limit_s, threads=threads,
                        mip=not relax, gap_rel=None if relax else MIP_GAP)
        if outcome.infeasible:
            return AggregateSolution((), float("inf"), float("inf"), outcome.status,
                                     outcome.sol_status, outcome.solver)
        if not outcome.has_solution:
            raise SolverError(f"{outcome.solver} found no option choice within "
                              f"{time_limit_s:g} s ({outcome.status}); raise the time limit")
        choice = tuple(max(idx, key=lambda o, t=t: y[t, o].value() or 0.0)
                       for t, idx in enumerate(kept))
        objective = float(pulp.value(prob.objective))
        if relax:
            dual = objective
        elif outcome.reported_bound is not None:
            dual = outcome.reported_bound
        else:  # "optimal" then means within the relative gap
            dual = objective * (1 - MIP_GAP) if outcome.proven_optimal else average
        return AggregateSolution(choice, float(z.value()), min(dual, objective), outcome.status,
                                 outcome.sol_status, outcome.solver)


def _front(options: Sequence[TableOption], average_ms: float,
           packing: Sequence[tuple[float, ...]] | None) -> list[int]:
    """Indices of the options no other option beats on every figure the problem uses:
    work, the largest shard charged at least the average, and (with memory, when
    ``packing`` gives each option's packing weights) HBM, DRAM and those weights."""
    def figures(i: int) -> tuple[float, ...]:
        o = options[i]
        shard = max(o.max_shard_ms, average_ms)
        if packing is None:
            return (o.total_ms, shard)
        return (o.total_ms, shard, o.hbm_bytes, o.dram_bytes, *packing[i])

    order = sorted(range(len(options)), key=figures)
    kept: list[int] = []
    for i in order:
        mine = figures(i)
        if not any(all(a <= b for a, b in zip(figures(k), mine)) for k in kept):
            kept.append(i)
    return kept


def dff_u(hbm_bytes: int, capacity_bytes: int, k: int) -> float:
    """``u_k(hbm / capacity)`` in exact integer arithmetic: ``x`` when ``(k + 1) x`` is an
    integer, else ``floor((k + 1) x) / k``."""
    scaled = (k + 1) * hbm_bytes
    if scaled % capacity_bytes == 0:
        return hbm_bytes / capacity_bytes
    return (scaled // capacity_bytes) / k


def _packing_weight(option: TableOption, capacity_bytes: int, k: int) -> float:
    """The option's shards' summed ``u_k`` weights."""
    if capacity_bytes <= 0:
        return 0.0
    return sum(count * dff_u(cost.hbm_bytes, capacity_bytes, k)
               for _, count, _, cost in option.priced)
