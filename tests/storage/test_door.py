"""The storage door: every name in ``storage.__all__`` is importable from it, and the
store alone does not import torch (the row cache and row optimizers load on first use)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import storage
from storage.row_update import ADAGRAD_EPS, rowwise_adagrad, rowwise_adagrad_, sgd

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_the_store_alone_does_not_import_torch(tmp_path: Path) -> None:
    code = f"""
import sys
import storage
store = storage.TableStore.create({str(tmp_path / 's')!r})
store.add_table("t", 100, 4, init="zeros")
store.checkpoint(1)
store.close()
storage.check_table_name("t"); storage.TableSpecError; storage.CacheArgumentError
storage.replay; storage.StoreError
assert "torch" not in sys.modules, "import storage imported torch"
storage.RowCache
assert "torch" in sys.modules
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_every_door_name_is_importable() -> None:
    for name in storage.__all__:
        assert getattr(storage, name) is not None, name
    assert set(storage.__all__) <= set(dir(storage))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        storage.nope  # noqa: B018


def test_the_door_names_are_the_modules_objects() -> None:
    from storage.cache import POLICIES, RowCache, lookup_many
    from storage.errors import TableSpecError
    from storage.layout import check_table_name

    assert storage.RowCache is RowCache
    assert storage.lookup_many is lookup_many
    assert storage.CACHE_POLICIES is POLICIES
    assert storage.rowwise_adagrad is rowwise_adagrad and storage.sgd is sgd
    assert storage.ADAGRAD_EPS == ADAGRAD_EPS == 1e-8
    assert storage.TableSpecError is TableSpecError
    assert storage.check_table_name is check_table_name


def _rows(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(6, 5, generator=gen)
    state = torch.rand(6, generator=gen)
    grads = torch.randn(6, 5, generator=gen)
    return weights, state, grads


def test_rowwise_adagrad_is_the_written_formula_and_leaves_its_inputs() -> None:
    weights, state, grads = _rows(0)
    before = weights.clone(), state.clone()
    new_weights, new_state = rowwise_adagrad(weights, state, grads, 0.05)
    s = state + grads.pow(2).mean(dim=1)
    assert torch.equal(new_state, s)
    assert torch.equal(new_weights, weights - 0.05 * grads / (torch.sqrt(s).unsqueeze(1) + 1e-8))
    assert torch.equal(weights, before[0]) and torch.equal(state, before[1])
    assert torch.equal(sgd(weights, grads, 0.05), weights - 0.05 * grads)


def test_rowwise_adagrad_in_place_is_the_runtime_form() -> None:
    weights, state, grads = _rows(1)
    rows = torch.tensor([4, 0, 2])
    w, s = weights.clone(), state.clone()
    rowwise_adagrad_(w, s, rows, grads[:3], 0.05)
    ref_w, ref_s = weights.clone(), state.clone()
    ref_s.index_add_(0, rows, grads[:3].pow(2).mean(dim=1))
    scale = (ref_s[rows].sqrt() + ADAGRAD_EPS).reciprocal().unsqueeze(1)
    ref_w.index_add_(0, rows, (grads[:3] * (scale * -0.05)).to(ref_w.dtype))
    assert torch.equal(w, ref_w) and torch.equal(s, ref_s)
    untouched = torch.tensor([1, 3, 5])
    assert torch.equal(w[untouched], weights[untouched])
    given = weights.clone(), state.clone()
    rowwise_adagrad_(*given, rows, grads[:3], 0.05, mean_sq=grads[:3].pow(2).mean(dim=1))
    assert torch.equal(given[0], w) and torch.equal(given[1], s)
