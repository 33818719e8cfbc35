"""The planning call, its errors, the plan file, and user cost models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from planner import (
    AnalyticCostModel,
    PlanOptions,
    Sharding,
    Tier,
    CostModelError,
    InfeasibleError,
    PlanFileError,
    Resource,
    ShardCost,
    ShardOption,
    Topology,
    check_cost_model,
    load_cost_model,
    parse_tables,
    parse_topology,
    plan,
    plan_to_json,
    read_plan,
    write_plan,
)
from planner.search.options import OptionSettings
from planner.search.packing import makespan_lower_bound
from planner.inputs.cost import buffer_bytes
from tests.conftest import small_tables_doc, small_topology_doc


WHOLE_IN_HBM = PlanOptions(candidates=OptionSettings(shardings=frozenset({Sharding.TABLE_WISE}),
                                                     tiers=frozenset({Tier.HBM})))


def _plan(tables: dict | None = None, topology: dict | None = None, **kwargs):
    return plan(parse_tables(tables or small_tables_doc()),
                parse_topology(topology or small_topology_doc()), **kwargs)


def test_plan_fields_and_loads() -> None:
    result = _plan()
    assert result.solve.sol_status == "Optimal Solution Found"
    assert result.solve.gap == pytest.approx(0.0, abs=1e-9)
    assert result.solve.objective_ms == pytest.approx(max(d.load_ms for d in result.devices))
    for device in result.devices:
        on_device = [t for t in result.tables if t.shards[0].device == device.device]
        assert device.load_ms == pytest.approx(sum(t.cost.total_ms for t in on_device))
        assert device.hbm_bytes == sum(t.cost.hbm_bytes for t in on_device)
        assert device.hbm_bytes <= device.hbm_capacity_bytes
    whole = _plan(options=WHOLE_IN_HBM)
    assert whole.solve.lower_bound_ms >= makespan_lower_bound(
        [t.cost.total_ms for t in whole.tables], 2) - 1e-12
    assert all(t.sharding is Sharding.TABLE_WISE for t in whole.tables)
    # more options can only help
    assert result.solve.objective_ms <= whole.solve.objective_ms + 1e-12


def test_plan_is_deterministic() -> None:
    a, b = plan_to_json(_plan()), plan_to_json(_plan())
    for doc in (a, b):
        doc.pop("solve_seconds")
    assert a == b


def test_plan_file_round_trip(tmp_path: Path) -> None:
    result = _plan()
    path = tmp_path / "sub" / "plan.json"
    write_plan(result, path)
    doc = json.loads(path.read_text())
    for key in ("schema_version", "inputs_sha256", "status", "objective_ms", "lower_bound_ms",
                "gap", "solve_seconds", "devices", "tables"):
        assert key in doc
    assert {"device", "rows", "cols", "tier"} <= set(doc["tables"][0]["shards"][0])
    assert {"load_ms", "hbm_bytes"} <= set(doc["devices"][0])
    assert read_plan(path) == result
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp files left


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda d: d.pop("devices"), "missing field 'devices'"),
        (lambda d: d["tables"][0]["shards"][0].update(device=7), "device 7 outside 0..1"),
        (lambda d: d["tables"][0]["shards"][0].update(rows=[0, 10**9]), "outside"),
        (lambda d: d["tables"][0]["shards"][0].update(tier="tape"), "malformed field"),
        (lambda d: d["tables"].pop(), "missing ['t3']"),
        (lambda d: d["tables_spec"]["tables"][0].update(num_embeddings=-1), "embedded spec invalid"),
        (lambda d: d["topology"].update(hosts=2), "inputs_sha256 does not match"),
    ],
)
def test_bad_plan_files(tmp_path: Path, edit, fragment: str) -> None:
    doc = plan_to_json(_plan())
    edit(doc)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError) as info:
        read_plan(path)
    assert fragment in str(info.value)


def test_unreadable_plan_files(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match="no such file"):
        read_plan(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(PlanFileError, match="not a readable JSON plan"):
        read_plan(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[]")
    with pytest.raises(PlanFileError, match="must be a JSON object"):
        read_plan(tmp_path / "y.json")


def test_table_larger_than_a_device() -> None:
    tables = small_tables_doc()
    tables["tables"][2]["num_embeddings"] = 100_000  # 3.2 MB > 1 MB per device
    with pytest.raises(InfeasibleError) as info:
        _plan(tables, options=WHOLE_IN_HBM)
    err = info.value
    assert err.resource is Resource.HBM and err.tables == ("t2",)
    # the rows and the step's id and pooled-output buffers (buffer_bytes)
    t2 = parse_tables(tables).by_name("t2")
    buffers = buffer_bytes(ShardOption(t2, Sharding.TABLE_WISE, 100_000, 8),
                           parse_topology(small_topology_doc()))
    assert buffers > 0
    assert err.shortfall_bytes == 100_000 * 8 * 4 + buffers - 1_000_000
    assert "devices of at least" in str(err) and "allow a cache tier" in str(err)
    # with every option it is cached or row-wise sharded instead
    result = _plan(tables)
    t2 = result.table("t2")
    assert t2.sharding is not Sharding.TABLE_WISE or t2.shards[0].tier is not Tier.HBM


def test_total_memory_short() -> None:
    tables = small_tables_doc(num_tables=6, rows=9_000)  # 9k..54k rows x 32 B
    topology = small_topology_doc(devices=2, hbm_gb=0.002)
    with pytest.raises(InfeasibleError) as info:
        _plan(tables, topology, options=WHOLE_IN_HBM)
    err = info.value
    specs, topo = parse_tables(tables), parse_topology(topology)
    # the rows and each table's id and pooled-output buffers (buffer_bytes)
    total = sum(9_000 * (i + 1) * 32 + buffer_bytes(ShardOption(t, Sharding.TABLE_WISE,
                                                                t.num_embeddings, 8), topo)
                for i, t in enumerate(specs.tables))
    assert err.resource is Resource.HBM and err.tables == ()
    assert err.shortfall_bytes == total - 4_000_000
    assert "more device(s)" in str(err)


def test_fragmentation_is_infeasible() -> None:
    # Three tables of 600 kB on two devices of 1 MB: the total fits, whole tables do not.
    tables = small_tables_doc(num_tables=3, rows=1)
    for table in tables["tables"]:
        table["num_embeddings"] = 600_000 // 32
    with pytest.raises(InfeasibleError, match="cannot be packed"):
        _plan(tables, options=WHOLE_IN_HBM)


class DoubleHbmModel:
    """A user model: the analytic one, with every shard's memory doubled."""

    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        base = AnalyticCostModel().cost(shard, topology)
        return ShardCost(base.lookup_ms, base.communication_ms, base.backward_ms,
                         base.optimizer_ms, 2 * base.hbm_bytes)


class NegativeModel:
    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        return ShardCost(-1.0, 0.0, 0.0, 0.0, 0)


class WrongTypeModel:
    def cost(self, shard: ShardOption, topology: Topology) -> dict:
        return {"lookup_ms": 1.0}


class FloatBytesModel:
    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        return ShardCost(1.0, 0.0, 0.0, 0.0, 1.5)  # type: ignore[arg-type]


class ShrinkingModel:
    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        return ShardCost(1.0, 0.0, 0.0, 0.0, 10**6 // shard.rows)


class RaisingModel:
    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        raise ZeroDivisionError("oops")


def test_user_cost_model_changes_the_plan() -> None:
    tables = small_tables_doc(num_tables=4, rows=8_000)  # 256k..1 MB, fits in 2 x 1 MB
    topology = small_topology_doc(devices=2, hbm_gb=0.0013)
    result = _plan(tables, topology, options=WHOLE_IN_HBM)
    assert result.cost_model == "planner:AnalyticCostModel"  # named at the door
    with pytest.raises(InfeasibleError):  # doubled memory no longer fits
        _plan(tables, topology, cost_model=DoubleHbmModel(), options=WHOLE_IN_HBM)


def test_load_cost_model_from_string() -> None:
    model = load_cost_model("planner:AnalyticCostModel")
    assert isinstance(model, AnalyticCostModel)
    # plan files written before the planner's sub-packages name it by its former module
    assert isinstance(load_cost_model("planner.cost:AnalyticCostModel"), AnalyticCostModel)
    assert isinstance(load_cost_model("planner.inputs.cost:AnalyticCostModel"), AnalyticCostModel)
    result = _plan(cost_model=load_cost_model(f"{__name__}:DoubleHbmModel"))
    assert result.cost_model.endswith("test_plan:DoubleHbmModel")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_colon", "must look like module:Class"),
        ("no_such_module_xyz:Model", "cannot import module 'no_such_module_xyz'"),
        ("planner:Nope", "has no attribute 'Nope'"),
        ("planner:ShardCost", "cannot create cost model"),
        ("planner.cost:Tier", "cannot create cost model"),
    ],
)
def test_load_cost_model_errors(spec: str, fragment: str) -> None:
    with pytest.raises(CostModelError) as info:
        load_cost_model(spec)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        (NegativeModel(), "lookup_ms must be a finite number >= 0 (milliseconds)"),
        (WrongTypeModel(), "must return planner.ShardCost, got dict"),
        (FloatBytesModel(), "hbm_bytes must be an integer >= 0 (bytes)"),
        (ShrinkingModel(), "needs less memory"),
        (RaisingModel(), "ZeroDivisionError: oops"),
        (object(), "has no method cost"),
    ],
)
def test_check_cost_model_rejects(model: object, fragment: str) -> None:
    with pytest.raises(CostModelError) as info:
        check_cost_model(model)
    assert fragment in str(info.value)


class CachingIsFasterModel:
    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        base = AnalyticCostModel().cost(replace(shard, tier=Tier.HBM, cache_rows=0), topology)
        speed = 0.5 if shard.tier is not Tier.HBM else 1.0
        return ShardCost(base.lookup_ms * speed, base.communication_ms, base.backward_ms,
                         base.optimizer_ms, base.hbm_bytes, base.dram_bytes)


def test_models_passed_from_python_are_checked() -> None:
    with pytest.raises(CostModelError, match="cached over DRAM is faster"):
        _plan(cost_model=CachingIsFasterModel())
    with pytest.raises(CostModelError, match="must return planner.ShardCost"):
        _plan(cost_model=WrongTypeModel())
