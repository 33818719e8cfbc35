"""The option-choice bound with its packing constraints: valid against brute force
when shards are large against a device, and the dual feasible functions it uses."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner import AnalyticCostModel, Sharding, Tier, parse_tables, parse_topology
from planner.search.aggregate import PACKING_DFF_ORDERS, AggregateCut, dff_u, solve_aggregate
from planner.search.options import OptionSettings, TableOption, table_options
from tests.conftest import small_tables_doc, small_topology_doc

MODEL = AnalyticCostModel()


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 10_000), k=st.sampled_from(PACKING_DFF_ORDERS),
       cuts=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=8))
def test_dff_weights_of_one_device_sum_to_at_most_one(capacity: int, k: int,
                                                      cuts: list[float]) -> None:
    """Any shards that fit one device weigh at most 1 in all (the DFF property)."""
    points = sorted({0, capacity, *(int(c * capacity) for c in cuts)})
    sizes = [b - a for a, b in itertools.pairwise(points)]
    assert sum(dff_u(s, capacity, k) for s in sizes) <= 1 + 1e-12
    assert all(dff_u(s, capacity, k) >= 0 for s in sizes)


def test_dff_counts_shards_above_half_a_device() -> None:
    assert dff_u(51, 100, 1) == 1.0 and dff_u(49, 100, 1) == 0.0 and dff_u(50, 100, 1) == 0.5
    assert dff_u(34, 100, 2) == 0.5 and dff_u(67, 100, 2) == 1.0


def _best_plan(options: list[list[TableOption]], devices: int, capacity: int) -> float:
    """The slowest device of the best plan, by trying every option and every device of
    every shard (free options only)."""
    best = float("inf")
    for combo in itertools.product(*options):
        shards = [s for option in combo for s in option.shards]
        for where in itertools.product(range(devices), repeat=len(shards)):
            loads, hbm = [0.0] * devices, [0] * devices
            for slot, device in zip(shards, where):
                loads[device] += slot.cost.total_ms
                hbm[device] += slot.cost.hbm_bytes
            if max(hbm) <= capacity:
                best = min(best, max(loads))
    return best


def _large_shard_instance(rng: random.Random):
    """Tables of 0.26-1.15 MB on devices of 0.4-1 MB (shards above half a device), drawn
    again until every table has an option and some plan fits."""
    allowed = OptionSettings(shardings=frozenset({Sharding.TABLE_WISE, Sharding.COLUMN_WISE}),
                             tiers=frozenset({Tier.HBM, Tier.DRAM_CACHE}),
                             cache_fractions=(0.05, 0.5), column_shards=(2,))
    while True:
        doc = small_tables_doc(num_tables=rng.randint(2, 3), dim=32)
        for table in doc["tables"]:
            table["num_embeddings"] = rng.randint(2_000, 9_000)
            table["pooling_factor"] = float(rng.randint(1, 9))
        tables = parse_tables(doc)
        topology = parse_topology(small_topology_doc(devices=rng.choice([2, 3]),
                                                     hbm_gb=rng.uniform(0.0004, 0.001)))
        options = [table_options(t, topology, MODEL, allowed) for t in tables.tables]
        if all(options):
            best = _best_plan(options, topology.world_size, topology.usable_hbm_bytes)
            if best < float("inf"):
                return options, topology, best


@pytest.mark.parametrize("seed", range(20))
def test_bound_never_exceeds_the_best_plan_with_large_shards(seed: int) -> None:
    options, topology, best = _large_shard_instance(random.Random(seed))
    solution = solve_aggregate(options, topology, time_limit_s=10)
    assert solution.choice
    assert solution.lower_bound_ms <= best * (1 + 1e-9)


def test_shard_cut_keeps_tables_without_small_options() -> None:
    tables = parse_tables(small_tables_doc(num_tables=2, rows=4000, dim=32))
    topology = parse_topology(small_topology_doc(devices=2, hbm_gb=0.002))
    options = [table_options(t, topology, MODEL) for t in tables.tables]
    cut = AggregateCut(topology.usable_hbm_bytes * 2, max_shard_hbm_bytes=1)
    solution = solve_aggregate(options, topology, time_limit_s=10, cut=cut)
    assert solution.choice  # no option has a 1-byte shard: every table keeps all of them
    half = AggregateCut(topology.usable_hbm_bytes * 2,
                        max_shard_hbm_bytes=topology.usable_hbm_bytes // 4)
    chosen = solve_aggregate(options, topology, time_limit_s=10, cut=half).choice
    for opts, o in zip(options, chosen):
        if any(x.max_shard_hbm_bytes <= half.max_shard_hbm_bytes for x in opts):
            assert opts[o].max_shard_hbm_bytes <= half.max_shard_hbm_bytes
