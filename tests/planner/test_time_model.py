"""The default model's time terms, each against a hand count: ids read and pooled
outputs written, narrow rows, whole PCIe packets on the host link, data-parallel
replicas (dense gradient, hierarchical all-reduce, the global batch's updates) and the
per-collective latency of a step."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planner import (
    AnalyticCostModel,
    Optimizer,
    Sharding,
    ShardOption,
    TableSpec,
    Tier,
    Topology,
    check_cost_model,
    collective_latency_ms,
    parse_topology,
)
from planner.inputs.cost import (
    DEFAULT_COLLECTIVE_LATENCY_US,
    STEP_ALL_REDUCES,
    STEP_ALL_TO_ALLS,
    link_ms,
    row_penalty,
)
from planner.inputs.specs import GB, DeviceSpec, HostSpec, NetworkSpec, StoreSpec
from tests.conftest import small_topology_doc

MODEL = AnalyticCostModel()


def _topology(hosts: int = 1, per_host: int = 2, latency_us: float | None = None) -> Topology:
    return Topology(hosts, per_host, DeviceSpec(1.0, 100.0), HostSpec(8.0, 20.0, 10.0),
                    StoreSpec(1.0, 0.5), NetworkSpec(50.0, 10.0, latency_us), 32)


def _ms(num_bytes: float, gbps: float) -> float:
    return num_bytes / (gbps * GB) * 1e3


def test_an_hbm_shard_reads_ids_and_writes_pooled_outputs() -> None:
    topology = _topology()
    table = TableSpec("t", 1000, 128, 2.0)  # full-width rows: no penalty
    cost = MODEL.cost(ShardOption(table, Sharding.TABLE_WISE, 1000, 128), topology)
    lookups = 64 * 2.0
    rows = lookups * 128 * 4
    io = lookups * 8 + 64 * 128 * 4  # int64 ids, fp32 pooled outputs of the 64 samples
    assert cost.lookup_ms == pytest.approx(_ms(rows + io, 100.0))
    assert cost.backward_ms == pytest.approx(_ms(2 * rows + io, 100.0))
    assert cost.optimizer_ms == 0.0  # SGD keeps no state


@pytest.mark.parametrize(("cols", "penalty"), [(256, 1.0), (128, 1.0), (127, 1.15), (64, 1.15),
                                               (63, 1.75), (16, 1.75)])
def test_narrow_rows_move_slower_per_byte(cols: int, penalty: float) -> None:
    assert row_penalty(cols) == penalty
    topology = _topology()
    table = TableSpec("t", 1000, cols, 1.0)
    cost = MODEL.cost(ShardOption(table, Sharding.TABLE_WISE, 1000, cols), topology)
    io = 64 * 8 + 64 * cols * 4
    assert cost.lookup_ms == pytest.approx(_ms(64 * cols * 4 * penalty + io, 100.0))


def test_gathered_rows_cross_the_host_link_in_whole_packets() -> None:
    bulk = 256 / 280  # a bulk copy's packets are full: the measured rate includes one header each
    assert link_ms(1000, 512, 10.0) == pytest.approx(_ms(1000 * 512, 10.0))  # 2 full packets
    assert link_ms(1000, 64, 10.0) == pytest.approx(_ms(1000 * 88 * bulk, 10.0))
    assert link_ms(1000, 300, 10.0) == pytest.approx(_ms(1000 * (300 + 48) * bulk, 10.0))
    assert _ms(64, 10.0) / (link_ms(1, 64, 10.0)) == pytest.approx(0.795, abs=1e-3)


def test_a_host_shard_reads_and_writes_its_rows_over_the_link_in_backward() -> None:
    topology = _topology()
    table = TableSpec("t", 1000, 16, 2.0, optimizer=Optimizer.ROWWISE_ADAGRAD)
    shard = ShardOption(table, Sharding.TABLE_WISE, 1000, 16)
    hbm, host = MODEL.cost(shard, topology), MODEL.cost(replace(shard, tier=Tier.HOST), topology)
    lookups = 128
    crossing = link_ms(lookups, 64, 10.0)
    assert host.lookup_ms == pytest.approx(hbm.lookup_ms + crossing)
    assert host.backward_ms == pytest.approx(hbm.backward_ms + 2 * crossing)
    # row-wise Adagrad's 4 bytes per row cross with their rows, there and back
    assert host.optimizer_ms == pytest.approx(_ms(2 * lookups * 4, 10.0))


def test_cache_misses_cross_the_link_in_whole_packets() -> None:
    topology = _topology()
    table = TableSpec("t", 1000, 16, 2.0)  # uniform access: 100 slots hit 10 %
    shard = ShardOption(table, Sharding.TABLE_WISE, 1000, 16)
    hbm = MODEL.cost(shard, topology)
    cached = MODEL.cost(replace(shard, tier=Tier.DRAM_CACHE, cache_rows=100), topology)
    misses = 128 * 0.9
    assert cached.lookup_ms == pytest.approx(hbm.lookup_ms + link_ms(misses, 64, 10.0))
    assert cached.backward_ms == pytest.approx(hbm.backward_ms + link_ms(misses, 64, 10.0))


def test_a_replica_writes_its_dense_gradient_and_applies_the_global_batch() -> None:
    topology = _topology(hosts=2, per_host=4)  # 8 replicas, 256 samples in the global batch
    table = TableSpec("t", 1000, 128, 1.0, optimizer=Optimizer.ROWWISE_ADAGRAD)
    replica = ShardOption(table, Sharding.DATA_PARALLEL, 1000, 128, 8, 1 / 8, 1 / 8)
    cost = MODEL.cost(replica, topology)
    local, batch = 32.0, 256.0
    io = local * 8 + 32 * 128 * 4
    dense = 1000 * 129 * 4  # the runtime's dense gradient carries a flag column
    assert cost.lookup_ms == pytest.approx(_ms(local * 512 + io, 100.0))
    assert cost.backward_ms == pytest.approx(_ms(2 * batch * 512 + 2 * dense + io, 100.0))
    assert cost.optimizer_ms == pytest.approx(_ms(2 * batch * 4, 100.0))
    # within a host 2 (4-1)/4 of the gradient, across the 2 hosts 2 (2-1)/2 of a quarter
    assert cost.communication_ms == pytest.approx(_ms(2 * dense * 3 / 4, 50.0)
                                                  + _ms(2 * dense / 4 / 2, 10.0))
    one_host = MODEL.cost(replica, _topology(hosts=1, per_host=8))
    assert one_host.communication_ms == pytest.approx(_ms(2 * dense * 7 / 8, 50.0))


def test_collective_latency_is_a_step_constant_with_a_datasheet_default() -> None:
    assert collective_latency_ms(_topology(hosts=1, per_host=1)) == 0.0
    per_step = STEP_ALL_TO_ALLS + STEP_ALL_REDUCES
    assert collective_latency_ms(_topology()) == pytest.approx(
        per_step * DEFAULT_COLLECTIVE_LATENCY_US / 1e3)
    assert collective_latency_ms(_topology(latency_us=80.0)) == pytest.approx(per_step * 0.08)
    assert collective_latency_ms(_topology(latency_us=80.0), all_to_all=False) == \
        pytest.approx(STEP_ALL_REDUCES * 0.08)


def test_collective_latency_is_read_written_and_not_a_planning_input() -> None:
    doc = small_topology_doc()
    plain = parse_topology(doc)
    assert plain.network.collective_latency_us is None
    assert "collective_latency_us" not in plain.to_json()["network"]
    measured = parse_topology({**doc, "network": {**doc["network"],
                                                   "collective_latency_us": 75.0}})
    assert measured.network.collective_latency_us == 75.0
    assert parse_topology(measured.to_json()) == measured
    assert measured.sha256() == plain.sha256()  # plans stay valid: the planner ignores it


def test_the_default_model_keeps_the_planners_invariants() -> None:
    assert check_cost_model(MODEL) is MODEL
