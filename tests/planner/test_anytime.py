"""The anytime stopping rule: gap reached, optimal, stalled, time limit; solvers
stopped while they run."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import pulp
import pytest

from planner import PlanOptions, load_tables, load_topology, plan
from planner.inputs.specs import DeviceSpec
from planner.plan_file import StopReason
from planner.search.anytime import SearchProgress, work_seconds
from planner.search.solvers import solve

ROOT = Path(__file__).resolve().parents[2]


def bench_topology(devices: int, hbm_gb: float, batch_size_per_device: int):
    """One host of ``devices`` devices with the shared example's bandwidths."""
    base = load_topology(ROOT / "examples" / "criteo_kaggle.topology.json")
    return replace(base, hosts=1, devices_per_host=devices,
                   device=DeviceSpec(hbm_gb, base.device.hbm_gbps),
                   batch_size_per_device=batch_size_per_device,
                   reserved_hbm_gb=min(base.reserved_hbm_gb, hbm_gb / 4))


class Clock:
    """A hand-driven clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _progress(gap: float = 0.01, stall_s: float = 3.0, limit: float = 60.0):
    wall, work = Clock(), Clock()
    return SearchProgress(limit, gap, stall_s, clock=wall, work=work), wall, work


def test_stops_when_the_gap_is_reached() -> None:
    progress, _, _ = _progress(gap=0.01)
    assert progress.stop() is None  # no plan, no bound yet
    progress.found(10.3)
    progress.bounded(10.0)
    assert progress.current_gap == pytest.approx(0.03)
    assert progress.stop() is None
    progress.found(10.05)
    assert progress.stop() is StopReason.GAP_REACHED
    progress.bounded(10.05)
    assert progress.stop() is StopReason.OPTIMAL


def test_stalls_after_the_window_of_work_without_improvement() -> None:
    progress, wall, work = _progress(stall_s=3.0)
    progress.found(12.0)
    progress.bounded(10.0)
    work.now, wall.now = 2.9, 20.0
    assert progress.stop() is None  # the wall clock alone does not stall the search
    assert progress.found(11.0)  # an improvement restarts the window
    work.now = 5.8
    assert progress.stop() is None
    assert not progress.found(11.0 * (1 - 1e-9))  # log rounding is no improvement
    assert not progress.bounded(10.0)
    work.now = 6.0
    assert progress.stop() is StopReason.STALLED


def test_time_limit_is_wall_clock() -> None:
    progress, wall, work = _progress(limit=5.0)
    progress.found(12.0)
    wall.now = 4.0
    assert progress.left_s() == pytest.approx(1.0)
    assert progress.stop() is None
    wall.now = 5.0
    assert progress.stop() is StopReason.TIME_LIMIT
    assert progress.left_s() == 0.0


def test_outcome_when_the_stages_run_out() -> None:
    progress, _, _ = _progress(gap=0.0)
    progress.found(12.0)
    progress.bounded(10.0)
    assert progress.stop() is None
    assert progress.outcome() is StopReason.STALLED


def test_watch_takes_plans_only_when_told() -> None:
    progress, _, _ = _progress(gap=0.01)
    relaxed = progress.watch(plans=False)
    assert not relaxed(10.0, 9.99)  # the incumbent of a relaxation is no plan
    assert progress.best_ms == math.inf and progress.bound_ms == 9.99
    exact = progress.watch(plans=True)
    assert exact(10.0, None)  # now a plan within 1 % of the bound exists
    assert progress.stop() is StopReason.GAP_REACHED


def test_work_seconds_counts_cpu_not_sleep() -> None:
    before = work_seconds()
    time.sleep(0.2)
    assert work_seconds() - before < 0.1
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert work_seconds() - before >= 0.15


def _long_mip(name: str = "long") -> pulp.LpProblem:
    """A makespan problem CBC cannot close fast: 40 items of near-equal odd loads on
    7 devices, no symmetry breaking."""
    loads = [1000 + (37 * i * i) % 101 for i in range(40)]
    prob = pulp.LpProblem(name, pulp.LpMinimize)
    keys = [(i, d) for i in range(len(loads)) for d in range(7)]
    x = prob.add_variable_dicts("x", keys, cat=pulp.LpBinary)
    z = prob.add_variable("z", lowBound=0)
    prob += z
    for i in range(len(loads)):
        prob += (pulp.lpSum(x[i, d] for d in range(7)) == 1, f"one_{i}")
    for d in range(7):
        prob += (pulp.lpSum(loads[i] * x[i, d] for i in range(len(loads))) - z <= 0, f"load_{d}")
    return prob


@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_a_watch_stops_the_solver_with_its_incumbent(solver: str) -> None:
    seen: list[tuple[float | None, float | None]] = []

    def watch(incumbent: float | None, bound: float | None) -> bool:
        seen.append((incumbent, bound))
        return incumbent is not None

    prob = _long_mip()
    start = time.perf_counter()
    outcome = solve(prob, solver=solver, time_limit_s=60.0, watch=watch)
    assert time.perf_counter() - start < 30.0
    assert outcome.stopped_early and outcome.has_solution and not outcome.proven_optimal
    assert any(incumbent is not None for incumbent, _ in seen)
    assert pulp.value(prob.objective) > 0


def test_an_unwatched_solve_is_not_stopped() -> None:
    prob = _long_mip()
    outcome = solve(prob, solver="cbc", time_limit_s=1.0)
    assert not outcome.stopped_early and outcome.has_solution


TERABYTE = ROOT / "examples" / "criteo_terabyte.tables.json"


def test_plan_stops_at_the_gap_with_its_certificate() -> None:
    tables = load_tables(TERABYTE)
    result = plan(tables, bench_topology(4, hbm_gb=24.0, batch_size_per_device=8192),
                  options=PlanOptions(time_limit_s=120.0, gap=0.5, stall_s=30.0))
    s = result.solve
    assert s.stop_reason in (StopReason.GAP_REACHED, StopReason.OPTIMAL)
    assert s.gap is not None and s.gap <= 0.5 and s.target_gap == 0.5
    assert s.lower_bound_ms <= s.objective_ms
    assert s.solve_seconds < 60.0


def test_plan_stops_when_the_search_stalls() -> None:
    # 4 x 4 GB: the packing ILP and the exact ILP improve neither the plan nor the
    # bound (1.7 % apart), so only the stall window or the time limit ends them.
    tables = load_tables(TERABYTE)
    result = plan(tables, bench_topology(4, hbm_gb=4.0, batch_size_per_device=8192),
                  options=PlanOptions(time_limit_s=120.0, gap=0.0, stall_s=0.5))
    s = result.solve
    assert s.stop_reason is StopReason.STALLED
    assert s.status == "Feasible" and s.gap > 0
    assert s.solve_seconds < 60.0


def test_small_plans_are_proven_optimal() -> None:
    from tests.conftest import small_tables_doc, small_topology_doc
    from planner import parse_tables, parse_topology

    result = plan(parse_tables(small_tables_doc()), parse_topology(small_topology_doc()),
                  options=PlanOptions(gap=0.0))
    assert result.solve.stop_reason is StopReason.OPTIMAL
    assert result.solve.status == "Optimal" and result.solve.gap == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("field, value", [("gap", -0.1), ("gap", math.nan), ("stall_s", 0.0),
                                          ("time_limit_s", 0.0)])
def test_bad_stopping_options(field: str, value: float) -> None:
    from planner import PlannerError, parse_tables, parse_topology
    from tests.conftest import small_tables_doc, small_topology_doc

    with pytest.raises(PlannerError):
        plan(parse_tables(small_tables_doc()), parse_topology(small_topology_doc()),
             options=replace(PlanOptions(), **{field: value}))
