"""The placement ILP against brute force; the lower bound against every feasible plan."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.search.packing import (
    PackingProblem,
    best_greedy,
    greedy_pack,
    makespan,
    makespan_lower_bound,
    solve_packing_ilp,
)


def brute_force(problem: PackingProblem) -> float:
    """Optimal makespan by trying every assignment (inf when none fits)."""
    best = float("inf")
    n = len(problem.load_ms)
    for device_of in itertools.product(range(problem.devices), repeat=n):
        used = [0] * problem.devices
        for item, device in enumerate(device_of):
            used[device] += problem.hbm_bytes[item]
        if max(used) <= problem.capacity_bytes:
            best = min(best, makespan(problem, device_of))
    return best


def random_problem(rng: random.Random, n: int, devices: int, tight: bool) -> PackingProblem:
    loads = tuple(round(rng.uniform(0.1, 10.0), 3) for _ in range(n))
    mem = tuple(rng.randint(1, 100) for _ in range(n))
    capacity = max(max(mem), int(sum(mem) / devices * (1.15 if tight else 3)))
    return PackingProblem(loads, mem, devices, capacity)


@pytest.mark.parametrize("seed", range(12))
def test_ilp_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    problem = random_problem(rng, n=rng.randint(2, 7), devices=rng.randint(2, 3), tight=seed % 2 == 0)
    exact = brute_force(problem)
    result = solve_packing_ilp(problem, time_limit_s=20, warm_start=best_greedy(problem))
    if exact == float("inf"):
        assert result.device_of == () and result.infeasible
        return
    assert result.proven_optimal and result.sol_status == "Optimal Solution Found"
    assert result.makespan_ms == pytest.approx(exact, rel=1e-6)
    assert result.lower_bound_ms == pytest.approx(exact, rel=1e-6)
    used = [0] * problem.devices
    for item, device in enumerate(result.device_of):
        used[device] += problem.hbm_bytes[item]
    assert max(used) <= problem.capacity_bytes


def test_memory_constraint_binds() -> None:
    # Load alone would put the two heavy items apart (makespan 6); the big item leaves
    # no room beside it, so memory forces them together.
    problem = PackingProblem(load_ms=(5.0, 5.0, 1.0), hbm_bytes=(15, 15, 70),
                             devices=2, capacity_bytes=80)
    result = solve_packing_ilp(problem, warm_start=best_greedy(problem))
    assert result.device_of[0] == result.device_of[1] != result.device_of[2]
    assert result.makespan_ms == pytest.approx(10.0) == result.lower_bound_ms


def test_infeasible_packing_reported() -> None:
    problem = PackingProblem((1.0, 1.0, 1.0), (60, 60, 60), devices=2, capacity_bytes=100)
    assert greedy_pack(problem) is None
    result = solve_packing_ilp(problem)
    assert result.device_of == () and result.infeasible and result.status == "Infeasible"


def test_pigeonhole_bound_is_tight_for_identical_items() -> None:
    # 26 identical tables on 8 devices: some device holds 4, the average says 3.25.
    assert makespan_lower_bound([1.0] * 26, 8) == pytest.approx(4.0)
    assert makespan_lower_bound([], 4) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    loads=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=7),
    devices=st.integers(1, 3),
)
def test_lower_bound_never_exceeds_a_feasible_plan(loads: list[float], devices: int) -> None:
    problem = PackingProblem(tuple(loads), tuple(1 for _ in loads), devices, len(loads))
    bound = makespan_lower_bound(loads, devices)
    assert bound <= brute_force(problem) + 1e-9
    greedy = greedy_pack(problem)
    assert greedy is not None and bound <= makespan(problem, greedy) + 1e-9


def test_unknown_solver() -> None:
    from planner import SolverError

    with pytest.raises(SolverError, match="unknown solver 'gurobi'"):
        solve_packing_ilp(PackingProblem((1.0,), (1,), 1, 1), solver="gurobi")


def test_highs_solver_agrees() -> None:
    problem = random_problem(random.Random(3), n=6, devices=3, tight=True)
    cbc = solve_packing_ilp(problem, solver="cbc")
    highs = solve_packing_ilp(problem, solver="highs")
    assert highs.makespan_ms == pytest.approx(cbc.makespan_ms, rel=1e-6)
