"""Place items (table shards) on identical devices: minimise the largest device load
under a per-device memory capacity (makespan scheduling with a knapsack side
constraint).

Three pieces: a valid lower bound on the optimum (:func:`makespan_lower_bound`), a
greedy placement (:func:`greedy_pack`, longest-processing-time first), and the exact
ILP (:func:`solve_packing_ilp`, PuLP) warm-started from the greedy result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulp

from planner.errors import SolverError
from planner.search.solvers import Watch, solve


@dataclass(frozen=True, slots=True)
class PackingProblem:
    """Items with a load and a memory footprint, to place on identical devices."""

    load_ms: tuple[float, ...]
    hbm_bytes: tuple[int, ...]
    devices: int
    capacity_bytes: int


@dataclass(frozen=True, slots=True)
class Packing:
    """A placement and what is known about its distance from optimal."""

    device_of: tuple[int, ...]
    makespan_ms: float
    lower_bound_ms: float
    status: str
    """The solver's problem status (``Optimal``, ``Not Solved``, ...) or ``greedy``."""
    sol_status: str
    """The solution status: only ``Optimal Solution Found`` proves optimality."""
    proven_optimal: bool
    solver: str
    infeasible: bool = False
    """True when the solver proved that no placement fits."""


def makespan(problem: PackingProblem, device_of: Sequence[int]) -> float:
    loads = [0.0] * problem.devices
    for item, device in enumerate(device_of):
        loads[device] += problem.load_ms[item]
    return max(loads, default=0.0)


def makespan_lower_bound(load_ms: Sequence[float], devices: int) -> float:
    """A bound no placement can beat, memory ignored.

    Average load, the largest item, and the pigeonhole bounds: among the ``k*G + 1``
    largest items some device holds ``k + 1``, so the optimum is at least the sum of
    the ``k + 1`` smallest of them.
    """
    loads = sorted(load_ms, reverse=True)
    if not loads:
        return 0.0
    bound = max(sum(loads) / devices, loads[0])
    k = 1
    while k * devices + 1 <= len(loads):
        top = k * devices + 1
        bound = max(bound, sum(loads[top - k - 1 : top]))
        k += 1
    return bound


def greedy_pack(problem: PackingProblem, order: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """Each item, in ``order`` (default: largest load first), goes to the least-loaded
    device with room. Returns ``None`` when some item fits nowhere."""
    if order is None:
        order = sorted(range(len(problem.load_ms)), key=lambda i: (-problem.load_ms[i], i))
    loads = [0.0] * problem.devices
    used = [0] * problem.devices
    device_of = [-1] * len(problem.load_ms)
    for item in order:
        fits = [d for d in range(problem.devices)
                if used[d] + problem.hbm_bytes[item] <= problem.capacity_bytes]
        if not fits:
            return None
        best = min(fits, key=lambda d: (loads[d], used[d], d))
        device_of[item] = best
        loads[best] += problem.load_ms[item]
        used[best] += problem.hbm_bytes[item]
    return tuple(device_of)


def best_greedy(problem: PackingProblem) -> tuple[int, ...] | None:
    """The better of load-first and memory-first greedy placement."""
    n = len(problem.load_ms)
    orders = [
        sorted(range(n), key=lambda i: (-problem.load_ms[i], i)),
        sorted(range(n), key=lambda i: (-problem.hbm_bytes[i], i)),
    ]
    found = [p for p in (greedy_pack(problem, o) for o in orders) if p is not None]
    return min(found, key=lambda p: makespan(problem, p)) if found else None


def _canonical(device_of: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """Relabel devices by the first item (in ``order``) they hold, so a placement
    obeys the ILP's symmetry-breaking rule."""
    relabel: dict[int, int] = {}
    for item in order:
        relabel.setdefault(device_of[item], len(relabel))
    return tuple(relabel[d] for d in device_of)


def solve_packing_ilp(
    problem: PackingProblem,
    *,
    time_limit_s: float = 30.0,
    threads: int = 1,
    solver: str = "cbc",
    warm_start: Sequence[int] | None = None,
    watch: Watch | None = None,
) -> Packing:
    """Solve the placement exactly with PuLP (CBC, or HiGHS when ``solver="highs"``).

    Identical devices are exploited by symmetry breaking: with items sorted by load,
    item ``i`` may only use devices ``0..i``. The cut ``z >= lower bound`` lets the
    solver stop as soon as a placement reaches the bound. Under the time limit the
    best placement found is returned with ``proven_optimal=False``; so it is when
    ``watch`` stops the solver early (see :func:`planner.search.solvers.solve`).
    """
    n, devices = len(problem.load_ms), problem.devices
    order = sorted(range(n), key=lambda i: (-problem.load_ms[i], -problem.hbm_bytes[i], i))
    rank = {item: r for r, item in enumerate(order)}
    bound = makespan_lower_bound(problem.load_ms, devices)

    prob = pulp.LpProblem("table_placement", pulp.LpMinimize)
    allowed = [(i, d) for i in range(n) for d in range(min(devices, rank[i] + 1))]
    place = prob.add_variable_dicts("place", allowed, cat=pulp.LpBinary)
    z = prob.add_variable("max_load_ms", lowBound=bound)
    prob += z
    for i in range(n):
        prob += (pulp.lpSum(place[i, d] for d in range(min(devices, rank[i] + 1))) == 1,
                 f"assign_item_{i}")
    by_device: dict[int, list[int]] = {d: [] for d in range(devices)}
    for i, d in allowed:
        by_device[d].append(i)
    for d, items in by_device.items():
        if not items:
            continue
        prob += (pulp.lpSum(problem.load_ms[i] * place[i, d] for i in items) <= z, f"load_dev_{d}")
        prob += (pulp.lpSum(problem.hbm_bytes[i] * place[i, d] for i in items)
                 <= problem.capacity_bytes, f"hbm_cap_dev_{d}")

    if warm_start is not None:
        start = _canonical(warm_start, order)
        for i, d in allowed:
            place[i, d].setInitialValue(1 if start[i] == d else 0)
        z.setInitialValue(max(bound, makespan(problem, start)))

    outcome = solve(prob, solver=solver, time_limit_s=time_limit_s, threads=threads,
                    warm_start=warm_start is not None, watch=watch)
    if not outcome.has_solution:
        return Packing((), float("inf"), bound, outcome.status, outcome.sol_status, False,
                       outcome.solver, infeasible=outcome.infeasible)
    device_of = [-1] * n
    for (i, d), var in place.items():
        if (var.value() or 0.0) > 0.5:
            device_of[i] = d
    if -1 in device_of:
        raise SolverError(f"{outcome.solver} returned a solution that leaves an item unplaced")
    span = makespan(problem, device_of)
    proven = outcome.proven_optimal and not outcome.stopped_early
    if not proven and outcome.reported_bound is not None:
        bound = max(bound, outcome.reported_bound)
    return Packing(tuple(device_of), span, span if proven else min(bound, span), outcome.status,
                   outcome.sol_status, proven, outcome.solver)
