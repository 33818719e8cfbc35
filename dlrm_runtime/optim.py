"""Fused row-wise updates of embedding tables from their sparse gradients."""

from __future__ import annotations

import torch
from torch import nn

from planner import Optimizer, TableSpec

ADAGRAD_EPS = 1e-8


class RowOptimizer:
    """Applies each table's optimizer (from its spec) to the rows touched this step.

    - SGD: ``w[r] -= lr * g[r]``;
    - row-wise Adagrad: one fp32 accumulator per row, ``s[r] += mean(g[r]**2)``,
      ``w[r] -= lr * g[r] / (sqrt(s[r]) + eps)``;
    - Adam: per-element moments (torch's SparseAdam).
    """

    def __init__(self, specs: tuple[TableSpec, ...], weights: list[nn.Parameter], lr: float) -> None:
        self.lr = lr
        self.entries: list[tuple[TableSpec, nn.Parameter, torch.Tensor | None]] = []
        adam = []
        for spec, weight in zip(specs, weights):
            if spec.optimizer is Optimizer.ADAM:
                adam.append(weight)
                continue
            state = None
            if spec.optimizer is Optimizer.ROWWISE_ADAGRAD:
                state = torch.zeros(spec.num_embeddings, dtype=torch.float32, device=weight.device)
            self.entries.append((spec, weight, state))
        self.adam = torch.optim.SparseAdam(adam, lr=lr) if adam else None

    def zero_grad(self) -> None:
        for _, weight, _ in self.entries:
            weight.grad = None
        if self.adam is not None:
            self.adam.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> None:
        for _, weight, state in self.entries:
            if weight.grad is None:
                continue
            grad = weight.grad.coalesce()
            rows = grad.indices()[0]
            values = grad.values()
            if state is None:
                weight.index_add_(0, rows, values, alpha=-self.lr)
                continue
            state.index_add_(0, rows, values.float().pow(2).mean(dim=1))
            scale = (state[rows].sqrt() + ADAGRAD_EPS).reciprocal().unsqueeze(1)
            weight.index_add_(0, rows, (values.float() * scale).to(weight.dtype), alpha=-self.lr)
        if self.adam is not None:
            self.adam.step()
