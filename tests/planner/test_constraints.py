"""User constraints: parsing errors and every kind honoured by the planner."""

from __future__ import annotations

import pytest

from planner import InfeasibleError, PlanOptions, PlannerError, Sharding, SpecError, Tier
from planner import parse_tables, parse_topology, plan
from planner.inputs.constraints import parse_constraints
from planner.plan_file import check_plan
from tests.conftest import small_tables_doc, small_topology_doc

TABLES = parse_tables(small_tables_doc(num_tables=6, rows=2000, dim=32))
TOPOLOGY = parse_topology(small_topology_doc(devices=4, hosts=2, hbm_gb=0.01))


def _plan(doc: dict):
    constraints = parse_constraints(doc, TABLES, TOPOLOGY)
    result = plan(TABLES, TOPOLOGY, options=PlanOptions(time_limit_s=5, constraints=constraints))
    check_plan(result)
    return result


def _devices(result, name: str) -> set[int]:
    return {s.device for s in result.table(name).shards}


def test_allowed_options_and_max_shards() -> None:
    result = _plan({"tables": {"t0": {"shardings": ["row_wise"]},
                               "t1": {"tiers": ["store_cache"]},
                               "t2": {"max_shards": 1}}})
    assert result.table("t0").sharding is Sharding.ROW_WISE
    assert {s.tier for s in result.table("t1").shards} == {Tier.STORE_CACHE}
    assert len(result.table("t2").shards) == 1


def test_pins() -> None:
    result = _plan({"tables": {"t5": {"device": 2}, "t4": {"host": 1}, "t3": {"device": 2}}})
    assert _devices(result, "t5") == {2} and _devices(result, "t3") == {2}
    assert {d // 4 for d in _devices(result, "t4")} == {1}


def test_colocate_and_separate() -> None:
    result = _plan({"colocate": [["t1", "t4", "t5"]], "separate": [["t2", "t3"], ["t0", "t5"]]})
    assert _devices(result, "t1") == _devices(result, "t4") == _devices(result, "t5")
    assert len(_devices(result, "t1")) == 1
    assert not _devices(result, "t2") & _devices(result, "t3")
    assert not _devices(result, "t0") & _devices(result, "t5")
    assert result.solve.lower_bound_ms <= result.solve.objective_ms


def test_conflicting_constraints_are_infeasible() -> None:
    with pytest.raises(InfeasibleError, match="no sharding type and tier"):
        _plan({"tables": {"t0": {"shardings": ["row_wise"], "max_shards": 2}}})


def test_baseline_refuses_constraints() -> None:
    constraints = parse_constraints({"separate": [["t0", "t1"]]}, TABLES, TOPOLOGY)
    with pytest.raises(PlannerError, match="baselines ignore constraints"):
        plan(TABLES, TOPOLOGY, options=PlanOptions(baseline="greedy", constraints=constraints))


@pytest.mark.parametrize(
    ("doc", "field", "fragment"),
    [
        ({"tables": {"nope": {}}}, "tables.nope", "no such table"),
        ({"tables": {"t0": {"device": 8}}}, "tables.t0.device", "below the 8 devices"),
        ({"tables": {"t0": {"host": 2}}}, "tables.t0.host", "below the 2 hosts"),
        ({"tables": {"t0": {"device": 0, "host": 1}}}, "tables.t0.host", "not on host 1"),
        ({"tables": {"t0": {"shardings": ["diagonal"]}}}, "tables.t0.shardings[0]", "one of"),
        ({"tables": {"t0": {"tiers": []}}}, "tables.t0.tiers", "non-empty list"),
        ({"tables": {"t0": {"max_shards": 0}}}, "tables.t0.max_shards", ">= 1"),
        ({"tables": {"t0": {"colour": 1}}}, "tables.t0.colour", "unknown key"),
        ({"colocate": [["t0"]]}, "colocate[0]", "2 or more distinct"),
        ({"colocate": [["t0", "zz"]]}, "colocate[0]", "no such table 'zz'"),
        ({"separate": [["t0", "t1", "t2"]]}, "separate[0]", "list of 2 distinct"),
        ({"colocate": [["t0", "t1"]], "separate": [["t0", "t1"]]}, "separate", "also co-located"),
        ({"colocate": [["t0", "t1"]], "tables": {"t0": {"shardings": ["row_wise"]}}},
         "colocate", "must allow table_wise"),
        ({"pins": {}}, "pins", "unknown key"),
    ],
)
def test_constraint_errors(doc: dict, field: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_constraints(doc, TABLES, TOPOLOGY)
    assert info.value.field == field
    assert fragment in str(info.value)
