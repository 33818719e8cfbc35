"""A lower bound from how shard loads pack onto devices, for when few large shards
per device keep the average-load bound far below every plan.

The aggregate ILP (:mod:`planner.search.aggregate`) bounds the slowest device by the
average load and the largest shard. With many devices and shards of a few sizes this
is weak: 18 tables of 8 column pieces each (144 pieces) on 68 devices average 2.1
pieces a device, yet some device holds 3. Dual feasible functions see this: if every
device's load is at most ``T``, then on every device the shards' ``u_k(load / T)``
(``u_k(x) = floor((k + 1) x) / k``, Fekete and Schepers 2001) sum to at most 1, so
over the ``G`` devices the chosen options' weights sum to at most ``G``. When no
choice of options meets that (with the average, largest-shard and memory constraints
of the aggregate ILP) the solver proves it infeasible, and no plan is faster than
``T``. Bisection between the known bound and the best plan finds the largest such
``T`` within a few solves. The choices found feasible on the way are candidates for
placement: their shards already pass the packing test at a lower load than the best
plan's.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pulp

from planner.inputs.specs import GB, Topology
from planner.search.aggregate import PACKING_DFF_ORDERS, _packing_weight
from planner.search.options import TableOption
from planner.search.solvers import solve

LOAD_DFF_ORDERS = (1, 2, 3, 4)
"""The ``k`` of the load constraints ``sum u_k(shard load / T) <= devices``."""
BISECTION_STEPS = 8
"""Feasibility solves at most per bound (the gap shrinks by half with each)."""
STEP_SHARE = 0.04
"""Share of the planning budget for each feasibility solve."""
SAFETY = 1e-9
"""Weights are computed from ``(k + 1) x (1 - SAFETY)``: never above the true ``u_k``
under rounding, so the bound stays valid."""


class _Answer(enum.Enum):
    INFEASIBLE = "infeasible"
    FEASIBLE = "feasible"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class LoadBound:
    bound_ms: float
    """No plan over the options is faster."""
    choices: tuple[tuple[int, ...], ...]
    """Option choices (an index per table) that passed the test, lowest limit first."""


def load_weight(load_ms: float, limit_ms: float, k: int) -> float:
    """A value never above ``u_k(load / limit)``."""
    if limit_ms <= 0:
        return 0.0
    return math.floor((k + 1) * (load_ms / limit_ms) * (1 - SAFETY)) / k


def load_packing_bound(
    options: Sequence[Sequence[TableOption]],
    topology: Topology,
    *,
    lower_ms: float,
    upper_ms: float,
    memory: bool,
    time_limit_s: float,
    threads: int = 1,
    solver: str = "cbc",
    stop: Callable[[], bool] = lambda: False,
) -> LoadBound:
    """The largest ``T`` in ``[lower_ms, upper_ms]`` that bisection proves no plan over
    ``options`` reaches (``lower_ms`` when none). ``memory=False`` leaves out the memory
    constraints: the bound then holds for plans over any slower variants of these options
    too (cached tiers). ``stop`` ends the bisection early."""
    lo, hi = lower_ms, upper_ms
    choices: list[tuple[int, ...]] = []
    deadline = time.perf_counter() + time_limit_s * BISECTION_STEPS
    for _ in range(BISECTION_STEPS):
        if hi <= lo * (1 + 1e-4) or stop() or time.perf_counter() >= deadline:
            break
        limit = (lo + hi) / 2
        answer, choice = _feasible(options, topology, limit, memory, time_limit_s, threads,
                                   solver)
        if answer is _Answer.INFEASIBLE:
            lo = limit
        elif answer is _Answer.FEASIBLE:
            hi = limit
            choices.insert(0, choice)
        else:
            break
    return LoadBound(lo, tuple(choices))


def _feasible(options: Sequence[Sequence[TableOption]], topology: Topology, limit_ms: float,
              memory: bool, time_limit_s: float, threads: int, solver: str
              ) -> tuple[_Answer, tuple[int, ...]]:
    """Whether some choice of options passes every constraint that a plan with no
    device above ``limit_ms`` meets, and that choice (an option index per table)."""
    devices = topology.world_size
    index = [[i for i, o in enumerate(opts) if o.max_shard_ms <= limit_ms] for opts in options]
    if not all(index):
        return _Answer.INFEASIBLE, ()
    kept = [[options[t][i] for i in idx] for t, idx in enumerate(index)]
    prob = pulp.LpProblem("load_packing", pulp.LpMinimize)
    keys = [(t, o) for t, opts in enumerate(kept) for o in range(len(opts))]
    y = prob.add_variable_dicts("choose", keys, cat=pulp.LpBinary)

    def total(value: Callable[[TableOption], float]) -> pulp.LpAffineExpression:
        return pulp.LpAffineExpression([(y[t, o], value(kept[t][o])) for t, o in keys
                                        if value(kept[t][o])])

    prob += total(lambda o: o.total_ms)
    for t, opts in enumerate(kept):
        prob += (pulp.lpSum(y[t, o] for o in range(len(opts))) == 1, f"one_option_{t}")
    prob += (total(lambda o: o.total_ms) <= devices * limit_ms, "average_load")
    for k in LOAD_DFF_ORDERS:
        prob += (total(lambda o, k=k: sum(n * load_weight(c.total_ms, limit_ms, k)
                                          for _, n, _, c in o.priced)) <= devices,
                 f"load_packing_u{k}")
    if memory:
        capacity = topology.usable_hbm_bytes
        prob += (total(lambda o: o.hbm_bytes) <= capacity * devices, "hbm_total")
        dram = int(topology.host.dram_gb * GB) * topology.hosts
        if any(o.dram_bytes for opts in kept for o in opts):
            prob += (total(lambda o: o.dram_bytes) <= dram, "dram_total")
        for k in PACKING_DFF_ORDERS:
            prob += (total(lambda o, k=k: _packing_weight(o, capacity, k)) <= devices,
                     f"hbm_packing_u{k}")
    outcome = solve(prob, solver=solver, time_limit_s=max(0.1, time_limit_s), threads=threads)
    if outcome.infeasible:
        return _Answer.INFEASIBLE, ()
    if outcome.has_solution:
        return _Answer.FEASIBLE, tuple(
            index[t][max(range(len(opts)), key=lambda o, t=t: y[t, o].value() or 0.0)]
            for t, opts in enumerate(kept))
    return _Answer.UNKNOWN, ()
