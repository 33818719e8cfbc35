"""Tables in cached tiers: row caches over the table store train exactly like in-memory
tables, mix with HBM tables in one plan, and checkpoint through the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


from dlrm_runtime import (
    CheckpointError,
    ConfigError,
    ModelConfig,
    PlanMismatchError,
    SyntheticClicks,
    TrainConfig,
    Trainer,
    embeddings_from_plan,
)
from dlrm_runtime.embeddings import CachedTables, store_tables
from dlrm_runtime.embeddings import cached as cached_module
from dlrm_runtime.checkpoint import (
    checkpoint_of_step,
    committed_step,
    export_tables,
    list_checkpoints,
    prune_checkpoints,
    read_decision,
    save_checkpoint,
    write_decision,
)
from dlrm_runtime.embeddings import InMemoryEmbeddings, init_table
from dlrm_runtime.model import DLRM
from dlrm_runtime.embeddings import placements_from_plan
from planner import Plan, Sharding, Tier
from planner import Shard, TablePlan
from tests.dlrm_runtime.helpers import NO_COST, table_wise, tables, topology

CPU = torch.device("cpu")
MODEL = ModelConfig(dense_features=13, bottom_mlp=(16, 8), top_mlp=(8, 1))
BATCH = 64


def _cached(spec, name: str, tier: Tier, cache_rows: int, cut: int | None = None) -> TablePlan:
    """Table ``name`` cached whole on device 0, or row-wise at row ``cut`` (devices 0, 1)."""
    t = spec.by_name(name)
    rows, dim = t.num_embeddings, t.embedding_dim
    if cut is None:
        return TablePlan(name, Sharding.TABLE_WISE, (Shard(0, 0, rows, 0, dim, tier, cache_rows),),
                         NO_COST)
    return TablePlan(name, Sharding.ROW_WISE, (Shard(0, 0, cut, 0, dim, tier, cache_rows),
                                               Shard(1, cut, rows, 0, dim, tier, cache_rows)),
                     NO_COST)


def _plans(optimizer: str) -> tuple[Plan, Plan]:
    """Three tables: t0 in HBM, t1 cached over the store (16 slots for 1000 rows, 2 ids a
    sample: a batch of 64 has far more distinct rows than slots), t2 row-wise over DRAM
    (two shards of 24 slots)."""
    spec = tables(optimizers=(optimizer,) * 3)
    topo = topology()
    plain = table_wise(spec, topo)
    cached = table_wise(spec, topo, {"t1": _cached(spec, "t1", Tier.STORE_CACHE, 16),
                                     "t2": _cached(spec, "t2", Tier.DRAM_CACHE, 24, cut=700)})
    return plain, cached


def _model(plan: Plan, store_dir: Path | None = None, lr: float = 0.2) -> DLRM:
    embeddings = embeddings_from_plan(plan, CPU, seed=3,
                                      store_dir=None if store_dir is None else str(store_dir),
                                      embedding_lr=lr)
    dims = [t.embedding_dim for t in plan.tables_spec.tables]
    return DLRM(MODEL, embeddings, dims, seed=3).dense_to(CPU)


def _train(model: DLRM, plan: Plan, steps: range, config: TrainConfig) -> list[float]:
    trainer = Trainer(model, config)
    data = SyntheticClicks(plan.tables_spec, 13, seed=3)
    losses = []
    for step in steps:
        model.embeddings.prefetch(data.batch(step + 1, BATCH).sparse)
        losses.append(trainer.step(data.batch(step, BATCH)))
    return losses


@pytest.mark.parametrize("background", [False, True], ids=["inline", "thread"])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_cached_training_equals_in_memory_training(optimizer: str, background: bool,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal to in-memory training with the caches' store work inline (the CPU default:
    no prefetch) or on background threads (prefetching the next batch)."""
    monkeypatch.setattr(cached_module, "background_store_work", lambda device: background)
    plain_plan, cached_plan = _plans(optimizer)
    config = TrainConfig(batch_size=BATCH, lr=0.1, embedding_lr=0.2, dense_optimizer="sgd")
    base, model = _model(plain_plan), _model(cached_plan, tmp_path / "store")
    try:
        for t in plain_plan.tables_spec.tables:  # the store starts from init_table's values
            assert torch.equal(model.embeddings.weight(t.name), base.embeddings.weight(t.name))
        steps = range(6)
        expected = _train(base, plain_plan, steps, config)
        got = _train(model, cached_plan, steps, config)
        assert got == pytest.approx(expected, abs=1e-6)
        stats = model.embeddings.cache_stats()
        assert stats is not None and stats["evictions"] > 0 and stats["uncached"] > 0
        assert 0.0 < stats["hit_rate"] < 1.0
        assert (stats["prefetched_rows"] > 0) == background
        assert set(stats) >= {"hit_rate/t1", "hit_rate/t2", "misses", "write_backs"}
        for t in plain_plan.tables_spec.tables:
            torch.testing.assert_close(model.embeddings.weight(t.name),
                                       base.embeddings.weight(t.name), atol=1e-6, rtol=1e-5)
        for a, b in zip(base.mlp_layers(), model.mlp_layers()):
            torch.testing.assert_close(b.weight, a.weight, atol=1e-6, rtol=1e-5)
    finally:
        model.embeddings.close()


def test_a_step_looks_up_every_cached_table_of_a_device_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tables(optimizers=("sgd", "rowwise_adagrad", "sgd"))
    plain_plan = table_wise(spec, topology())
    cached_plan = table_wise(spec, topology(), {
        "t0": _cached(spec, "t0", Tier.STORE_CACHE, 2 * BATCH),
        "t1": _cached(spec, "t1", Tier.DRAM_CACHE, 2 * BATCH),
        "t2": _cached(spec, "t2", Tier.STORE_CACHE, 2 * BATCH, cut=700)})
    calls: list[list[torch.device]] = []
    many = cached_module.lookup_many

    def counted(caches, ids):
        calls.append([cache.device for cache in caches])
        return many(caches, ids)

    monkeypatch.setattr(cached_module, "lookup_many", counted)
    config = TrainConfig(batch_size=BATCH, lr=0.1, embedding_lr=0.2, dense_optimizer="sgd")
    steps = range(4)
    base = _model(plain_plan)
    in_memory = _train(base, plain_plan, steps, config)
    one_by_one = _model(cached_plan, tmp_path / "a")
    together = _model(cached_plan, tmp_path / "b")
    try:
        with monkeypatch.context() as patch:  # each table routes and looks up by itself
            patch.setattr(CachedTables, "resolve", lambda self, sparse: None)
            expected = _train(one_by_one, cached_plan, steps, config)
        assert calls == []
        got = _train(together, cached_plan, steps, config)
        # four caches (t0, t1, both shards of t2), all on the CPU: one call a step
        assert calls == [[CPU] * 4] * len(steps)
        assert got == expected
        assert got == pytest.approx(in_memory, abs=1e-6)
        stats, reference = together.embeddings.cache_stats(), one_by_one.embeddings.cache_stats()
        assert stats is not None and reference is not None
        assert {k: v for k, v in stats.items() if not k.endswith("_s")} \
            == {k: v for k, v in reference.items() if not k.endswith("_s")}
        assert stats["evictions"] > 0 and stats["uncached"] == 0 and stats["misses"] > 0
        for t in plain_plan.tables_spec.tables:
            weight = together.embeddings.weight(t.name)
            assert torch.equal(weight, one_by_one.embeddings.weight(t.name))
            torch.testing.assert_close(weight, base.embeddings.weight(t.name),
                                       atol=1e-6, rtol=1e-5)
    finally:
        one_by_one.embeddings.close()
        together.embeddings.close()


def test_cached_tables_are_not_row_blocks_nor_in_runtime_checkpoints(tmp_path: Path) -> None:
    _, plan = _plans("sgd")
    model = _model(plan, tmp_path / "store")
    try:
        blocks = model.embeddings.row_blocks()
        assert {seg.table for b in blocks for seg in b.segments} == {"t0"}
        trainer = Trainer(model, TrainConfig(batch_size=BATCH))
        trainer.step(SyntheticClicks(plan.tables_spec, 13, seed=3).batch(0, BATCH))
        assert set(export_tables(plan.tables_spec, trainer.row_opt)) == {"t0"}
        state = trainer.state(plan, 1, {}, [])
        trainer.restore(state, tmp_path / "ckpt")  # in-memory tables round-trip unchanged
    finally:
        model.embeddings.close()


def test_a_plan_with_cached_tables_needs_a_store_dir() -> None:
    _, plan = _plans("sgd")
    with pytest.raises(ConfigError, match=r"tables \['t1', 't2'\] are planned in a cached "
                                          r"tier .* store_dir"):
        embeddings_from_plan(plan, CPU)


def test_a_directory_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    _, plan = _plans("sgd")
    (tmp_path / "other.txt").write_text("not a store")
    with pytest.raises(ConfigError, match="holds no table stores"):
        embeddings_from_plan(plan, CPU, store_dir=str(tmp_path))


def test_a_store_whose_table_differs_is_refused(tmp_path: Path) -> None:
    _, plan = _plans("sgd")
    embeddings_from_plan(plan, CPU, store_dir=str(tmp_path / "s")).close()
    _, adagrad_plan = _plans("rowwise_adagrad")
    with pytest.raises(ConfigError, match="table 't1' does not match the plan "
                                          r"\(optimizer state None there, rowwise_adagrad here\)"):
        embeddings_from_plan(adagrad_plan, CPU, store_dir=str(tmp_path / "s"))


def test_training_without_a_learning_rate_is_refused(tmp_path: Path) -> None:
    _, plan = _plans("sgd")
    embeddings = embeddings_from_plan(plan, CPU, store_dir=str(tmp_path / "s"))
    try:
        batch = SyntheticClicks(plan.tables_spec, 13, seed=3).batch(0, 8)
        with torch.no_grad():
            embeddings(batch.sparse)  # evaluation needs none
        with pytest.raises(ConfigError, match="table 't1' is cached .* embedding_lr"):
            embeddings(batch.sparse)
        with pytest.raises(ConfigError, match="embedding_lr must be a finite number > 0"):
            embeddings.embedding_lr = 0.0
    finally:
        embeddings.close()


def test_ids_out_of_range_name_the_cached_table(tmp_path: Path) -> None:
    _, plan = _plans("sgd")
    embeddings = embeddings_from_plan(plan, CPU, store_dir=str(tmp_path / "s"), embedding_lr=0.1)
    try:
        batch = SyntheticClicks(plan.tables_spec, 13, seed=3).batch(0, 4).sparse
        ids = list(batch.ids)
        ids[1] = ids[1].clone()
        ids[1][0] = 1000
        with pytest.raises(IndexError, match="table 't1': id 1000 outside 0..999"):
            embeddings(type(batch)(tuple(ids), batch.offsets))
    finally:
        embeddings.close()


@pytest.mark.parametrize("sharding", [Sharding.COLUMN_WISE, Sharding.DATA_PARALLEL])
def test_cached_tiers_of_unsupported_shardings_are_refused(sharding: Sharding) -> None:
    spec = tables()
    shards = ((Shard(0, 0, 1000, 0, 4, Tier.STORE_CACHE, 10),
               Shard(1, 0, 1000, 4, 8, Tier.STORE_CACHE, 10))
              if sharding is Sharding.COLUMN_WISE else
              (Shard(0, 0, 1000, 0, 8, Tier.STORE_CACHE, 10),
               Shard(1, 0, 1000, 0, 8, Tier.STORE_CACHE, 10)))
    plan = table_wise(spec, topology(), {"t1": TablePlan("t1", sharding, shards, NO_COST)})
    with pytest.raises(PlanMismatchError, match=f"table 't1': {sharding.value} shards in tier "
                                                f"'store_cache' are not supported"):
        embeddings_from_plan(plan, CPU, store_dir="/nonexistent/never/created")


def test_store_starts_from_init_table_values_for_row_shards(tmp_path: Path) -> None:
    _, plan = _plans("sgd")
    needed = store_tables(plan.tables_spec, placements_from_plan(plan))
    assert [t.name for t in needed] == ["t1", "t2.rows-0-700", "t2.rows-700-1500"]
    embeddings = embeddings_from_plan(plan, CPU, seed=5, store_dir=str(tmp_path / "s"))
    try:
        spec = plan.tables_spec
        for index in (1, 2):
            expected = init_table(spec.tables[index], index, seed=5)
            assert torch.equal(embeddings.weight(spec.tables[index].name), expected)
    finally:
        embeddings.close()


def test_checkpoint_and_restore_through_the_store(tmp_path: Path) -> None:
    """Checkpoint at step 2, train on, restore step 2: the cached tables are back at
    step 2 and continue exactly like a run that never went past it; a store reopened
    after close is at the checkpoint too; restoring a step it lacks is refused."""
    _, plan = _plans("rowwise_adagrad")
    config = TrainConfig(batch_size=BATCH, lr=0.1, embedding_lr=0.2, dense_optimizer="sgd")
    store = tmp_path / "store"
    model = _model(plan, store)
    try:
        assert model.embeddings.store_checkpoint_step is None
        _train(model, plan, range(2), config)
        model.embeddings.checkpoint(2)
        at_two = {n: model.embeddings.weight(n) for n in ("t1", "t2")}
        _train(model, plan, range(2, 4), config)
        assert not torch.equal(model.embeddings.weight("t1"), at_two["t1"])
        with pytest.raises(CheckpointError, match="holds the checkpoint of step 2, not step 3"):
            model.embeddings.restore(3)
        model.embeddings.restore(2)
        for name, weight in at_two.items():
            assert torch.equal(model.embeddings.weight(name), weight)
        stats = model.embeddings.cache_stats()
        assert stats is not None and stats["accesses"] == 0  # fresh caches
    finally:
        model.embeddings.close()
    reopened = _model(plan, store)
    try:
        assert reopened.embeddings.store_checkpoint_step == 2
        for name, weight in at_two.items():
            assert torch.equal(reopened.embeddings.weight(name), weight)
    finally:
        reopened.embeddings.close()


def test_a_fresh_store_has_no_checkpoint_to_restore(tmp_path: Path) -> None:
    _, plan = _plans("sgd")
    embeddings = embeddings_from_plan(plan, CPU, store_dir=str(tmp_path / "s"))
    try:
        with pytest.raises(CheckpointError, match="holds no checkpoint, not step 0"):
            embeddings.restore(0)
    finally:
        embeddings.close()


def test_models_without_cached_tables_ignore_the_loop_api() -> None:
    plan, _ = _plans("sgd")
    embeddings = embeddings_from_plan(plan, CPU)
    assert isinstance(embeddings, InMemoryEmbeddings) and embeddings.cached is None
    embeddings.prefetch(SyntheticClicks(plan.tables_spec, 13, seed=3).batch(0, 4).sparse)
    assert embeddings.cache_stats() is None and embeddings.store_checkpoint_step is None
    embeddings.checkpoint(1)
    embeddings.restore(1)
    embeddings.close()


def test_runtime_checkpoints_are_kept_until_pruned(tmp_path: Path) -> None:
    """keep=None leaves every checkpoint (a step not yet decided by the two-phase
    commit keeps its predecessor); prune_checkpoints keeps only the decided one."""
    state = {"fingerprint": {}}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, state, keep=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    assert checkpoint_of_step(tmp_path, 2) == tmp_path / "ckpt-0000000002"
    prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert checkpoint_of_step(tmp_path, 1) is None
    save_checkpoint(tmp_path, 4, state)  # keep=1: only the newest
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    prune_checkpoints(tmp_path, None)
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="keep must be >= 1"):
        save_checkpoint(tmp_path, 5, state, keep=0)


def test_the_decision_record_round_trips_and_reports_damage(tmp_path: Path) -> None:
    assert read_decision(tmp_path) is None
    write_decision(tmp_path, 7)
    assert read_decision(tmp_path) == 7
    assert committed_step(tmp_path, two_phase=True) == 7
    assert committed_step(tmp_path, two_phase=False) is None  # no ckpt-* here
    (tmp_path / "committed.json").write_text("{")
    with pytest.raises(CheckpointError, match="decision record .* is unreadable"):
        read_decision(tmp_path)


def test_the_store_dir_holds_one_store_per_plan_device(tmp_path: Path) -> None:
    _, plan = _plans("sgd")  # cached shards on devices 0 and 1
    embeddings_from_plan(plan, CPU, store_dir=str(tmp_path / "s")).close()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["device-0", "device-1"]
    only_one = embeddings_from_plan(plan, CPU, store_dir=str(tmp_path / "s"))
    try:
        assert sorted(only_one.cached.stores) == [0, 1]
    finally:
        only_one.close()
    single = tmp_path / "old"
    from storage import TableStore
    TableStore.create(single).close()  # one store at the root: an older layout
    with pytest.raises(ConfigError, match="is one table store \\(runs keep one per plan "
                                          "device"):
        embeddings_from_plan(plan, CPU, store_dir=str(single))


def test_a_store_half_built_by_a_killed_run_is_built_again(tmp_path: Path) -> None:
    """Stores are built beside their path and renamed into place: what a run killed
    while building leaves is a hidden leftover, removed by the next run."""
    _, plan = _plans("sgd")
    leftover = tmp_path / "s" / ".device-0.tmp-12345"
    leftover.mkdir(parents=True)
    (leftover / "zarr.json").write_text("{ torn")
    embeddings = embeddings_from_plan(plan, CPU, seed=5, store_dir=str(tmp_path / "s"))
    try:
        assert torch.equal(embeddings.weight("t1"), init_table(plan.tables_spec.tables[1], 1, 5))
    finally:
        embeddings.close()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["device-0", "device-1"]


def test_caches_on_the_cpu_do_their_store_work_inline() -> None:
    assert cached_module.background_store_work(torch.device("cpu")) is False
    assert cached_module.background_store_work(torch.device("cuda", 0)) is True
