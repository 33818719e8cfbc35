"""The device-indexed exact ILP and the packing ILP against brute force, at the scale of
real tables: memory in bytes up to 1e10 beside loads of a few milliseconds."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest

from planner import (
    AnalyticCostModel,
    PlanOptions,
    PlannerError,
    TableSpec,
    TablesSpec,
    parse_topology,
    plan,
)
from planner.plan_file import check_plan
from planner.inputs.cost import Sharding, Tier
from planner.search.aggregate import solve_aggregate
from planner.search.exact import solve_exact, table_classes, useful_options
from planner.search.options import OptionSettings, TableOption, table_options
from planner.search.packing import PackingProblem, best_greedy, makespan, solve_packing_ilp
from planner.search.solvers import highs_available
from tests.conftest import small_topology_doc

SOLVERS = ["cbc", *(["highs"] if highs_available() else [])]
WHOLE_TABLES = OptionSettings(shardings=frozenset({Sharding.TABLE_WISE}),
                              tiers=frozenset({Tier.HBM, Tier.DRAM_CACHE}),
                              cache_fractions=(0.05, 0.2, 0.5))


def _instance(seed: int, devices: int = 2):
    """3-4 tables of 1-30 M rows (0.25-7.7 GB) on devices of 4-12 GB, whole tables in
    HBM or behind a device cache; with two tables of one shape, which the ILP merges."""
    rng = random.Random(seed)
    doc = small_topology_doc(devices=devices, hbm_gb=rng.choice([4.0, 8.0, 12.0]))
    doc["host"]["dram_gb"] = 512.0
    topology = parse_topology(doc)
    rows = [rng.randint(1_000_000, 30_000_000) for _ in range(rng.randint(2, 3))]
    rows.append(rows[0])
    tables = [TableSpec(f"t{i}", r, 64, round(rng.uniform(1, 40), 2))
              for i, r in enumerate(rows)]
    tables[-1] = TableSpec("twin", rows[0], 64, tables[0].pooling_factor)
    model = AnalyticCostModel()
    options = [table_options(t, topology, model, WHOLE_TABLES) for t in tables]
    return options, topology


def _brute_force(options: list[list[TableOption]], topology) -> float:
    """Least slowest-device time over every option and device per table (inf: none fits)."""
    best = float("inf")
    world, capacity = topology.world_size, topology.usable_hbm_bytes
    choices = [[(o, d) for o in opts for d in range(world)] for opts in options]
    for pick in itertools.product(*choices):
        load, hbm = [0.0] * world, [0] * world
        for option, device in pick:
            load[device] += option.total_ms
            hbm[device] += option.hbm_bytes
        if max(hbm) <= capacity:
            best = min(best, max(load))
    return best


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", range(8))
def test_exact_ilp_matches_brute_force_at_byte_scale(seed: int, solver: str) -> None:
    options, topology = _instance(seed)
    assert max(o.hbm_bytes for opts in options for o in opts) > 1e9
    assert len(table_classes(options)) == len(options) - 1
    exact = _brute_force(options, topology)
    result = solve_exact(options, topology, time_limit_s=30, solver=solver)
    if exact == float("inf"):
        assert result is None or not result.fits_memory
        return
    assert result is not None and result.fits_memory
    assert result.makespan_ms == pytest.approx(exact, rel=1e-6)
    # A bound above the optimum would claim more than is true.
    assert result.lower_bound_ms <= exact * (1 + 1e-6)
    if result.sol_status == "Optimal Solution Found":
        assert result.lower_bound_ms == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", range(8))
def test_aggregate_bound_never_above_brute_force_at_byte_scale(seed: int, solver: str) -> None:
    options, topology = _instance(seed)
    exact = _brute_force(options, topology)
    choice = solve_aggregate(options, topology, time_limit_s=10, solver=solver)
    if exact == float("inf"):
        return
    assert choice.choice and choice.lower_bound_ms <= exact * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_useful_options_keep_every_plan_that_beats_the_best(seed: int) -> None:
    options, topology = _instance(seed)
    exact = _brute_force(options, topology)
    if exact == float("inf"):
        return
    worse = exact * 1.05  # a best plan found so far, 5 % above the optimum
    kept = useful_options(options, topology, worse)
    assert sum(map(len, kept)) <= sum(map(len, options))
    assert _brute_force([[opts[i] for i in k] for opts, k in zip(options, kept)],
                        topology) == pytest.approx(exact)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", range(8))
def test_packing_ilp_matches_brute_force_at_byte_scale(seed: int, solver: str) -> None:
    rng = random.Random(seed)
    n, devices = rng.randint(3, 7), rng.randint(2, 3)
    loads = tuple(rng.uniform(0.001, 0.05) for _ in range(n))
    mem = tuple(rng.randint(10**8, 2 * 10**10) for _ in range(n))
    capacity = max(max(mem), int(sum(mem) / devices * (1.15 if seed % 2 else 1.6)))
    problem = PackingProblem(loads, mem, devices, capacity)
    best = float("inf")
    for device_of in itertools.product(range(devices), repeat=n):
        used = [0] * devices
        for item, device in enumerate(device_of):
            used[device] += mem[item]
        if max(used) <= capacity:
            best = min(best, makespan(problem, device_of))
    result = solve_packing_ilp(problem, time_limit_s=20, solver=solver,
                               warm_start=best_greedy(problem))
    if best == float("inf"):
        assert result.infeasible
        return
    assert result.proven_optimal
    assert result.makespan_ms == pytest.approx(best, rel=1e-6)
    used = [0] * devices
    for item, device in enumerate(result.device_of):
        used[device] += mem[item]
    assert max(used) <= capacity


@pytest.mark.parametrize("exact_solver", ["cbc", *(["highs"] if highs_available() else [])])
def test_plans_of_interchangeable_tables_are_complete(exact_solver: str) -> None:
    # Five tables of one shape (one class in the exact ILP) and one other, on 3 devices
    # too small for whole tables in HBM: every table gets its own complete layout.
    doc = small_topology_doc(devices=3, hbm_gb=12.0)
    doc["host"]["dram_gb"] = 512.0
    doc["batch_size_per_device"] = 8192
    topology = parse_topology(doc)
    same = [TableSpec(f"big{i}", 20_000_000, 128, 2.0) for i in range(5)]
    tables = TablesSpec((*same, TableSpec("other", 3_000_000, 64, 8.0)), "classes")
    exact = solve_exact([table_options(t, topology, AnalyticCostModel()) for t in tables.tables],
                        topology, time_limit_s=20, solver=exact_solver)
    assert exact is not None
    assert exact.solver == {"cbc": "PULP_CBC_CMD", "highs": "HiGHS"}[exact_solver]
    result = plan(tables, topology, options=PlanOptions(exact_solver=exact_solver, stall_s=1.0))
    check_plan(result)
    # the plan names every backend that ran, the option choice's (CBC) first
    assert result.solve.solver in ("PULP_CBC_CMD", f"PULP_CBC_CMD+{exact.solver}")
    assert {t.name for t in result.tables} == {t.name for t in tables.tables}
    assert max(d.hbm_bytes for d in result.devices) <= topology.usable_hbm_bytes


def test_unknown_exact_solver_is_a_planner_error() -> None:
    tables = TablesSpec((TableSpec("t", 1000, 8, 1.0),), "one")
    with pytest.raises(PlannerError, match="exact solver"):
        plan(tables, parse_topology(small_topology_doc()), options=PlanOptions(exact_solver="x"))


@pytest.mark.skipif(not highs_available(), reason="needs highspy")
def test_highs_prints_nothing_on_stdout() -> None:
    code = ("from planner.search.exact import solve_exact\n"
            "from tests.planner.test_exact import _instance\n"
            "options, topology = _instance(0)\n"
            "assert solve_exact(options, topology, time_limit_s=10, solver='highs')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
