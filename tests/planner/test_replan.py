"""Re-planning under a migration budget: the budget is honoured (recounted by the diff),
budget 0 keeps the old placement, no limit is at least as good as the fresh plan."""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import pytest

from planner import (
    PlannerError,
    PlanOptions,
    diff_plans,
    parse_tables,
    parse_topology,
    plan,
    replan,
)
from planner.inputs.cost import AnalyticCostModel
from planner.tools.evaluate import evaluate_plan
from planner.tools.replan import align_devices
from tests.conftest import small_tables_doc, small_topology_doc

OPTIONS = PlanOptions(time_limit_s=5)
DOC = small_tables_doc(num_tables=8, rows=2000, dim=16)
OLD_TABLES = parse_tables(DOC)
DRIFTED_DOC = copy.deepcopy(DOC)
for _i, _t in enumerate(DRIFTED_DOC["tables"]):
    _t["pooling_factor"] = [8.0, 0.5, 4.0, 1.0, 0.25, 6.0, 1.0, 2.0][_i]
    _t["access"] = {"zipf": 0.6}
DRIFTED = parse_tables(DRIFTED_DOC)
"""The same tables with other pooling factors and a flatter access profile."""
TOPOLOGY = parse_topology(small_topology_doc(devices=2, hosts=2, hbm_gb=0.01))


@pytest.fixture(scope="module")
def old():
    return plan(OLD_TABLES, TOPOLOGY, options=OPTIONS)


@pytest.fixture(scope="module")
def unlimited(old):
    return replan(old, DRIFTED, TOPOLOGY, options=OPTIONS)


def _layout(p):
    return {t.name: sorted((s.device, s.row_start, s.row_end, s.col_start, s.col_end, s.tier.value)
                           for s in t.shards) for t in p.tables}


def test_staying_is_the_old_placement_recosted(old, unlimited) -> None:
    moved = replace(old, tables_spec=DRIFTED)
    expected = evaluate_plan(moved, AnalyticCostModel(), "planner:AnalyticCostModel")
    assert unlimited.stay.solve.objective_ms == pytest.approx(expected.solve.objective_ms)
    assert _layout(unlimited.stay) == _layout(old)
    assert unlimited.stay_fits


def test_no_limit_is_at_least_as_good_as_the_fresh_plan(unlimited) -> None:
    assert unlimited.fresh is not None and not unlimited.kept_old
    assert unlimited.plan.solve.objective_ms <= unlimited.fresh.solve.objective_ms * (1 + 1e-6)
    assert unlimited.gain_ms > 0
    assert unlimited.gain == pytest.approx(unlimited.gain_ms / unlimited.stay.solve.objective_ms)
    assert unlimited.plan.solve.lower_bound_ms <= unlimited.plan.solve.objective_ms


def test_budget_zero_keeps_the_old_placement(old, unlimited) -> None:
    result = replan(old, DRIFTED, TOPOLOGY, max_migrate_bytes=0, options=OPTIONS)
    assert result.migrated_bytes == 0 == diff_plans(old, result.plan).migrated_bytes
    assert _layout(result.plan) == _layout(old)
    assert result.plan.solve.objective_ms <= result.stay.solve.objective_ms


def test_budget_is_honoured_and_buys_gain(old, unlimited) -> None:
    full = unlimited.migrated_bytes
    assert full > 0
    gains = {}
    for budget in (full // 8, full // 3, full):
        result = replan(old, DRIFTED, TOPOLOGY, max_migrate_bytes=budget, options=OPTIONS)
        counted = diff_plans(old, result.plan).migrated_bytes
        assert counted == result.migrated_bytes <= budget
        assert result.plan.solve.objective_ms <= result.stay.solve.objective_ms
        gains[budget] = result.gain_ms
    # A third of the fresh plan's migration already buys part of its gain (the search
    # mixes old and fresh layouts within the budget, not all or nothing).
    assert 0 < gains[full // 3] < unlimited.gain_ms
    assert gains[full] == pytest.approx(unlimited.gain_ms)


def test_aligned_devices_keep_hosts_together(old) -> None:
    """A plan whose devices are the old plan's renumbered (hosts swapped, devices
    swapped inside them) aligns back to moving nothing."""
    swap = {0: 3, 1: 2, 2: 1, 3: 0}
    shuffled = [replace(t, shards=tuple(replace(s, device=swap[s.device]) for s in t.shards))
                for t in (old.table(x.name) for x in OLD_TABLES.tables)]
    device = align_devices(OLD_TABLES, old, shuffled, TOPOLOGY)
    assert sorted(device) == [0, 1, 2, 3]
    assert {TOPOLOGY.host_of(device[d]) for d in (0, 1)} in ({0}, {1})
    back = {t.name: [replace(s, device=device[s.device]) for s in t.shards] for t in shuffled}
    assert {n: sorted((s.device, s.row_start, s.col_start) for s in v) for n, v in back.items()} \
        == {t.name: sorted((s.device, s.row_start, s.col_start) for s in t.shards)
            for t in old.tables}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["tables"][0].update(num_embeddings=999), "changed shape"),
    (lambda d: d["tables"].pop(), "keeps the tables"),
])
def test_incompatible_tables(old, change, message) -> None:
    doc = copy.deepcopy(DRIFTED_DOC)
    change(doc)
    with pytest.raises(PlannerError, match=message):
        replan(old, parse_tables(doc), TOPOLOGY, options=OPTIONS)


def test_bad_budget_and_topology(old) -> None:
    with pytest.raises(PlannerError, match="budget"):
        replan(old, DRIFTED, TOPOLOGY, max_migrate_bytes=-1, options=OPTIONS)
    other = parse_topology(small_topology_doc(devices=4, hosts=1, hbm_gb=0.01))
    with pytest.raises(PlannerError, match="keeps the devices"):
        replan(old, DRIFTED, other, options=OPTIONS)
    with pytest.raises(PlannerError, match="baseline"):
        replan(old, DRIFTED, TOPOLOGY, options=PlanOptions(baseline="greedy"))


def test_a_larger_budget_never_gives_a_slower_plan(old, unlimited) -> None:
    """Budgets from 0 to the fresh plan's migration: the slowest device never rises
    (the assignment ILP proves each answer optimal over budget-independent layouts,
    and a smaller budget's answer is feasible for every larger one)."""
    full = unlimited.fresh_migrated_bytes
    assert full > 0
    objectives = []
    for step in range(13):
        # a budget that no busy machine uses up (the stages stop on their own first)
        result = replan(old, DRIFTED, TOPOLOGY, max_migrate_bytes=full * step // 12,
                        options=PlanOptions(time_limit_s=120))
        assert result.optimal
        assert result.migrated_bytes <= full * step // 12
        objectives.append(result.plan.solve.objective_ms)
    for smaller, larger in itertools.pairwise(objectives):
        assert larger <= smaller
    assert objectives[-1] <= unlimited.fresh.solve.objective_ms
    assert objectives[0] > objectives[-1]
