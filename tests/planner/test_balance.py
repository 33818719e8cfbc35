"""Pairwise rebalancing: never worse, memory respected, near-optimal where
longest-first is not, and the planner's gap at few tables per device."""

from __future__ import annotations

import math
import random
import time

import pytest

from planner import (
    AccessProfile,
    PlanOptions,
    TableSpec,
    TablesSpec,
    parse_topology,
    plan,
)
from planner.search.balance import BalanceProblem, balance_pairs
from planner.search.packing import PackingProblem, greedy_pack
from tests.conftest import small_topology_doc


def _loads(problem: BalanceProblem, device_of: tuple[int, ...]) -> list[float]:
    loads = list(problem.base_load_ms)
    for item, device in enumerate(device_of):
        loads[device] += problem.load_ms[item]
    return loads


def _memory_ok(problem: BalanceProblem, device_of: tuple[int, ...]) -> bool:
    hbm, dram = list(problem.base_hbm_bytes), list(problem.base_dram_bytes)
    for item, device in enumerate(device_of):
        hbm[device] += problem.hbm_bytes[item]
        dram[device // problem.devices_per_host] += problem.dram_bytes[item]
    return max(hbm) <= problem.hbm_capacity_bytes and max(dram) <= problem.dram_capacity_bytes


def _random_instance(rng: random.Random) -> tuple[BalanceProblem, tuple[int, ...]]:
    """Items placed at random where they fit, with fixed loads and tight memory."""
    per_host, hosts = rng.randint(1, 4), rng.randint(1, 3)
    devices = per_host * hosts
    n = rng.randint(1, 5 * devices)
    hbm = [rng.randint(0, 50) for _ in range(n)]
    dram = [rng.choice((0, 0, rng.randint(1, 40))) for _ in range(n)]
    base_hbm = [rng.randint(0, 20) for _ in range(devices)]
    base_dram = [rng.randint(0, 20) for _ in range(hosts)]
    hbm_cap = max(base_hbm) + max(hbm) + int(sum(hbm) / devices * rng.uniform(1.0, 1.6))
    dram_cap = max(base_dram) + max(dram) + int(sum(dram) / hosts * rng.uniform(1.0, 1.6))
    used, host_used, device_of = list(base_hbm), list(base_dram), []
    for i in range(n):
        fitting = [d for d in range(devices) if used[d] + hbm[i] <= hbm_cap
                   and host_used[d // per_host] + dram[i] <= dram_cap]
        if not fitting:
            return _random_instance(rng)
        d = rng.choice(fitting)
        used[d] += hbm[i]
        host_used[d // per_host] += dram[i]
        device_of.append(d)
    problem = BalanceProblem(
        tuple(round(rng.uniform(0.1, 10.0), 3) for _ in range(n)), tuple(hbm), tuple(dram),
        tuple(round(rng.uniform(0.0, 5.0), 3) for _ in range(devices)), tuple(base_hbm),
        tuple(base_dram), hbm_cap, dram_cap, per_host)
    return problem, tuple(device_of)


@pytest.mark.parametrize("seed", range(40))
def test_never_worse_and_memory_respected(seed: int) -> None:
    problem, start = _random_instance(random.Random(seed))
    result = balance_pairs(problem, start, deadline=time.perf_counter() + 10, max_items=6)
    assert len(result) == len(start)
    assert all(0 <= d < len(problem.base_load_ms) for d in result)
    assert _memory_ok(problem, result)
    assert max(_loads(problem, result)) <= max(_loads(problem, start)) + 1e-9
    # same seed, same answer
    assert balance_pairs(problem, start, deadline=time.perf_counter() + 10, max_items=6) == result


def test_near_optimal_where_longest_first_is_not() -> None:
    """Devices of four items of at least 15 that sum to exactly 100 each, shuffled: the
    optimum is 100. Longest-first lands far above it; re-splitting pairs gets within
    0.5 %."""
    rng = random.Random(7)
    devices, items = 200, []
    for _ in range(devices):
        cuts = sorted(rng.uniform(0, 40) for _ in range(3))
        items += [15 + b - a for a, b in zip([0.0, *cuts], [*cuts, 40.0])]
    rng.shuffle(items)
    n = len(items)
    greedy = greedy_pack(PackingProblem(tuple(items), (0,) * n, devices, 1))
    assert greedy is not None
    problem = BalanceProblem(tuple(items), (0,) * n, (0,) * n, (0.0,) * devices,
                             (0,) * devices, (0,), 1, 0, devices)
    assert max(_loads(problem, greedy)) > 107
    result = balance_pairs(problem, greedy, deadline=time.perf_counter() + 60)
    assert max(_loads(problem, result)) <= 100.5


def test_nothing_to_move() -> None:
    problem = BalanceProblem((), (), (), (1.0, 2.0), (0, 0), (0,), 1, 1, 2)
    assert balance_pairs(problem, (), deadline=time.perf_counter() + 1) == ()


def test_plan_gap_with_few_tables_per_device() -> None:
    """Four tables per device, each with a cost floor (its all-to-all) near a quarter
    of its largest cost: moves and swaps alone certified 0.8 % here, re-splitting pairs
    brings the certified gap under 0.3 %, and the objective is the plan's slowest
    device."""
    rng = random.Random(1)
    tables = TablesSpec(tuple(
        TableSpec(f"t{i}", rng.randint(1_000, 50_000), 16,
                  round(math.exp(rng.uniform(0.0, math.log(20.0))), 2),
                  access=AccessProfile(zipf=1.0))
        for i in range(256)))
    topology = parse_topology(small_topology_doc(devices=8, hosts=8, hbm_gb=1.0))
    result = plan(tables, topology, options=PlanOptions(time_limit_s=60))
    assert result.solve.gap <= 0.003
    assert result.solve.objective_ms == pytest.approx(max(d.load_ms for d in result.devices))
