"""The plan's prediction of a step: the cost model's shards summed per process, the
dense part from its FLOPs at the calibrated rate."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dlrm_runtime.config import Interaction, ModelConfig
from dlrm_runtime.measure.prediction import (
    dense_bytes,
    dense_flops,
    dense_ms,
    plan_cost_model,
    predict_step,
)
from planner import AnalyticCostModel, PlanOptions, parse_tables, parse_topology, plan
from planner import collective_latency_ms, evaluate_plan
from tests.conftest import small_tables_doc, small_topology_doc


@pytest.fixture(scope="module")
def planned():
    tables = parse_tables(small_tables_doc())
    topology = parse_topology(small_topology_doc(devices=2, hbm_gb=0.01))
    return plan(tables, topology, options=PlanOptions(time_limit_s=5))


def test_dense_flops_by_hand() -> None:
    config = ModelConfig(13, (32, 8), (16, 1), Interaction.DOT)
    # 3 features of dim 8 (bottom output + 2 tables): 3 pairs, top input 8 + 3 = 11
    forward = 2 * (13 * 32 + 32 * 8) + 2 * (11 * 16 + 16 * 1) + 2 * 3 * 3 * 8
    assert dense_flops(config, (8, 8), 10) == 3 * forward * 10
    cat = ModelConfig(13, (32, 8), (16, 1), Interaction.CAT)
    forward = 2 * (13 * 32 + 32 * 8) + 2 * ((8 + 16) * 16 + 16 * 1)
    assert dense_flops(cat, (8, 8), 1) == 3 * forward


def test_prediction_sums_the_devices_the_process_executes(planned) -> None:
    config = ModelConfig(13, (16, 8), (16, 1))
    batch = planned.topology.global_batch_size
    whole = predict_step(planned, config, batch)
    parts = [predict_step(planned, config, batch, [d]) for d in (0, 1)]
    assert whole.devices == (0, 1) and parts[1].devices == (1,)
    for name in ("lookup_ms", "update_ms"):
        assert getattr(whole, name) == pytest.approx(sum(getattr(p, name) for p in parts))
    # every process waits out each of the step's collectives once
    latency = collective_latency_ms(planned.topology)
    assert latency > 0
    assert whole.communication_ms == pytest.approx(
        sum(p.communication_ms for p in parts) - latency)
    assert whole.hbm_bytes == sum(p.hbm_bytes for p in parts)
    # the same numbers the plan was costed with: each device's total is its load
    recosted = evaluate_plan(planned, AnalyticCostModel(), "analytic")
    for device, part in zip(recosted.devices, parts):
        assert part.lookup_ms + part.communication_ms + part.update_ms == pytest.approx(
            device.load_ms + latency)
        assert part.hbm_bytes == device.hbm_bytes
    assert whole.dense_ms is None and whole.step_ms is None  # no calibrated dense rate
    assert predict_step(planned, config, batch, communication=False).communication_ms == 0


def test_one_process_prices_an_in_memory_row_wise_table_as_the_whole_table() -> None:
    """On one torch device the runtime keeps a row-wise table's shards in one weight
    (one lookup) and a data-parallel table's replicas as one copy: predicted like the
    table-wise table, not per shard. Over several torch devices, or in row caches (one
    per shard), it is priced per shard."""
    from planner import Sharding, Tier
    from tests.dlrm_runtime.helpers import sharded, table_wise, tables, topology

    spec = tables()
    topo = topology()
    topo = replace(topo, device=replace(topo.device, shard_overhead_ms=0.5))
    rows, dim = spec.tables[1].num_embeddings, spec.tables[1].embedding_dim
    cuts = [(d, rows * d // 4, rows * (d + 1) // 4, 0, dim) for d in range(4)]
    config, batch = ModelConfig(13, (16, 8), (16, 1)), topo.global_batch_size
    whole = predict_step(table_wise(spec, topo), config, batch, communication=False)
    row_plan = table_wise(spec, topo, {"t1": sharded("t1", Sharding.ROW_WISE, *cuts)})
    merged = predict_step(row_plan, config, batch, communication=False)
    assert (merged.lookup_ms, merged.update_ms, merged.hbm_bytes) == pytest.approx(
        (whole.lookup_ms, whole.update_ms, whole.hbm_bytes))
    spread = predict_step(row_plan, config, batch)  # one torch device per plan device
    # each row-wise shard writes partial sums for the whole batch (fp32)
    outputs_ms = 3 * batch * dim * 4 / (topo.device.hbm_gbps * 1e9) * 1e3
    assert spread.lookup_ms == pytest.approx(whole.lookup_ms + 3 * 0.5 + outputs_ms)
    # each row-wise shard also holds a pooled-output buffer for the whole batch (fp32)
    assert spread.hbm_bytes == whole.hbm_bytes + 3 * batch * dim * 4
    replicas = [(d, 0, rows, 0, dim) for d in range(4)]
    dp_plan = table_wise(spec, topo, {"t1": sharded("t1", Sharding.DATA_PARALLEL, *replicas)})
    one_copy = predict_step(dp_plan, config, batch, communication=False)
    assert (one_copy.lookup_ms, one_copy.update_ms, one_copy.hbm_bytes) == pytest.approx(
        (whole.lookup_ms, whole.update_ms, whole.hbm_bytes))
    assert predict_step(dp_plan, config, batch).hbm_bytes > whole.hbm_bytes  # 4 copies
    cached_plan = table_wise(spec, topo, {"t1": sharded("t1", Sharding.ROW_WISE, *cuts,
                                                        tier=Tier.DRAM_CACHE)})
    cached = predict_step(cached_plan, config, batch, communication=False)
    assert cached.lookup_ms > whole.lookup_ms + 3 * 0.5  # four caches, each priced


def test_batch_size_and_dense_rate(planned) -> None:
    config = ModelConfig(13, (16, 8), (16, 1))
    batch = planned.topology.global_batch_size
    device = replace(planned.topology.device, dense_gflops=10.0)
    calibrated = replace(planned, topology=replace(planned.topology, device=device))
    one = predict_step(calibrated, config, batch)
    double = predict_step(calibrated, config, 2 * batch)
    assert double.lookup_ms == pytest.approx(2 * one.lookup_ms)
    dims = [t.embedding_dim for t in planned.tables_spec.tables]
    assert one.dense_ms == pytest.approx(dense_flops(config, dims, batch) / 10e9 * 1e3)
    # one rank of two runs the MLPs on half the batch
    half = predict_step(calibrated, config, batch, [0])
    assert half.dense_ms == pytest.approx(one.dense_ms / 2)
    assert one.step_ms == pytest.approx(one.lookup_ms + one.communication_ms + one.update_ms
                                        + one.dense_ms)


def test_unloadable_cost_model_falls_back_to_the_analytic_one(planned) -> None:
    model, name = plan_cost_model(replace(planned, cost_model="nowhere.module:Model"))
    assert isinstance(model, AnalyticCostModel) and "cannot be loaded" in name
    assert plan_cost_model(planned)[1] == planned.cost_model


def test_dense_rates_round_trip_and_do_not_change_the_planning_inputs() -> None:
    doc = small_topology_doc()
    plain = parse_topology(doc)
    doc["device"].update(dense_gflops=40.0, dense_gbps=2.5, dense_step_ms=1.5)
    measured = parse_topology(doc)
    device = measured.device
    assert (device.dense_gflops, device.dense_gbps, device.dense_step_ms) == (40.0, 2.5, 1.5)
    assert parse_topology(measured.to_json()) == measured
    assert "dense_gflops" not in plain.to_json()["device"]
    assert measured.sha256() == plain.sha256()


def test_dense_time_adds_flops_and_bytes() -> None:
    config = ModelConfig(13, (32, 8), (16, 1))
    dims = (8, 8)
    flops, nbytes = dense_flops(config, dims, 100), dense_bytes(config, dims, 100)
    # activations 32+8 | features 3x8, products 3x3, output 8+3 | 16+1, and parameters
    params = (14 * 32 + 33 * 8) + (12 * 16 + 17 * 1)
    assert nbytes == 4 * ((32 + 8 + 24 + 9 + 11 + 16 + 1) * 100 + params)
    assert dense_ms(config, dims, 100, 2.0, None) == pytest.approx(flops / 2e9 * 1e3)
    assert dense_ms(config, dims, 100, 2.0, 0.5) == pytest.approx(
        (flops / 2e9 + nbytes / 0.5e9) * 1e3)
    assert dense_ms(config, dims, 100, 2.0, 0.5, 3.0) == pytest.approx(
        (flops / 2e9 + nbytes / 0.5e9) * 1e3 + 3.0)


def test_run_fit_recovers_the_rates_of_a_synthetic_machine(monkeypatch) -> None:
    """The calibration's fit, fed training-run phase times made from known rates
    (first steps slowed, as cold steps are: only the median step counts), returns
    them."""
    from planner import Optimizer

    from dlrm_runtime import calibrate
    from dlrm_runtime.measure import StepTimes

    gflops, gbps, fixed_ms, step_gbps, shard_ms, ns_per_id = 30.0, 0.8, 2.0, 1.5, 0.1, 200.0
    sizes = calibrate.CalibrationSizes(mlp_batch=256, repeats=1)
    calls = []

    def fake_run(config, dims, batch, sizes, optimizer=Optimizer.SGD):
        calls.append(optimizer)
        ids = len(dims) * batch
        rows_gb = 3 * ids * dims[0] * 4 / 1e9
        state_gb = 8 * ids / 1e9 if optimizer is not Optimizer.SGD else 0.0
        embedding_ms = rows_gb / step_gbps * 1e3 + shard_ms * len(dims)
        update_ms = 0.6 * embedding_ms + state_gb / step_gbps * 1e3 + (
            ids * ns_per_id * 1e-6 if optimizer is not Optimizer.SGD else 0.0)
        dense = dense_ms(config, dims, batch, gflops, gbps, fixed_ms)
        times = StepTimes(99.0, 0.0, 99.0, 99.0, 0.0, 24, 0.0,
                          (0.4 * embedding_ms, 0.0, dense, update_ms))
        return times, rows_gb + state_gb

    monkeypatch.setattr(calibrate, "_training_run", fake_run)
    rates = calibrate._training_model(sizes, shard_ms)
    assert (rates.dense_gflops, rates.dense_gbps, rates.dense_step_ms, rates.step_gbps,
            rates.optimizer_ns_per_id) == pytest.approx(
        (gflops, gbps, fixed_ms, step_gbps, ns_per_id), rel=1e-6)
    assert calls.count(Optimizer.ROWWISE_ADAGRAD) == 1
    assert len(calls) == len(calibrate.RUN_PROBES) + 1


def test_a_training_run_probe_times_the_runtime_and_prices_its_bytes() -> None:
    """The probe is a real (tiny) training run: median phases measured, and the
    embedding bytes the cost model charges (for SGD, 3 x the looked-up row bytes at the
    narrow-row penalty, and the ids and pooled outputs forward and backward)."""
    from planner import Optimizer

    from dlrm_runtime import calibrate

    sizes = calibrate.CalibrationSizes(overhead_rows=4000, run_steps=3)
    config = ModelConfig(13, (8, 4), (8, 1))
    times, charged_gb = calibrate._training_run(config, (4, 4), 32, sizes)
    assert times.steps == 3 and len(times.median_phase_ms) == 4
    assert times.median_phase_ms[2] > 0 and times.median_phase_ms[0] > 0
    rows = 3 * 2 * 32 * 4 * 4 * 1.75  # 2 tables of 4 columns, 32 ids each
    io = 2 * 2 * (32 * 8 + 32 * 4 * 4)  # int64 ids and fp32 outputs, forward and backward
    assert charged_gb == pytest.approx((rows + io) / 1e9)
    _, stateful_gb = calibrate._training_run(config, (4, 4), 32, sizes,
                                             Optimizer.ROWWISE_ADAGRAD)
    assert stateful_gb == pytest.approx(charged_gb + 2 * 2 * 32 * 4 / 1e9)  # state read+write


def test_measured_overheads_are_charged_per_shard_and_per_cached_lookup() -> None:
    from planner import ShardOption, Sharding, TableSpec, Tier

    doc = small_topology_doc()
    plain = parse_topology(doc)
    doc["device"].update(shard_overhead_ms=0.5, cache_ns_per_miss=100.0, cache_ns_per_lookup=7.0)
    measured = parse_topology(doc)
    assert parse_topology(measured.to_json()) == measured
    assert "shard_overhead_ms" not in plain.to_json()["device"]  # old files stay valid
    assert measured.sha256() != plain.sha256()  # they are planning inputs
    table = TableSpec("t", 1000, 8, 2.0)
    model = AnalyticCostModel()
    hbm = ShardOption(table, Sharding.TABLE_WISE, 1000, 8)
    cached = ShardOption(table, Sharding.TABLE_WISE, 1000, 8, tier=Tier.STORE_CACHE,
                         cache_rows=100)
    lookups = plain.global_batch_size * 2.0
    assert model.cost(hbm, measured).lookup_ms == pytest.approx(
        model.cost(hbm, plain).lookup_ms + 0.5)
    misses = lookups * (1 - cached.hit_rate)
    assert model.cost(cached, measured).lookup_ms == pytest.approx(
        model.cost(cached, plain).lookup_ms + 0.5 + misses * 100e-6 + lookups * 7e-6)
    with pytest.raises(Exception, match="shard_overhead_ms"):
        doc["device"]["shard_overhead_ms"] = -1
        parse_topology(doc)


def test_optimizer_state_is_charged_per_id_for_in_memory_shards_only() -> None:
    from planner import Optimizer, ShardOption, Sharding, TableSpec, Tier

    doc = small_topology_doc()
    plain = parse_topology(doc)
    doc["device"]["optimizer_ns_per_id"] = 200.0
    measured = parse_topology(doc)
    assert parse_topology(measured.to_json()) == measured
    model = AnalyticCostModel()
    adagrad = TableSpec("t", 1000, 8, 2.0, optimizer=Optimizer.ROWWISE_ADAGRAD)
    lookups = plain.global_batch_size * 2.0
    option = ShardOption(adagrad, Sharding.TABLE_WISE, 1000, 8)
    assert model.cost(option, measured).optimizer_ms == pytest.approx(
        model.cost(option, plain).optimizer_ms + lookups * 200e-6)
    sgd = ShardOption(TableSpec("t", 1000, 8, 2.0), Sharding.TABLE_WISE, 1000, 8)
    cached = ShardOption(adagrad, Sharding.TABLE_WISE, 1000, 8, tier=Tier.DRAM_CACHE,
                         cache_rows=100)  # the row cache's own fit covers its update
    for other in (sgd, cached):
        assert model.cost(other, measured) == model.cost(other, plain)


def test_cache_cost_fit_recovers_the_costs_of_a_synthetic_cache(monkeypatch, tmp_path) -> None:
    """The calibration's row-cache fit, fed step times made from known costs of the
    lookups, misses and overflow rows that the cost model counts for the probe tables,
    returns them (the per-miss cost less the traffic the cost model charges)."""
    from dlrm_runtime import calibrate

    fixed_s, per_id_s, per_miss_s, per_overflow_s = 2e-3, 50e-9, 1.5e-6, 3e-6
    sizes = calibrate.CalibrationSizes(overhead_rows=20_000, mlp_batch=128, overhead_batches=4)
    runs = iter([None] * 6 + [  # the step probe: whole and split, 3 runs each
        share for multiple in (1, 4)
        for share in (None, *(s for m, s in calibrate.CACHE_PROBES if m == multiple))])

    def fake_seconds(embeddings, batches, sync, *_) -> float:
        share = next(runs)
        samples = batches[0].offsets[0].numel() - 1
        plain = 1e-3 * samples / 256 * len(embeddings.specs)
        if share is None:
            assert embeddings.cache_stats() is None
            return plain
        assert len(embeddings.specs) == calibrate.CACHE_PROBE_TABLES
        assert [t.pooling_factor for t in embeddings.specs] == list(calibrate.CACHE_PROBE_POOLING)
        total = plain
        for table in embeddings.specs:
            rows, lookups = table.num_embeddings, samples * table.pooling_factor
            slots = max(1, round(rows * share))
            misses = lookups * (1 - table.access.hit_rate(rows, slots))
            overflow = max(0.0, table.access.expected_distinct(rows, lookups) - slots)
            total += (fixed_s + per_id_s * lookups + per_miss_s * misses
                      + per_overflow_s * overflow)
        return total

    monkeypatch.setattr(calibrate, "_step_seconds", fake_seconds)
    miss_gbps = 1.0
    costs = calibrate._runtime_overheads(sizes, torch.device("cpu"), lambda: None, tmp_path,
                                         miss_gbps)
    traffic_ns = 2 * (16 * 4 + 24) * 256 / 280 / miss_gbps  # whole PCIe packets
    assert costs.cache_shard_ms == pytest.approx(fixed_s * 1e3, rel=1e-6)
    assert costs.cache_ns_per_lookup == pytest.approx(per_id_s * 1e9, rel=1e-6)
    assert costs.cache_ns_per_miss == pytest.approx(per_miss_s * 1e9 - traffic_ns, rel=1e-6)
    assert costs.cache_ns_per_overflow_row == pytest.approx(per_overflow_s * 1e9, rel=1e-6)
    assert costs.shard_ms == 0.0


def test_expected_distinct_rows_match_the_exact_sum() -> None:
    from planner import AccessProfile

    for profile, rows, draws in [(AccessProfile(zipf=1.05), 1000, 4096),
                                 (AccessProfile(zipf=0.8), 50_000, 16_384), (AccessProfile(), 500, 300),
                                 (AccessProfile(hot_rows=(10, 100), share=(0.5, 0.8)), 1000, 2000)]:
        ranks = np.arange(rows)
        cumulative = np.array([profile.hit_rate(rows, k) for k in range(rows + 1)])
        p = np.diff(cumulative)[ranks]
        exact = float((1 - (1 - p) ** draws).sum())
        assert profile.expected_distinct(rows, draws) == pytest.approx(exact, rel=0.02)
    assert AccessProfile(zipf=1.0).expected_distinct(100, 0) == 0.0


def test_a_cache_smaller_than_a_steps_distinct_rows_pays_for_the_overflow() -> None:
    from planner import ShardOption, Sharding, TableSpec, Tier

    doc = small_topology_doc()
    plain = parse_topology(doc)
    doc["device"]["cache_ns_per_overflow_row"] = 1000.0
    measured = parse_topology(doc)
    table = TableSpec("t", 1000, 8, 2.0)
    model = AnalyticCostModel()
    lookups = plain.global_batch_size * 2.0
    distinct = table.access.expected_distinct(1000, lookups)
    for cache_rows in (10, 100, 999):
        option = ShardOption(table, Sharding.TABLE_WISE, 1000, 8, tier=Tier.DRAM_CACHE,
                             cache_rows=cache_rows)
        extra = model.cost(option, measured).lookup_ms - model.cost(option, plain).lookup_ms
        assert extra == pytest.approx(max(0.0, distinct - cache_rows) * 1e-3)


def test_phase_timer_reports_the_mean_split_and_the_median_step(monkeypatch) -> None:
    from dlrm_runtime.measure import timing

    clock = iter(range(10_000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)) / 1000)
    timer = timing.PhaseTimer()

    def step(lookup_ms: int, dense_ms: int) -> None:
        with timer.phase("data"):
            next(clock)  # 2 ms, not part of the step
        with timer.phase("lookup"):
            for _ in range(lookup_ms - 1):
                next(clock)
        with timer.phase("dense"):
            for _ in range(dense_ms - 1):
                next(clock)
        timer.step_done()

    for lookup_ms, dense_ms in ((2, 3), (2, 4), (30, 40)):  # the last step slowed down
        step(lookup_ms, dense_ms)
    times = timer.result()
    assert times.steps == 3
    assert times.lookup_ms == pytest.approx(34 / 3) and times.dense_ms == pytest.approx(47 / 3)
    assert times.data_ms == pytest.approx(2.0)
    assert times.step_ms == pytest.approx(81 / 3)
    assert times.median_step_ms == pytest.approx(6.0)
    assert times.to_json()["median_step_ms"] == pytest.approx(6.0)
    assert times.median_phase_ms == pytest.approx((2.0, 0.0, 4.0, 0.0))  # lookup .. update
    assert times.to_json()["median_phase_ms"]["dense"] == pytest.approx(4.0)
    timer.reset()
    step(1, 1)
    assert timer.result().median_step_ms == pytest.approx(2.0)


def test_combined_calibration_takes_the_median_of_each_figure() -> None:
    from dlrm_runtime.calibrate import Calibration, combine, to_topology

    def one(gbps: float, a2a: float | None, date: str) -> Calibration:
        return Calibration("cpu", gbps, 2 * gbps, 5.0, 1.0, 0.1, a2a, "gloo", date,
                           dense_gflops=10 * gbps, cache_ns_per_miss=100 * gbps, threads=1)

    rounds = [one(1.4, 2.0, "2026-01-01"), one(0.8, None, "2026-01-02"),
              one(1.0, 4.0, "2026-01-03")]
    combined = combine(rounds)
    assert combined.device_gbps == pytest.approx(1.0)
    assert combined.host_gather_gbps == pytest.approx(2.0)
    assert combined.dense_gflops == pytest.approx(10.0)
    assert combined.cache_ns_per_miss == pytest.approx(100.0)
    assert combined.all_to_all_gbps == pytest.approx(3.0)  # the rounds that measured it
    assert (combined.date, combined.backend, combined.threads) == ("2026-01-03", "gloo", 1)
    assert combined.rounds == 3 and combine(rounds[:1]) == rounds[0]
    assert combine([one(1.0, None, "d")]).all_to_all_gbps is None
    assert dict(to_topology(combined, hbm_gb=1.0, dram_gb=2.0).calibration)["rounds"] == "3"
    with pytest.raises(ValueError):
        combine([])


def test_steal_is_read_from_proc_stat(tmp_path) -> None:
    from dlrm_runtime.measure import cpu_ticks, steal_share

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    before = cpu_ticks(stat)
    assert before == (40, 1000)
    stat.write_text("cpu  200 0 100 1500 10 0 0 190 0 0\n")
    assert steal_share(before, cpu_ticks(stat)) == pytest.approx(150 / 1000)
    assert steal_share(before, before) is None  # no time passed
    assert cpu_ticks(tmp_path / "missing") is None and steal_share(None, before) is None
    stat.write_text("intr 1 2 3\n")
    assert cpu_ticks(stat) is None
    stat.write_text("cpu  a b c d e f g h\n")
    assert cpu_ticks(stat) is None


def test_report_says_when_other_vms_took_cpu_time() -> None:
    from cli.report import measured_vs_predicted

    measured = {"lookup_ms": 1.0, "communication_ms": 0.0, "dense_ms": 2.0, "update_ms": 1.0,
                "step_ms": 4.0, "median_step_ms": 4.0, "steps": 10, "data_ms": 0.1,
                "embedding_bytes": 100}
    predicted = {"lookup_ms": 1.0, "communication_ms": 0.0, "dense_ms": 2.0, "update_ms": 1.0,
                 "step_ms": 4.0, "hbm_bytes": 100, "dram_bytes": 0, "devices": [0],
                 "cost_model": "x", "calibrated": True}
    quiet = measured_vs_predicted({**measured, "steal_share": 0.01}, predicted)
    loud = measured_vs_predicted({**measured, "steal_share": 0.2}, predicted)
    assert "steal" not in quiet and "other VMs took 20%" in loud
    assert "steal" not in measured_vs_predicted(measured, predicted)  # older logs
    medians = {"lookup": 1.5, "communication": 0.0, "dense": 2.0, "update": 1.0}
    table = measured_vs_predicted({**measured, "median_phase_ms": medians}, predicted)
    lookup = [line for line in table.splitlines() if line.strip().startswith("lookup")][0]
    assert lookup.split()[1:] == ["1.000", "1.500", "1.000", "+50%"]  # judged on the median
    old = [line for line in quiet.splitlines() if line.strip().startswith("lookup")][0]
    assert old.split()[1:] == ["1.000", "1.000", "+0%"]  # logs without medians: the mean
