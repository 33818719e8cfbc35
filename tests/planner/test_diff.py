"""Plan diff on hand-made plans: exact bytes per device, kinds of change, load changes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planner import AnalyticCostModel, Plan, Shard, Sharding, Tier, parse_tables, parse_topology
from planner.inputs.cost import ShardCost
from planner.plan_file import SolveReport, TablePlan
from planner.tools.diff import ChangeKind, diff_plans, shard_bytes, table_migration
from planner.tools.evaluate import evaluate_plan
from tests.conftest import small_tables_doc, small_topology_doc

DOC = small_tables_doc(num_tables=6, rows=500, dim=8)
DOC["tables"][2]["optimizer"] = "rowwise_adagrad"
TABLES = parse_tables(DOC)
"""t0..t5 with 500, 1000, ..., 3000 rows of 8 fp32; t2 keeps 4 bytes of state per row."""
TOPOLOGY = parse_topology(small_topology_doc(devices=2, hbm_gb=0.01))
ROW = 8 * 4


def _plan(layout: dict[str, tuple[Sharding, list[Shard]]]) -> Plan:
    """A hand-made plan, costed by the analytic model."""
    zero = ShardCost(0.0, 0.0, 0.0, 0.0, 0, 0)
    tables = tuple(TablePlan(name, sharding, tuple(shards), zero)
                   for name, (sharding, shards) in layout.items())
    report = SolveReport("hand", "none", "Hand", "Not Solved", 0.0, 0.0, 0.0, 0.0, 1)
    blank = Plan(TABLES, TOPOLOGY, "hand", tables, (), report)
    return evaluate_plan(blank, AnalyticCostModel(), "planner:AnalyticCostModel")


def _whole(device: int, rows: int, tier: Tier = Tier.HBM, cache: int = 0) -> list[Shard]:
    return [Shard(device, 0, rows, 0, 8, tier, cache)]


OLD = _plan({
    "t0": (Sharding.TABLE_WISE, _whole(0, 500)),
    "t1": (Sharding.ROW_WISE, [Shard(0, 0, 500, 0, 8), Shard(1, 500, 1000, 0, 8)]),
    "t2": (Sharding.TABLE_WISE, _whole(0, 1500)),
    "t3": (Sharding.COLUMN_WISE, [Shard(0, 0, 2000, 0, 4), Shard(1, 0, 2000, 4, 8)]),
    "t4": (Sharding.TABLE_WISE, _whole(1, 2500, Tier.DRAM_CACHE, 50)),
    "t5": (Sharding.DATA_PARALLEL, [Shard(0, 0, 3000, 0, 8), Shard(1, 0, 3000, 0, 8)]),
})
NEW = _plan({
    "t0": (Sharding.TABLE_WISE, _whole(1, 500)),                               # moves whole
    "t1": (Sharding.ROW_WISE, [Shard(0, 0, 400, 0, 8), Shard(1, 400, 1000, 0, 8)]),  # 100 rows
    "t2": (Sharding.TABLE_WISE, _whole(0, 1500, Tier.DRAM_CACHE, 100)),        # tier change
    "t3": (Sharding.TABLE_WISE, _whole(0, 2000)),                              # half arrives
    "t4": (Sharding.TABLE_WISE, _whole(1, 2500, Tier.DRAM_CACHE, 200)),        # cache resized
    "t5": (Sharding.TABLE_WISE, _whole(1, 3000)),                              # a replica stays
})


def test_shard_bytes_count_optimizer_state() -> None:
    assert shard_bytes(TABLES.tables[0], 10, 8) == 10 * ROW
    assert shard_bytes(TABLES.tables[2], 10, 8) == 10 * (ROW + 4)
    assert shard_bytes(TABLES.tables[0], 0, 8) == 0


def test_bytes_per_device_exact() -> None:
    diff = diff_plans(OLD, NEW)
    arriving = {
        0: 1500 * (ROW + 4) + 2000 * 4 * 4,   # t2 into DRAM; t3's other half of the columns
        1: 500 * ROW + 100 * ROW,             # t0; t1's rows 400..500
    }
    leaving = {
        0: 500 * ROW + 100 * ROW + 1500 * (ROW + 4) + 3000 * ROW,  # t0, t1, t2, t5's replica
        1: 2000 * 4 * 4,                                           # t3's columns 4..8
    }
    assert {d.device: d.bytes_in for d in diff.devices} == arriving
    assert {d.device: d.bytes_out for d in diff.devices} == leaving
    assert diff.migrated_bytes == sum(arriving.values())


def test_kinds_and_moved_tables() -> None:
    diff = diff_plans(OLD, NEW)
    kinds = {t.name: t.kind for t in diff.tables}
    assert kinds == {"t0": ChangeKind.MOVED, "t1": ChangeKind.MOVED, "t2": ChangeKind.MOVED,
                     "t3": ChangeKind.MOVED, "t4": ChangeKind.RESHARDED,
                     "t5": ChangeKind.RESHARDED}
    assert [t.name for t in diff.moved] == ["t0", "t1", "t2", "t3"]
    moved = {t.name: t.moved_bytes for t in diff.tables}
    assert moved == {"t0": 500 * ROW, "t1": 100 * ROW, "t2": 1500 * (ROW + 4),
                     "t3": 2000 * 16, "t4": 0, "t5": 0}
    t3 = next(t for t in diff.tables if t.name == "t3")
    assert (t3.old_sharding, t3.new_sharding) == (Sharding.COLUMN_WISE, Sharding.TABLE_WISE)
    assert (t3.old_devices, t3.new_devices) == ((0, 1), (0,))


def test_predicted_change_per_device_and_slowest() -> None:
    diff = diff_plans(OLD, NEW)
    for d in diff.devices:
        assert d.old_load_ms == OLD.devices[d.device].load_ms
        assert d.new_load_ms == NEW.devices[d.device].load_ms
        assert d.delta_ms == pytest.approx(d.new_load_ms - d.old_load_ms)
    assert diff.old_objective_ms == OLD.solve.objective_ms
    assert diff.new_objective_ms == NEW.solve.objective_ms
    assert diff.objective_change == pytest.approx(
        NEW.solve.objective_ms / OLD.solve.objective_ms - 1)
    assert diff.same_tables_spec and diff.same_topology and diff.same_cost_model
    doc = diff.to_json()
    assert doc["migrated_bytes"] == diff.migrated_bytes
    assert doc["tables_moved"] == ["t0", "t1", "t2", "t3"]
    assert {t["name"] for t in doc["tables"]} == {"t0", "t1", "t2", "t3", "t4", "t5"}


def test_identical_and_reverse() -> None:
    same = diff_plans(OLD, OLD)
    assert same.migrated_bytes == 0 and not same.changed
    assert all(d.delta_ms == 0 for d in same.devices)
    back = diff_plans(NEW, OLD)
    # Back: t5 is replicated again (one replica arrives on device 0), t3's columns
    # 4..8 return to device 1, t2 returns to HBM, t1's rows 400..500 and t0 go home.
    assert {d.device: d.bytes_in for d in back.devices} == {
        0: 500 * ROW + 100 * ROW + 1500 * (ROW + 4) + 3000 * ROW, 1: 2000 * 16}


def test_table_migration_partial_row_overlap() -> None:
    spec = TABLES.tables[1]
    arriving, leaving = table_migration(
        spec, [Shard(0, 0, 600, 0, 8), Shard(1, 600, 1000, 0, 8)],
        [Shard(1, 0, 300, 0, 8), Shard(0, 300, 1000, 0, 8)])
    assert dict(arriving) == {1: 300 * ROW, 0: 400 * ROW}
    assert dict(leaving) == {0: 300 * ROW, 1: 400 * ROW}


def test_added_removed_and_replaced_tables() -> None:
    doc = small_tables_doc(num_tables=6, rows=500, dim=8)
    doc["tables"][2]["optimizer"] = "rowwise_adagrad"
    doc["tables"][0]["num_embeddings"] = 700        # t0 changes shape
    doc["tables"][5]["name"] = "t9"                  # t5 removed, t9 added
    other = parse_tables(doc)
    renamed = replace(NEW, tables_spec=other, tables=tuple(
        replace(t, name="t9") if t.name == "t5" else t for t in NEW.tables))
    renamed = replace(renamed, tables=tuple(
        replace(t, shards=(Shard(1, 0, 700, 0, 8),)) if t.name == "t0" else t
        for t in renamed.tables))
    diff = diff_plans(OLD, renamed)
    kinds = {t.name: t.kind for t in diff.tables}
    assert kinds["t0"] is ChangeKind.REPLACED and kinds["t9"] is ChangeKind.ADDED
    assert kinds["t5"] is ChangeKind.REMOVED
    assert [t.name for t in diff.tables][-1] == "t5"
    assert not diff.same_tables_spec
    assert diff.migrated_bytes == 100 * ROW + 1500 * (ROW + 4) + 2000 * 16
