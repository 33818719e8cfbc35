"""The host tier: tables whose rows live in host memory train exactly like in-device ones."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dlrm_runtime import (
    ModelConfig,
    PlanMismatchError,
    SyntheticClicks,
    TrainConfig,
    Trainer,
    build_model,
    embeddings_from_plan,
    train,
)
from dlrm_runtime.checkpoint import latest_checkpoint, load_checkpoint
from dlrm_runtime.embeddings import TableBatchedBags, host_pooled
from dlrm_runtime.measure import predict_step
from planner import AnalyticCostModel, Plan, Sharding, Tier
from planner import ShardOption
from tests.dlrm_runtime.helpers import sharded, table_wise, tables, topology
from tests.dlrm_runtime.test_sharding import _lopsided_batch, _shard

CPU = torch.device("cpu")
OPTIMIZERS = ("sgd", "rowwise_adagrad", "adam")
CONFIG = ModelConfig(dense_features=13, bottom_mlp=(16, 8), top_mlp=(8, 1))


def in_tier(plan: Plan, tier: Tier) -> Plan:
    """The same shards on the same devices, every one in ``tier``."""
    return replace(plan, tables=tuple(
        replace(t, shards=tuple(replace(s, tier=tier) for s in t.shards)) for t in plan.tables))


def _plan(sharding: Sharding) -> Plan:
    spec, topo = tables(optimizers=OPTIMIZERS), topology()
    if sharding is Sharding.TABLE_WISE:
        return table_wise(spec, topo)
    return table_wise(spec, topo, {t.name: _shard(t, sharding) for t in spec.tables})


def test_host_pooled_gathers_unique_rows_and_pools_like_embedding_bag() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 6, generator=g)
    ids = torch.tensor([7, 3, 7, 7, 49, 0, 3])
    offsets = torch.tensor([0, 3, 3, 5])  # an empty bag too
    expected = torch.nn.functional.embedding_bag(ids, weight, offsets, mode="sum")
    assert torch.equal(host_pooled(weight, ids, offsets, CPU), expected)


@pytest.mark.parametrize("sharding", [Sharding.TABLE_WISE, Sharding.ROW_WISE,
                                      Sharding.TABLE_ROW_WISE, Sharding.COLUMN_WISE])
def test_host_tier_trains_bitwise_like_hbm(sharding: Sharding) -> None:
    hbm_plan = _plan(sharding)
    host_plan = in_tier(hbm_plan, Tier.HOST)
    train_config = TrainConfig(batch_size=32, lr=0.1, embedding_lr=0.2, dense_optimizer="sgd")
    base, model = build_model(hbm_plan, CONFIG, seed=3), build_model(host_plan, CONFIG, seed=3)
    data = SyntheticClicks(hbm_plan.tables_spec, 13, seed=3)
    base_trainer, trainer = Trainer(base, train_config), Trainer(model, train_config)
    batches = [_lopsided_batch(hbm_plan.tables_spec), *(data.batch(i, 32) for i in range(6))]
    for batch in batches:
        assert trainer.step(batch) == base_trainer.step(batch)
    for t in hbm_plan.tables_spec.tables:
        assert torch.equal(model.embeddings.weight(t.name), base.embeddings.weight(t.name)), t.name
    for a, b in zip(base.mlp_layers(), model.mlp_layers()):
        assert torch.equal(a.weight, b.weight)
    for a, b in zip(base_trainer.row_opt.state, trainer.row_opt.state):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])


def test_host_tier_weights_live_in_host_memory_and_pool_on_the_device() -> None:
    embeddings = embeddings_from_plan(in_tier(_plan(Sharding.TABLE_WISE), Tier.HOST), CPU)
    groups = list(embeddings.groups)
    assert groups and all(isinstance(g, TableBatchedBags) for g in groups)
    for group in groups:
        assert group.compute_device == CPU and group.device == CPU
        assert group.weight.device.type == "cpu"
        assert group.weight.is_pinned() == torch.cuda.is_available()
    # the lookup's gradient comes back to the host for the row optimizer
    batch = SyntheticClicks(_plan(Sharding.TABLE_WISE).tables_spec, 13, seed=1).batch(0, 8)
    torch.stack(embeddings(batch.sparse)).sum().backward()
    for block in embeddings.row_blocks():
        assert block.pending and all(g.device == block.weight.device for _, _, g in block.pending)


def test_host_and_hbm_tables_are_batched_apart() -> None:
    plan = _plan(Sharding.TABLE_WISE)
    spec = plan.tables_spec
    topo = plan.topology
    plan = table_wise(spec, topo, {spec.tables[0].name: sharded(
        spec.tables[0].name, Sharding.TABLE_WISE,
        (1 % topo.world_size, 0, spec.tables[0].num_embeddings, 0, spec.tables[0].embedding_dim),
        tier=Tier.HOST)})
    embeddings = embeddings_from_plan(plan, CPU)
    host = [g for g in embeddings.groups if g.compute_device is not None]
    assert [g.indices for g in host] == [[0]]
    assert all(0 not in g.indices for g in embeddings.groups if g.compute_device is None)


def test_data_parallel_host_replicas_are_refused() -> None:
    plan = in_tier(_plan(Sharding.DATA_PARALLEL), Tier.HOST)
    with pytest.raises(PlanMismatchError, match="data_parallel replicas in tier 'host'"):
        embeddings_from_plan(plan, CPU)


def test_prediction_prices_merged_host_shards_as_the_whole_host_table() -> None:
    hbm_plan = _plan(Sharding.ROW_WISE)
    host_plan = in_tier(hbm_plan, Tier.HOST)
    hbm = predict_step(hbm_plan, CONFIG, 64, communication=False)
    host = predict_step(host_plan, CONFIG, 64, communication=False)
    # every table in host DRAM: its rows and state there, only staging rows in HBM
    assert host.dram_bytes > 0 and hbm.dram_bytes == 0
    assert host.hbm_bytes < hbm.hbm_bytes
    assert host.lookup_ms > hbm.lookup_ms and host.update_ms >= hbm.update_ms
    # one process, one torch device: each table is one host weight, priced whole
    topo = replace(host_plan.topology, batch_size_per_device=64 // host_plan.topology.world_size)
    whole = [AnalyticCostModel().cost(ShardOption(t, Sharding.TABLE_WISE, t.num_embeddings,
                                                  t.embedding_dim, tier=Tier.HOST), topo)
             for t in host_plan.tables_spec.tables]
    assert host.lookup_ms == pytest.approx(sum(c.lookup_ms for c in whole))
    assert host.update_ms == pytest.approx(sum(c.backward_ms + c.optimizer_ms for c in whole))
    assert host.hbm_bytes == sum(c.hbm_bytes for c in whole)
    assert host.dram_bytes == sum(c.dram_bytes for c in whole)


def test_host_tier_checkpoints_resume_like_a_straight_run(tmp_path) -> None:
    """Host tables are saved and restored like in-device ones; a checkpoint of an HBM
    run resumes into host memory too."""
    hbm_plan = _plan(Sharding.ROW_WISE)
    host_plan = in_tier(hbm_plan, Tier.HOST)
    cfg = TrainConfig(steps=4, batch_size=32, lr=0.05, embedding_lr=0.1, eval_batches=1,
                      log_every=2, seed=3, threads=1, checkpoint_every=2)
    train(host_plan, CONFIG, replace(cfg, checkpoint_dir=str(tmp_path / "straight")))
    train(hbm_plan, CONFIG, replace(cfg, steps=2, checkpoint_dir=str(tmp_path / "resumed")))
    train(host_plan, CONFIG, replace(cfg, checkpoint_dir=str(tmp_path / "resumed"), resume=True))
    straight, resumed = (load_checkpoint(latest_checkpoint(tmp_path / d))
                         for d in ("straight", "resumed"))
    assert straight["row_optimizer_steps"] == resumed["row_optimizer_steps"] == 4
    for name, entry in straight["tables"].items():
        for key, value in entry.items():
            assert torch.equal(resumed["tables"][name][key], value), (name, key)
