"""train() with tables in cached tiers: the same run as in memory, checkpoints that
commit the runtime and the table store together, resume, and the store's guards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlrm_runtime import CheckpointError, ConfigError, TrainConfig, build_model, train
from dlrm_runtime.checkpoint import list_checkpoints, read_decision
from tests.dlrm_runtime.test_cached import MODEL, _plans

STEPS = 6


def _config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(steps=STEPS, batch_size=64, eval_batches=1, log_every=2, seed=3,
                embedding_lr=0.2, store_dir=str(tmp_path / "store"))
    base.update(kw)
    return TrainConfig(**base)


def _weights(plan, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Every table's weights as the run left them: reopen the store at its checkpoint."""
    model = build_model(plan, MODEL, config.seed, store_dir=config.store_dir, embedding_lr=0.2)
    try:
        return {t.name: model.embeddings.weight(t.name).clone()
                for t in plan.tables_spec.tables}
    finally:
        model.embeddings.close()


def test_cached_run_equals_the_in_memory_run(tmp_path: Path) -> None:
    plain, cached = _plans("rowwise_adagrad")
    memory = train(plain, MODEL, _config(tmp_path, store_dir=None))
    through_store = train(cached, MODEL, _config(tmp_path))
    assert through_store.train_loss == pytest.approx(memory.train_loss, rel=1e-5)
    assert through_store.validation.auc == pytest.approx(memory.validation.auc, abs=1e-6)
    assert through_store.times.update_ms > 0  # the fused updates in the backward count here
    assert through_store.embedding_bytes < memory.embedding_bytes  # only cached rows held


def test_checkpoint_and_resume_through_the_store(tmp_path: Path) -> None:
    _, cached = _plans("sgd")
    straight = _config(tmp_path / "a", checkpoint_dir=str(tmp_path / "a" / "ck"))
    train(cached, MODEL, straight)
    first = _config(tmp_path / "b", steps=4, checkpoint_dir=str(tmp_path / "b" / "ck"),
                    checkpoint_every=2)
    train(cached, MODEL, first)
    # one transaction: the decision record names step 4, the only checkpoint kept
    assert [step for step, _ in list_checkpoints(first.checkpoint_dir)] == [4]
    assert read_decision(first.checkpoint_dir) == 4
    with pytest.raises(CheckpointError, match="already holds checkpoints .*committed: step 4"):
        train(cached, MODEL, _config(tmp_path / "b", checkpoint_dir=first.checkpoint_dir))
    resumed = train(cached, MODEL, _config(tmp_path / "b", checkpoint_dir=first.checkpoint_dir,
                                           resume=True))
    assert resumed.resumed_from == 4
    for name, weight in _weights(cached, straight).items():
        torch.testing.assert_close(_weights(cached, _config(tmp_path / "b"))[name], weight,
                                   rtol=0, atol=0)


def test_a_store_ahead_of_the_checkpoint_dir_is_refused(tmp_path: Path) -> None:
    _, cached = _plans("sgd")
    run = _config(tmp_path, steps=2, checkpoint_dir=str(tmp_path / "ck"))
    train(cached, MODEL, run)
    with pytest.raises(CheckpointError, match="holds tables trained to step 2, but the run "
                                              "has no committed checkpoint"):
        train(cached, MODEL, _config(tmp_path, checkpoint_dir=str(tmp_path / "other"),
                                     resume=True))
    with pytest.raises(CheckpointError, match="holds tables trained to step 2"):
        train(cached, MODEL, _config(tmp_path))  # no checkpoint dir at all


def test_cached_plan_needs_a_store_dir(tmp_path: Path) -> None:
    _, cached = _plans("sgd")
    with pytest.raises(ConfigError):
        train(cached, MODEL, _config(tmp_path, store_dir=None))
