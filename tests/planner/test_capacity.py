"""Capacity planning: the fewest hosts against brute force over host counts, the proof
at one host fewer, and the errors."""

from __future__ import annotations

import math

import pytest

from planner import (
    AnalyticCostModel,
    CapacityResult,
    InfeasibleError,
    PlannerError,
    PlanOptions,
    TargetUnreachableError,
    capacity,
    parse_tables,
    parse_topology,
    plan,
)
from planner.inputs.constraints import Constraints, TableRules
from planner.inputs.cost import Tier
from planner.search.options import OptionSettings
from planner.tools.capacity import lower_bound, sweep, topology_for
from tests.conftest import small_tables_doc, small_topology_doc

BATCH = 512
MAX_HOSTS = 4
TABLES = parse_tables(small_tables_doc(num_tables=6, rows=2000, dim=16))
ROOMY = parse_topology({**small_topology_doc(devices=2, hbm_gb=0.01),
                        "network": {"intra_host_gbps": 50.0, "inter_host_gbps": 7.0}})
"""Hosts of 2 devices with room for every table in HBM, on a network slow enough that
2 hosts are slower than 1."""
TIGHT = parse_topology(small_topology_doc(devices=2, hbm_gb=0.00045))
"""Hosts of 2 devices of 450 kB (the tables and their per-step id and output buffers):
with HBM alone the tables need 4 hosts."""
HBM_ONLY = PlanOptions(time_limit_s=10, candidates=OptionSettings(tiers=frozenset({Tier.HBM})),
                       gap=0.0)
OPTIONS = PlanOptions(time_limit_s=10, gap=0.0)
"""Exact plans (no early stop at a gap), as the brute force needs."""


def _brute_force(topology, options) -> dict[int, float | None]:
    """The planner's slowest device on each host count (None: no plan)."""
    out: dict[int, float | None] = {}
    for hosts in range(1, MAX_HOSTS + 1):
        try:
            p = plan(TABLES, topology_for(topology, hosts, BATCH), options=options)
        except InfeasibleError:
            out[hosts] = None
            continue
        assert p.solve.sol_status == "Optimal Solution Found"  # the brute force is exact
        out[hosts] = p.solve.objective_ms
    return out


@pytest.fixture(scope="module")
def roomy_objectives() -> dict[int, float | None]:
    return _brute_force(ROOMY, OPTIONS)


def test_topology_for_splits_the_global_batch_rounding_up() -> None:
    three = topology_for(ROOMY, 3, 1000)
    assert (three.hosts, three.world_size, three.batch_size_per_device) == (3, 6, 167)
    assert three.devices_per_host == ROOMY.devices_per_host and three.device == ROOMY.device


def test_bound_never_exceeds_the_optimal_plan(roomy_objectives) -> None:
    model = AnalyticCostModel()
    for hosts, objective in roomy_objectives.items():
        bound = lower_bound(TABLES, topology_for(ROOMY, hosts, BATCH), model)
        assert objective is not None and bound.lower_bound_ms is not None
        assert 0 < bound.lower_bound_ms <= objective * (1 + 1e-9)


def test_answer_matches_brute_force_for_every_target(roomy_objectives) -> None:
    values = sorted(v for v in roomy_objectives.values() if v is not None)
    # The time of one host count is not monotone in hosts here (2 hosts send over the
    # slower network): the brute-force answer jumps around as the target moves.
    assert roomy_objectives[2] > roomy_objectives[1] > roomy_objectives[4]
    targets = [v * (1 + 1e-6) for v in values] + [(a + b) / 2 for a, b in zip(values, values[1:])]
    answers = set()
    for target in targets:
        expected = min(h for h, v in roomy_objectives.items() if v is not None and v <= target)
        result = capacity(TABLES, ROOMY, BATCH, target, max_hosts=MAX_HOSTS, options=OPTIONS)
        answers.add(result.hosts)
        assert result.hosts == expected, target
        assert result.devices == expected * ROOMY.devices_per_host
        assert result.batch_size_per_device == math.ceil(BATCH / result.devices)
        assert result.objective_ms <= target
        assert result.proven and result.all_fewer_excluded
        if expected > 1:
            assert result.lower_bound_ms_with_fewer > target
            assert result.fewer.hosts == expected - 1
        else:
            assert result.fewer is None and result.lower_bound_ms_with_fewer is None
    assert len(answers) >= 2


def test_report_json_fields(roomy_objectives) -> None:
    target = roomy_objectives[4] * (1 + 1e-6)
    result = capacity(TABLES, ROOMY, BATCH, target, max_hosts=MAX_HOSTS, options=OPTIONS)
    doc = result.to_json("p.json")
    assert doc["devices"] == 8 and doc["hosts"] == 4 and doc["plan"] == "p.json"
    assert doc["objective_ms"] == result.plan.solve.objective_ms <= target
    assert doc["lower_bound_ms_with_fewer"] > target and doc["status"] == "proven"
    assert doc["infeasible_with_fewer"] is False
    assert [b["hosts"] for b in doc["bounds"]] == [1, 2, 3, 4]
    assert result.plan.topology.world_size == 8


def test_fewer_hosts_infeasible_is_the_proof() -> None:
    expected = _brute_force(TIGHT, HBM_ONLY)
    assert [expected[h] is None for h in range(1, 5)] == [True, True, True, False]
    result = capacity(TABLES, TIGHT, BATCH, expected[4] * 2, max_hosts=MAX_HOSTS, options=HBM_ONLY)
    assert result.hosts == 4 and result.proven
    assert result.fewer.infeasible and result.lower_bound_ms_with_fewer is None
    doc = result.to_json()
    assert doc["infeasible_with_fewer"] is True and "cannot hold" in doc["proof"]


def test_unreachable_target_raises_with_the_fastest_found(roomy_objectives) -> None:
    fastest = min(v for v in roomy_objectives.values() if v is not None)
    with pytest.raises(TargetUnreachableError) as caught:
        capacity(TABLES, ROOMY, BATCH, fastest * 0.999, max_hosts=MAX_HOSTS, options=OPTIONS)
    assert caught.value.max_hosts == MAX_HOSTS
    # The bounds exclude every host count here, so nothing was planned.
    assert "every bound exceeds it" in str(caught.value)
    # Between one host's bound and its plan: the planner runs there and misses; two
    # hosts are excluded by their bound.
    one = lower_bound(TABLES, topology_for(ROOMY, 1, BATCH), AnalyticCostModel())
    target = (one.lower_bound_ms + roomy_objectives[1]) / 2
    assert one.lower_bound_ms < target < roomy_objectives[1]
    with pytest.raises(TargetUnreachableError) as caught:
        capacity(TABLES, ROOMY, BATCH, target, max_hosts=2, options=OPTIONS)
    assert caught.value.best.hosts == 1
    assert caught.value.best.objective_ms == pytest.approx(roomy_objectives[1])
    assert "the fastest, on 1 host(s)" in str(caught.value) and "Raise --max-hosts" in str(
        caught.value)


def test_unproven_when_the_bound_below_does_not_exclude(roomy_objectives) -> None:
    """A result whose bound at one host fewer is not above the target is reported as
    unproven (the scan returns such a result when the planner missed a plan there)."""
    model = AnalyticCostModel()
    one = lower_bound(TABLES, topology_for(ROOMY, 1, BATCH), model)
    two = plan(TABLES, topology_for(ROOMY, 2, BATCH), options=OPTIONS)
    target = two.solve.objective_ms
    assert one.lower_bound_ms < target
    result = CapacityResult(2, 2, BATCH, target, two, bounds=(one,), trials=(), seconds=0.0)
    assert result.fewer is one and not result.proven and not result.all_fewer_excluded
    doc = result.to_json()
    assert doc["status"] == "unproven" and doc["proof"].startswith("not proven")
    assert doc["lower_bound_ms_with_fewer"] == one.lower_bound_ms
    excluded = CapacityResult(2, 2, BATCH, one.lower_bound_ms * 0.5, two, bounds=(one,),
                              trials=(), seconds=0.0)
    assert excluded.proven and excluded.to_json()["status"] == "proven"


@pytest.mark.parametrize("kwargs, message", [
    ({"global_batch": 0}, "global batch"),
    ({"target_ms": 0.0}, "target"),
    ({"target_ms": math.inf}, "target"),
    ({"max_hosts": 0}, "host count limit"),
    ({"options": PlanOptions(baseline="greedy")}, "baseline"),
    ({"options": PlanOptions(constraints=Constraints({"t0": TableRules(device=0)}))},
     "constraints"),
])
def test_bad_arguments(kwargs, message) -> None:
    args = {"global_batch": BATCH, "target_ms": 1.0, "max_hosts": 2, "options": OPTIONS} | kwargs
    with pytest.raises(PlannerError, match=message):
        capacity(TABLES, ROOMY, args["global_batch"], args["target_ms"],
                 max_hosts=args["max_hosts"], options=args["options"])


def test_sweep_plans_each_host_count(roomy_objectives) -> None:
    trials = sweep(TABLES, ROOMY, BATCH, [1, 3], options=OPTIONS)
    assert [t.hosts for t in trials] == [1, 3]
    for t in trials:
        assert t.objective_ms == pytest.approx(roomy_objectives[t.hosts], rel=1e-9)
        assert t.samples_per_s == pytest.approx(BATCH / (t.objective_ms / 1e3))
