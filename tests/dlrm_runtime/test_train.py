"""Synthetic data, fused row optimizers, the training loop and its errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from dlrm_runtime import (
    ConfigError,
    ModelConfig,
    PlanMismatchError,
    SyntheticClicks,
    TrainConfig,
    TrainingDivergedError,
    check_plan_matches,
    train,
)
from dlrm_runtime.data import zipf_ranks
from dlrm_runtime.measure import accuracy, roc_auc
from dlrm_runtime.embeddings import RowOptimizer
from storage import ADAGRAD_EPS
from planner import AccessProfile, Sharding, Tier, parse_tables, parse_topology, plan
from planner import Shard, TablePlan
from tests.conftest import small_tables_doc, small_topology_doc


def _plan(num_tables: int = 4, rows: int = 500):
    return plan(parse_tables(small_tables_doc(num_tables=num_tables, rows=rows)),
                parse_topology(small_topology_doc()))


def test_batches_are_pure_functions_of_seed_and_index() -> None:
    tables = parse_tables(small_tables_doc())
    a = SyntheticClicks(tables, seed=1).batch(7, 64)
    b = SyntheticClicks(tables, seed=1).batch(7, 64)
    c = SyntheticClicks(tables, seed=1).batch(8, 64)
    assert torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
    assert all(torch.equal(x, y) for x, y in zip(a.sparse.ids, b.sparse.ids))
    assert not torch.equal(a.dense, c.dense)
    # pooling factors 1, 2, 3, 1 ids per sample, all in range
    for t, per in enumerate((1, 2, 3, 1)):
        assert a.sparse.offsets[t].tolist() == list(range(0, 64 * per + 1, per))
        assert 0 <= int(a.sparse.ids[t].min()) and int(a.sparse.ids[t].max()) < 500 * (t + 1)


def test_zipf_ranks_follow_the_power_law() -> None:
    u = np.random.default_rng(0).random(400_000)
    ranks = zipf_ranks(u, 1000, 1.05)
    assert ranks.min() >= 0 and ranks.max() <= 999
    counts = np.bincount(ranks, minlength=1000)
    # P(rank k) ~ (k+1)^-s: rank 0 vs rank 9 differ by about 10^1.05
    assert counts[0] / counts[9] == pytest.approx(10 ** 1.05, rel=0.1)
    assert counts[0] / counts[99] == pytest.approx(100 ** 1.05, rel=0.2)
    # share of the hottest 20 matches the planner's hit-rate formula
    share = counts[:20].sum() / counts.sum()
    assert share == pytest.approx(AccessProfile(zipf=1.05).hit_rate(1000, 20), abs=0.01)
    tail = zipf_ranks(u, 100_000, 1.05)  # head exact, tail continuous
    tail_share = (tail < 20_000).mean()
    assert tail_share == pytest.approx(AccessProfile(zipf=1.05).hit_rate(100_000, 20_000), abs=0.01)


def test_teacher_labels_are_informative() -> None:
    data = SyntheticClicks(parse_tables(small_tables_doc()), seed=0)
    batch = data.batch(0, 4096)
    auc = roc_auc(batch.labels.numpy(), batch.teacher_prob.numpy())
    assert 0.8 < auc < 0.99
    assert 0.2 < float(batch.labels.mean()) < 0.8


def test_metrics() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))
    assert accuracy(labels, np.array([0.1, 0.6, 0.7, 0.9])) == pytest.approx(0.75)


def test_row_sgd_equals_dense_sgd() -> None:
    spec = parse_tables(small_tables_doc(num_tables=1, rows=20)).tables
    weight = torch.nn.Parameter(torch.randn(20, 8))
    reference = torch.nn.Parameter(weight.detach().clone())
    ids = torch.tensor([1, 5, 5, 19, 1, 3])
    offsets = torch.tensor([0, 2, 4, 6])
    optimizer = RowOptimizer(spec, [weight], lr=0.1)
    ref_optimizer = torch.optim.SGD([reference], lr=0.1)
    for _ in range(3):
        out = torch.nn.functional.embedding_bag(ids, weight, offsets, mode="sum", sparse=True,
                                                include_last_offset=True)
        ref = torch.nn.functional.embedding_bag(ids, reference, offsets, mode="sum",
                                                include_last_offset=True)
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
        (out ** 2).sum().backward()
        (ref ** 2).sum().backward()
        optimizer.step()
        ref_optimizer.step()
    assert torch.allclose(weight, reference, atol=1e-6)


def test_rowwise_adagrad_matches_formula() -> None:
    doc = small_tables_doc(num_tables=1, rows=10)
    doc["tables"][0]["optimizer"] = "rowwise_adagrad"
    spec = parse_tables(doc).tables
    weight = torch.nn.Parameter(torch.randn(10, 8))
    expected = weight.detach().clone()
    state = torch.zeros(10)
    optimizer = RowOptimizer(spec, [weight], lr=0.5)
    ids, offsets = torch.tensor([2, 7, 2]), torch.tensor([0, 1, 3])
    for _ in range(2):
        out = torch.nn.functional.embedding_bag(ids, weight, offsets, mode="sum", sparse=True,
                                                include_last_offset=True)
        optimizer.zero_grad()
        (out * torch.arange(8.0)).sum().backward()
        grad = torch.zeros(10, 8)
        grad[2] = 2 * torch.arange(8.0)
        grad[7] = torch.arange(8.0)
        for row in (2, 7):
            state[row] += grad[row].pow(2).mean()
            expected[row] -= 0.5 * grad[row] / (state[row].sqrt() + ADAGRAD_EPS)
        optimizer.step()
    assert torch.allclose(weight, expected, atol=1e-6)


def test_short_training_learns() -> None:
    log = io.StringIO()
    result = train(_plan(), ModelConfig(dense_features=13, bottom_mlp=(32, 8), top_mlp=(32, 1)),
                   TrainConfig(steps=300, batch_size=128, log_every=100, eval_batches=8),
                   metrics_log=log)
    v = result.validation
    assert v.auc > 0.72, v
    assert v.auc < v.teacher_auc
    assert 0.0 < v.loss < 0.69
    records = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [(r["event"], r["step"]) for r in records] == [
        ("train", 100), ("train", 200), ("train", 300), ("timing", 300), ("eval", 300)]
    assert records[-1]["auc"] == pytest.approx(v.auc)
    times = result.times
    assert times is not None and times.steps == 300
    assert min(times.lookup_ms, times.dense_ms, times.update_ms, times.data_ms) > 0
    assert records[-2]["measured"]["steps"] == 300
    assert records[-2]["predicted"]["devices"] == list(range(result.prediction.devices[-1] + 1))


def test_training_is_deterministic() -> None:
    config = TrainConfig(steps=20, batch_size=64, eval_batches=2, seed=5)
    model = ModelConfig(bottom_mlp=(16, 8), top_mlp=(8, 1))
    a, b = train(_plan(), model, config), train(_plan(), model, config)
    assert a.train_loss == b.train_loss and a.validation.auc == b.validation.auc


def test_nan_loss_stops_with_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    original = SyntheticClicks.batch

    def poisoned(self, index, batch_size):
        batch = original(self, index, batch_size)
        if index == 3:
            batch.dense[0, 0] = float("nan")
        return batch

    monkeypatch.setattr(SyntheticClicks, "batch", poisoned)
    with pytest.raises(TrainingDivergedError, match="at step 3") as info:
        train(_plan(), ModelConfig(bottom_mlp=(16, 8)), TrainConfig(steps=10, batch_size=16))
    assert info.value.step == 3


def test_plan_mismatch_errors() -> None:
    result = _plan()
    check_plan_matches(result, parse_tables(small_tables_doc()))
    with pytest.raises(PlanMismatchError, match="missing from the plan \\['t4'\\]"):
        check_plan_matches(result, parse_tables(small_tables_doc(num_tables=5)))
    changed = small_tables_doc()
    changed["tables"][1]["embedding_dim"] = 16
    with pytest.raises(PlanMismatchError, match="table 't1' differs"):
        check_plan_matches(result, parse_tables(changed))


def test_cached_tiers_are_refused_naming_the_table() -> None:
    result = _plan()
    first = result.tables[0]
    cached = TablePlan(first.name, Sharding.ROW_WISE,
                       (Shard(0, 0, 250, 0, 8), Shard(1, 250, 500, 0, 8, Tier.DRAM_CACHE, 100)),
                       first.cost)
    tampered = type(result)(result.tables_spec, result.topology, result.cost_model,
                            (cached, *result.tables[1:]), result.devices, result.solve)
    with pytest.raises(PlanMismatchError, match="table 't0': tier 'dram_cache' is not supported"):
        train(tampered, ModelConfig(bottom_mlp=(16, 8)), TrainConfig(steps=1))


def test_row_adam_matches_sparse_adam() -> None:
    doc = small_tables_doc(num_tables=1, rows=30)
    doc["tables"][0]["optimizer"] = "adam"
    spec = parse_tables(doc).tables
    weight = torch.nn.Parameter(torch.randn(30, 8))
    reference = torch.nn.Parameter(weight.detach().clone())
    optimizer = RowOptimizer(spec, [weight], lr=0.05)
    ref_optimizer = torch.optim.SparseAdam([reference], lr=0.05)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        ids = torch.randint(0, 30 if step else 5, (12,), generator=g)  # rows touched vary
        offsets = torch.tensor([0, 3, 7, 12])
        target = torch.randn(3, 8, generator=g)
        for w, opt in ((weight, optimizer), (reference, ref_optimizer)):
            out = torch.nn.functional.embedding_bag(ids, w, offsets, mode="sum", sparse=True,
                                                    include_last_offset=True)
            opt.zero_grad()
            ((out - target) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(weight, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (TrainConfig(steps=0), "steps must be >= 1"),
        (TrainConfig(lr=0.0), "lr must be > 0"),
        (TrainConfig(dense_optimizer="lbfgs"), "dense_optimizer must be"),
    ],
)
def test_train_config_errors(config: TrainConfig, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        train(_plan(), ModelConfig(bottom_mlp=(16, 8)), config)
