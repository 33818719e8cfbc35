"""The aggregate option-choice ILP: a lower bound on every plan, and the options to pack.

One binary ``y[t,o]`` picks option ``o`` for table ``t``. Every feasible plan
satisfies, for its own choice of options:

- ``G * z >= sum of chosen options' total time`` (the work spread over G devices),
- ``z >= chosen option's largest shard`` (for tables whose shards can be large),
- ``sum of chosen HBM <= G * usable HBM`` and ``sum of chosen DRAM <= hosts * DRAM``,

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
from planner.options import TableOption
from planner.solvers import solve
from planner.specs import GB, Topology

TIE_BREAK_WEIGHT = 1e-6
MIP_GAP = 1e-4
"""The solver stops once its incumbent is within this relative gap of its bound; the
bound (not the incumbent) is what certifies plans, so this costs no validity."""


@dataclass(frozen=True, slots=True)
class AggregateCut:
    """An extra restriction found during placement: at most ``limit`` bytes of HBM
    in all (used to leave room for packing losses)."""

    hbm_limit_bytes: int


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
    devices = topology.world_size
    hbm = topology.usable_hbm_bytes * devices
    if cut is not None:
        hbm = min(hbm, cut.hbm_limit_bytes)
    dram = int(topology.host.dram_gb * GB) * topology.hosts
    average = sum(min(o.total_ms for o in opts) for opts in options) / devices
    worst_work = sum(max(o.total_ms for o in opts) for opts in options)
    tie = TIE_BREAK_WEIGHT * max(average, 1e-12) / max(worst_work, 1e-12)
    problem = _Problem(options, devices, average, tie, hbm, dram)

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

    def fits_memory(self, choice: Sequence[int]) -> bool:
        chosen = [self.options[t][o] for t, o in enumerate(choice)]
        return (sum(o.hbm_bytes for o in chosen) <= self.hbm_bytes
                and sum(o.dram_bytes for o in chosen) <= self.dram_bytes)

    def solve(self, *, memory: bool, time_limit_s: float, threads: int, solver: str,
              relax: bool) -> AggregateSolution:
        """The option-choice MIP; ``memory=False`` drops the memory constraints (and the
        options that only they could favour). Its objective includes the tie term."""
        options, average = self.options, self.average_ms
        # z >= the least average load, so a largest-shard constraint can bind only for
        # tables with a shard above it, and shards below it can be charged as the
        # average. Options dominated on every remaining figure are dropped: a solution
        # using one stays feasible and no worse with the dominating option.
        kept = [_front(opts, average, memory) for opts in options]
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


def _front(options: Sequence[TableOption], average_ms: float, memory: bool) -> list[int]:
    """Indices of the options no other option beats on every figure the problem uses:
    work, the largest shard charged at least the average, and (with memory) HBM and
    DRAM."""
    def figures(o: TableOption) -> tuple[float, ...]:
        shard = max(o.max_shard_ms, average_ms)
        return (o.total_ms, shard, o.hbm_bytes, o.dram_bytes) if memory else (o.total_ms, shard)

    order = sorted(range(len(options)), key=lambda i: figures(options[i]))
    kept: list[int] = []
    for i in order:
        mine = figures(options[i])
        if not any(all(a <= b for a, b in zip(figures(options[k]), mine)) for k in kept):
            kept.append(i)
    return kept
