"""The sparse optimizers' row formulas, written once: SGD and row-wise Adagrad on rows
of an embedding table (torch only; nothing here knows about the store or a cache).

Row-wise Adagrad keeps one fp32 accumulator per row: ``s += mean(g**2)`` over the
row's full width, then ``w -= lr * g / (sqrt(s) + eps)``.

Two forms give different bits, so both are here, each exactly as its callers
compute it:

* :func:`rowwise_adagrad` (and :func:`sgd`): out of place, on fp32 copies of the rows,
  ``w - lr * g / (sqrt(s) + eps)``; the row cache (:class:`~storage.RowCache`) steps
  its rows with these;
* :func:`rowwise_adagrad_`: in place on a table's weights and state at ``rows``,
  adding ``g * (1 / (sqrt(s) + eps) * -lr)`` with ``index_add_``; the runtime's
  in-memory tables and the fused step on a cache's slots use this form.
"""

from __future__ import annotations

import torch

ADAGRAD_EPS = 1e-8
"""Row-wise Adagrad's default epsilon (added to ``sqrt(s)``)."""


def sgd(weights: torch.Tensor, grads: torch.Tensor, lr: float) -> torch.Tensor:
    """SGD on rows: ``weights - lr * grads`` (same shapes; a new tensor)."""
    return weights - lr * grads


def rowwise_adagrad(weights: torch.Tensor, state: torch.Tensor, grads: torch.Tensor,
                    lr: float, eps: float = ADAGRAD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise Adagrad on rows, out of place: ``(new_weights, new_state)``.

    ``weights`` and ``grads``: ``(rows, dim)``; ``state``: ``(rows,)``, each row's sum of
    mean squared gradients. ``s = state + mean(g**2)``; ``w = weights - lr * g /
    (sqrt(s) + eps)``. The inputs are not changed.
    """
    state = state + grads.pow(2).mean(dim=1)
    return weights - lr * grads / (torch.sqrt(state).unsqueeze(1) + eps), state


def rowwise_adagrad_(weights: torch.Tensor, state: torch.Tensor, rows: torch.Tensor,
                     grads: torch.Tensor, lr: float, eps: float = ADAGRAD_EPS, *,
                     mean_sq: torch.Tensor | None = None) -> None:
    """Row-wise Adagrad in place on ``weights[rows]`` and ``state[rows]``.

    ``rows``: distinct row indices (int64); ``grads``: their summed gradients,
    ``(len(rows), dim)`` fp32; ``mean_sq``: ``grads.pow(2).mean(dim=1)`` when the caller
    has it already (e.g. the mean of a sharded row over all its shards). The state
    grows by ``mean_sq``; the weights get ``grads * (1 / (sqrt(s) + eps) * -lr)``,
    rounded to their dtype, added with ``index_add_``.
    """
    if mean_sq is None:
        mean_sq = grads.pow(2).mean(dim=1)
    state.index_add_(0, rows, mean_sq)
    scale = (state[rows].sqrt() + eps).reciprocal().unsqueeze(1)
    weights.index_add_(0, rows, (grads * (scale * -lr)).to(weights.dtype))
