"""The host tier (rows in host DRAM read over the host link, no device cache): its cost,
when the planner chooses it, the DRAM it takes, and the plan file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from planner import (
    AnalyticCostModel,
    CostModelError,
    InfeasibleError,
    Optimizer,
    PlanFileError,
    PlanOptions,
    Resource,
    ShardCost,
    ShardOption,
    Sharding,
    TablesSpec,
    TableSpec,
    Tier,
    Topology,
    check_cost_model,
    plan,
    plan_to_json,
    read_plan,
    write_plan,
)
from planner.inputs.cost import link_ms
from planner.inputs.specs import GB, DeviceSpec, HostSpec, NetworkSpec, StoreSpec
from planner.search.options import OptionSettings, table_options

BIG_ROWS = 200_000
"""Rows of the table that fits no device whole: 200k x (128 B row + 256 B Adam state)
= 76.8 MB against 20 MB of HBM per device."""


CACHE_NS_PER_MISS = 1000.0
"""A row cache's bookkeeping per miss, as calibrated runtimes measure it: without it a
DRAM cache that hits 10 % of a uniform table moves fewer bytes than the host tier (two
crossings per miss against three per lookup) and always wins."""


def _topology(hosts: int = 1, devices_per_host: int = 2, hbm_gb: float = 0.02,
              dram_gb: float = 1.0) -> Topology:
    return Topology(hosts, devices_per_host,
                    DeviceSpec(hbm_gb, 100.0, cache_ns_per_miss=CACHE_NS_PER_MISS),
                    HostSpec(dram_gb, 20.0, 10.0), StoreSpec(1.0, 0.5), NetworkSpec(50.0, 10.0), 32)


def _tables(big: int = 1) -> TablesSpec:
    """``big`` uniformly accessed Adam tables too large for one device (a device cache
    of them hits only its share of rows) and three small SGD tables."""
    tables = [TableSpec(f"big{i}", BIG_ROWS, 32, 1.0, optimizer=Optimizer.ADAM)
              for i in range(big)]
    tables += [TableSpec(f"small{i}", 1000 * (i + 1), 32, 1.0) for i in range(3)]
    return TablesSpec(tuple(tables))


def _options(tiers: set[Tier], shardings: set[Sharding] | None = None) -> PlanOptions:
    candidates = OptionSettings(tiers=frozenset(tiers),
                                shardings=frozenset(shardings or set(Sharding)))
    return PlanOptions(time_limit_s=20.0, candidates=candidates)


def _dram_per_host(result) -> list[int]:
    used = [0] * result.topology.hosts
    model = AnalyticCostModel()
    for table in result.tables:
        spec = result.tables_spec.by_name(table.name)
        for s in table.shards:
            option = ShardOption(spec, table.sharding, s.row_end - s.row_start,
                                 s.col_end - s.col_start, len(table.shards),
                                 (s.row_end - s.row_start) / spec.num_embeddings, 1.0, s.tier,
                                 s.cache_rows)
            used[result.topology.host_of(s.device)] += model.cost(option, result.topology).dram_bytes
    return used


def test_host_shard_cost() -> None:
    topology = _topology()
    table = TableSpec("t", 1000, 16, 2.0, optimizer=Optimizer.ROWWISE_ADAGRAD)
    hbm_shard = ShardOption(table, Sharding.TABLE_WISE, 1000, 16)
    hbm = AnalyticCostModel().cost(hbm_shard, topology)
    host = AnalyticCostModel().cost(replace(hbm_shard, tier=Tier.HOST), topology)
    lookups = topology.global_batch_size * 2.0  # 128 ids of 64 bytes
    # over the 10 GB/s link (DRAM is faster), each row in one PCIe packet
    link = link_ms(lookups, 64, 10.0)
    assert link == pytest.approx(lookups * (64 + 24) * 256 / 280 / (10.0 * GB) * 1e3)
    assert host.lookup_ms == pytest.approx(hbm.lookup_ms + link)
    assert host.backward_ms == pytest.approx(hbm.backward_ms + 2 * link)  # read, written back
    # row-wise Adagrad's 4 bytes per row cross the link with their rows, both ways
    assert host.optimizer_ms == pytest.approx(2 * lookups * 4 / (10.0 * GB) * 1e3)
    assert host.communication_ms == hbm.communication_ms
    assert host.dram_bytes == 1000 * (64 + 4)
    # the staging rows, the ids received and the pooled outputs of the step
    assert host.hbm_bytes == 128 * 64 + 128 * 8 + topology.global_batch_size * 16 * 4
    assert replace(hbm_shard, tier=Tier.HOST).hit_rate == 0.0
    # the link is the slower of DRAM and the host-to-device link
    slow_dram = replace(topology, host=HostSpec(1.0, 5.0, 10.0))
    slower = AnalyticCostModel().cost(replace(hbm_shard, tier=Tier.HOST), slow_dram)
    assert slower.lookup_ms == pytest.approx(hbm.lookup_ms + link_ms(lookups, 64, 5.0))


def test_host_shard_never_costs_less_than_its_hbm_twin() -> None:
    """Even where host memory is faster than the device's (the HBM-first search's bound
    relies on this)."""
    table = TableSpec("t", 1000, 16, 2.0, optimizer=Optimizer.ADAM)
    shard = ShardOption(table, Sharding.TABLE_WISE, 1000, 16)
    topology = replace(_topology(), host=HostSpec(1.0, 1000.0, 900.0))
    hbm = AnalyticCostModel().cost(shard, topology)
    host = AnalyticCostModel().cost(replace(shard, tier=Tier.HOST), topology)
    for part in ("lookup_ms", "backward_ms", "optimizer_ms"):
        assert getattr(host, part) >= getattr(hbm, part)


def test_host_options_are_generated_without_cache_rows() -> None:
    table = _tables().tables[0]
    options = table_options(table, _topology(), AnalyticCostModel(),
                            OptionSettings(tiers=frozenset({Tier.HOST})))
    assert options and {o.tier for o in options} == {Tier.HOST}
    assert all(s.cache_rows == 0 for o in options for s in o.shards)
    assert "table_wisex1/host" in {o.label for o in options}


def test_planner_chooses_host_when_hbm_is_short_and_it_beats_the_caches() -> None:
    tables, topology = _tables(), _topology()
    assert tables.tables[0].weight_bytes > topology.usable_hbm_bytes  # HBM is short
    with_host = plan(tables, topology, options=_options(set(Tier)))
    caches_only = plan(tables, topology,
                       options=_options({Tier.HBM, Tier.DRAM_CACHE, Tier.STORE_CACHE}))
    big = with_host.table("big0")
    assert {s.tier for s in big.shards} == {Tier.HOST}
    assert {s.tier for s in caches_only.table("big0").shards} <= {Tier.DRAM_CACHE,
                                                                 Tier.STORE_CACHE}
    assert with_host.solve.objective_ms < caches_only.solve.objective_ms * 0.95
    for name in ("small0", "small1", "small2"):  # HBM still serves what fits
        assert {s.tier for s in with_host.table(name).shards} == {Tier.HBM}


def test_dram_capacity_binds_the_host_tier() -> None:
    tables = _tables()
    short = _topology(dram_gb=0.05)  # 50 MB of DRAM for 76.8 MB of rows and state
    result = plan(tables, short, options=_options(set(Tier)))
    assert {s.tier for s in result.table("big0").shards} == {Tier.STORE_CACHE}
    assert max(_dram_per_host(result)) <= 0.05 * GB
    with pytest.raises(InfeasibleError) as info:
        plan(tables, short, options=_options({Tier.HBM, Tier.HOST}))
    assert info.value.resource is Resource.DRAM


def test_dram_is_counted_per_host() -> None:
    """Two hosts of one device, DRAM for one big table each: both go to the host tier,
    one on each host."""
    tables = _tables(big=2)
    topology = _topology(hosts=2, devices_per_host=1, dram_gb=0.1)
    result = plan(tables, topology, options=_options(set(Tier), {Sharding.TABLE_WISE}))
    hosts = set()
    for name in ("big0", "big1"):
        shards = result.table(name).shards
        assert {s.tier for s in shards} == {Tier.HOST}
        hosts.add(topology.host_of(shards[0].device))
    assert hosts == {0, 1}
    assert max(_dram_per_host(result)) <= 0.1 * GB


def test_host_plan_round_trips(tmp_path: Path) -> None:
    result = plan(_tables(), _topology(), options=_options(set(Tier)))
    path = tmp_path / "plan.json"
    write_plan(result, path)
    doc = json.loads(path.read_text())
    big = next(t for t in doc["tables"] if t["name"] == "big0")
    assert {s["tier"] for s in big["shards"]} == {"host"}
    assert all(s.get("cache_rows", 0) == 0 for s in big["shards"])
    again = read_plan(path)
    assert again.tables == result.tables
    assert plan_to_json(again) == plan_to_json(result)


def test_host_shards_with_cache_rows_are_refused(tmp_path: Path) -> None:
    result = plan(_tables(), _topology(), options=_options(set(Tier)))
    doc = plan_to_json(result)
    big = next(t for t in doc["tables"] if t["name"] == "big0")
    big["shards"][0]["cache_rows"] = 10
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError, match="a host shard of .* cannot have 10 cache rows"):
        read_plan(path)


class HostIsFasterModel:
    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        base = AnalyticCostModel().cost(replace(shard, tier=Tier.HBM, cache_rows=0)
                                        if shard.tier is Tier.HOST else shard, topology)
        speed = 0.5 if shard.tier is Tier.HOST else 1.0
        return replace(base, lookup_ms=base.lookup_ms * speed)


def test_cost_models_with_a_faster_host_tier_are_refused() -> None:
    with pytest.raises(CostModelError, match="host tier is faster"):
        check_cost_model(HostIsFasterModel())
