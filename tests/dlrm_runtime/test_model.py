"""DLRM's math against a direct computation, shapes, initialisation and errors."""

from __future__ import annotations

import math

import pytest
import torch

from dlrm_runtime import ConfigError, DLRM, Interaction, ModelConfig, SparseBatch, embeddings_in_memory
from planner import parse_tables
from tests.conftest import small_tables_doc


def _model(interaction: Interaction = Interaction.DOT, dim: int = 8, seed: int = 0) -> DLRM:
    tables = parse_tables(small_tables_doc(num_tables=3, rows=50, dim=dim))
    config = ModelConfig(dense_features=5, bottom_mlp=(7, dim), top_mlp=(6, 1), interaction=interaction)
    return DLRM(config, embeddings_in_memory(tables, seed), [dim] * 3, seed)


def _batch(batch: int = 4) -> tuple[torch.Tensor, SparseBatch]:
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(batch, 5, generator=g)
    ids, offsets = [], []
    for rows in (50, 100, 150):
        lengths = torch.randint(0, 4, (batch,), generator=g)  # empty bags included
        ids.append(torch.randint(0, rows, (int(lengths.sum()),), generator=g))
        offsets.append(torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))
    return dense, SparseBatch(tuple(ids), tuple(offsets))


def _direct(model: DLRM, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
    """The paper's formulas written out by hand."""
    x = dense
    for layer in model.mlp_layers()[:2]:
        x = torch.relu(x @ layer.weight.T + layer.bias)  # ReLU after every bottom layer
    features = [x]
    for t, name in enumerate(("t0", "t1", "t2")):
        weight = model.embeddings.weight(name)
        bags = []
        for b in range(dense.shape[0]):
            rows = sparse.ids[t][sparse.offsets[t][b]:sparse.offsets[t][b + 1]]
            bags.append(weight[rows].sum(0) if rows.numel() else torch.zeros(weight.shape[1]))
        features.append(torch.stack(bags))
    if model.config.interaction is Interaction.DOT:
        dots = [(features[i] * features[j]).sum(1) for i in range(1, 4) for j in range(i)]
        z = torch.cat([x, torch.stack(dots, 1)], 1)
    else:
        z = torch.cat(features, 1)
    top = model.mlp_layers()[2:]
    z = torch.relu(z @ top[0].weight.T + top[0].bias)
    return (z @ top[1].weight.T + top[1].bias).squeeze(1)  # no ReLU on the logit


@pytest.mark.parametrize("interaction", list(Interaction))
def test_forward_matches_direct_computation(interaction: Interaction) -> None:
    model = _model(interaction)
    dense, sparse = _batch()
    with torch.no_grad():
        assert torch.allclose(model(dense, sparse), _direct(model, dense, sparse), atol=1e-5)


def test_shapes_and_layers() -> None:
    model = _model()
    dense, sparse = _batch(batch=6)
    assert model(dense, sparse).shape == (6,)
    widths = [(l.in_features, l.out_features) for l in model.mlp_layers()]
    assert widths == [(5, 7), (7, 8), (8 + 6, 6), (6, 1)]  # 3 tables + bottom: 4*3/2 dots
    cat = _model(Interaction.CAT)
    assert [l.in_features for l in cat.mlp_layers()][2] == 8 + 3 * 8


def test_initialisation_follows_reference() -> None:
    tables = parse_tables(small_tables_doc(num_tables=1, rows=4000, dim=64))
    config = ModelConfig(dense_features=300, bottom_mlp=(400, 64), top_mlp=(200, 1))
    model = DLRM(config, embeddings_in_memory(tables), [64])
    first = model.mlp_layers()[0]
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / 700), rel=0.05)
    assert first.bias.std().item() == pytest.approx(math.sqrt(1 / 400), rel=0.2)
    weight = model.embeddings.weight("t0")
    bound = math.sqrt(1 / 4000)
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.95 * bound


def test_same_seed_same_weights_other_seed_differs() -> None:
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    assert torch.equal(a.embeddings.weight("t1"), b.embeddings.weight("t1"))
    assert torch.equal(a.mlp_layers()[0].weight, b.mlp_layers()[0].weight)
    assert not torch.equal(a.embeddings.weight("t1"), c.embeddings.weight("t1"))


def test_id_out_of_range_names_table() -> None:
    model = _model()
    dense, sparse = _batch()
    ids = list(sparse.ids)
    ids[1] = torch.full_like(ids[1], 100)
    with pytest.raises(IndexError, match="table 't1': id 100 outside 0..99"):
        model(dense, SparseBatch(tuple(ids), sparse.offsets))


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (ModelConfig(5, (7, 9), (6, 1)), "dot interaction needs one width"),
        (ModelConfig(5, (7, 8), (6, 2)), "top_mlp must end with 1"),
        (ModelConfig(5, (), (6, 1)), "bottom_mlp needs one or more positive widths"),
        (ModelConfig(0, (7, 8), (6, 1)), "dense_features must be >= 1"),
    ],
)
def test_config_errors(config: ModelConfig, fragment: str) -> None:
    tables = parse_tables(small_tables_doc(num_tables=2, dim=8))
    with pytest.raises(ConfigError) as info:
        DLRM(config, embeddings_in_memory(tables), [8, 8])
    assert fragment in str(info.value)


def test_dot_interaction_gradient_matches_autograd() -> None:
    """The hand-written backward (symmetric scatter, one bmm) against autograd's."""
    from dlrm_runtime.model import DotInteraction

    g = torch.Generator().manual_seed(3)
    dense = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    pooled = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)  # [T, B, D]
    upstream = torch.randn(4, 6 + 6, dtype=torch.float64, generator=g)
    ours = DotInteraction(3)
    out = ours(dense, pooled)
    grads = torch.autograd.grad(out, (dense, pooled), upstream)
    features = torch.cat([dense.unsqueeze(1), pooled.transpose(0, 1)], 1)
    rows, cols = torch.tril_indices(4, 4, offset=-1)
    expected_out = torch.cat([dense, torch.bmm(features, features.transpose(1, 2))[:, rows, cols]], 1)
    expected = torch.autograd.grad(expected_out, (dense, pooled), upstream)
    torch.testing.assert_close(out, expected_out)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
    listed = ours(dense, list(pooled.unbind(0)))  # the list form gives the same
    torch.testing.assert_close(listed, out)


@pytest.mark.parametrize("relu_last", [True, False])
def test_fused_mlp_matches_autograd(relu_last: bool) -> None:
    from dlrm_runtime.model import mlp

    g = torch.Generator().manual_seed(5)
    fused = mlp((5, 7, 6, 3), relu_last, g).double()
    plain = torch.nn.Sequential(*fused).double()  # the same modules, autograd per layer
    x = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(9, 3, dtype=torch.float64, generator=g)
    out = fused(x)
    grads = torch.autograd.grad(out, (x, *fused.parameters()), upstream)
    expected_out = plain(x)
    expected = torch.autograd.grad(expected_out, (x, *plain.parameters()), upstream)
    torch.testing.assert_close(out, expected_out)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
    if relu_last:
        assert bool((out >= 0).all())
    # without an input gradient (dense features), only the parameters get gradients
    out = fused(x.detach())
    (out * upstream).sum().backward()
    for p, e in zip(fused.parameters(), expected[1:]):
        torch.testing.assert_close(p.grad, e)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected_out)
