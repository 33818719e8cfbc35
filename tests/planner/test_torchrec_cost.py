"""TorchRecCostModel against TorchRec 1.8's own estimators and planner (needs torchrec)."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest

from planner import (
    AnalyticCostModel,
    ShardOption,
    Sharding,
    TablesSpec,
    TableSpec,
    Tier,
    TorchRecCostModel,
    evaluate_plan,
    from_torchrec,
    load_cost_model,
    plan,
    PlanOptions,
)
from planner.inputs.torchrec_cost import torchrec_data_type, torchrec_topology

pytest.importorskip("torchrec")

from bench.workloads import topology as make_topology  # noqa: E402

# Rows divisible by 4 devices and by 5, so that TorchRec's row blocks and its default
# cache load factor 0.2 give whole rows: our shard sizes then equal TorchRec's.
TABLES = TablesSpec((
    TableSpec("small", 1000, 16, 3.0),
    TableSpec("mid", 40_000, 64, 1.0),
    TableSpec("wide", 20_000, 256, 8.0),
    TableSpec("big", 2_000_000, 128, 2.0),
), "fixture")
TOPOLOGY = replace(make_topology(4, hbm_gb=0.5, devices_per_host=2, batch_size_per_device=512))
KINDS = ("fused", "fused_uvm_caching", "fused_uvm", "dense")


def _torchrec_search_space(tables: TablesSpec):
    """TorchRec's enumerated sharding options (with its estimates) for ``tables``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
        from torchrec.distributed.planner.shard_estimators import (
            EmbeddingPerfEstimator,
            EmbeddingStorageEstimator,
        )
        from torchrec.distributed.planner.types import ParameterConstraints

        topo = torchrec_topology(TOPOLOGY)
        constraints = {t.name: ParameterConstraints(
            sharding_types=[s.value for s in Sharding], compute_kernels=list(KINDS),
            pooling_factors=[t.pooling_factor]) for t in tables.tables}
        enumerator = EmbeddingEnumerator(
            topology=topo, batch_size=TOPOLOGY.batch_size_per_device, constraints=constraints,
            estimator=[EmbeddingPerfEstimator(topo, constraints),
                       EmbeddingStorageEstimator(topo, constraints)])
        module = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=t.name, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
            feature_names=[t.name], data_type=torchrec_data_type(t.dtype))
            for t in tables.tables], device=torch.device("meta"))
        return enumerator.enumerate(module, [EmbeddingBagCollectionSharder()]), constraints


def _tier(kernel: str) -> Tier:
    return {"fused": Tier.HBM, "dense": Tier.HBM, "fused_uvm_caching": Tier.DRAM_CACHE,
            "fused_uvm": Tier.HOST}[kernel]


def test_every_shard_equals_torchrecs_estimates():
    from torchrec.distributed.planner.constants import UVM_CACHING_RATIO

    options, _ = _torchrec_search_space(TABLES)
    model = TorchRecCostModel()
    by_name = {t.name: t for t in TABLES.tables}
    checked = set()
    for option in options:
        table = by_name[option.name]
        for trec in option.shards:
            rows, cols = trec.size
            tier = _tier(option.compute_kernel)
            load_factor = option.cache_load_factor or UVM_CACHING_RATIO
            cache = math.ceil(rows * load_factor) if tier is Tier.DRAM_CACHE else 0
            ours = model.cost(ShardOption(table, Sharding(option.sharding_type), rows, cols,
                                          len(option.shards), tier=tier, cache_rows=cache),
                              TOPOLOGY)
            assert ours.total_ms == pytest.approx(trec.perf.total, rel=1e-9, abs=0), option
            assert ours.hbm_bytes == trec.storage.hbm, option
            assert ours.dram_bytes == trec.storage.ddr, option
            checked.add((option.sharding_type, option.compute_kernel))
    # every sharding type and kernel the project plans was compared
    assert {s for s, _ in checked} == {s.value for s in Sharding}
    assert {k for _, k in checked} == set(KINDS)


def _torchrec_plan(tables: TablesSpec):
    """TorchRec's planner on ``tables``: its ShardingPlan and its own rating of it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner
        from torchrec.distributed.planner.perf_models import NoopPerfModel
        from torchrec.distributed.planner.storage_reservations import (
            HeuristicalStorageReservation,
        )
        from torchrec.distributed.planner.types import ParameterConstraints

        topo = torchrec_topology(TOPOLOGY)
        constraints = {t.name: ParameterConstraints(
            sharding_types=[s.value for s in Sharding], compute_kernels=list(KINDS),
            pooling_factors=[t.pooling_factor]) for t in tables.tables}
        planner = EmbeddingShardingPlanner(
            topology=topo, batch_size=TOPOLOGY.batch_size_per_device, constraints=constraints,
            storage_reservation=HeuristicalStorageReservation(percentage=0.0), debug=False)
        module = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=t.name, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
            feature_names=[t.name], data_type=torchrec_data_type(t.dtype))
            for t in tables.tables], device=torch.device("meta"))
        sharding_plan = planner.plan(module, [EmbeddingBagCollectionSharder()])
        rating = NoopPerfModel(topo).rate(planner._best_plan)
        hbm = [0] * TOPOLOGY.world_size
        for option in planner._best_plan:
            for shard in option.shards:
                hbm[shard.rank] += shard.storage.hbm
    return sharding_plan, rating, hbm


def test_a_torchrec_plan_costs_what_torchrec_rates_it():
    sharding_plan, rating, hbm = _torchrec_plan(TABLES)
    imported = from_torchrec(sharding_plan, TABLES, TOPOLOGY, cost_model=TorchRecCostModel())
    assert imported.solve.objective_ms == pytest.approx(rating, rel=1e-9, abs=0)
    assert [d.hbm_bytes for d in imported.devices] == hbm


def test_planning_under_torchrecs_model_is_no_worse_than_torchrecs_planner():
    sharding_plan, rating, _ = _torchrec_plan(TABLES)
    model = TorchRecCostModel()
    ours = plan(TABLES, TOPOLOGY, cost_model=model, options=PlanOptions(time_limit_s=20))
    rated = evaluate_plan(ours, model, "torchrec", TOPOLOGY)
    assert rated.solve.objective_ms == pytest.approx(ours.solve.objective_ms, rel=1e-9)
    assert ours.solve.objective_ms <= rating * (1 + 1e-9)


def test_the_cli_name_resolves_and_the_analytic_model_stays_the_default():
    assert isinstance(load_cost_model("torchrec"), TorchRecCostModel)
    assert isinstance(load_cost_model("analytic"), AnalyticCostModel)
