"""DLRM (Naumov et al. 2019, arXiv 1906.00091) in four parts with shape contracts:

    dense [B, F] ──► BottomMLP ──► x [B, D] ─┐
    sparse ids  ──► embeddings ──► e_t [B, D] ┴─► Interaction ──► [B, I] ──► TopMLP ──► logit [B]

The model returns logits; ``torch.sigmoid`` of them is the click probability and the
loss is binary cross-entropy on it (computed from logits for numerical stability).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dlrm_runtime.config import Interaction, ModelConfig
from dlrm_runtime.sparse import SparseBatch


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """The reference implementation's init: W ~ N(0, sqrt(2/(fan_in+fan_out))),
    b ~ N(0, sqrt(1/fan_out))."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
        layer.bias.normal_(0.0, math.sqrt(1.0 / fan_out), generator=generator)


def mlp(widths: Sequence[int], relu_last: bool, generator: torch.Generator) -> nn.Sequential:
    """Linear layers ``widths[0] -> widths[1] -> ...`` with ReLU between them (and after
    the last when ``relu_last``)."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        linear = nn.Linear(widths[i], widths[i + 1])
        _init_linear(linear, generator)
        layers.append(linear)
        if relu_last or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DotInteraction(nn.Module):
    """[B, D] and T tensors [B, D] -> [B, D + (T+1)T/2]: the bottom output followed by
    the strictly-lower-triangle pairwise dot products (row-major: for i in 1..T, for j
    in 0..i-1) of the features [x, e_0, ..., e_{T-1}]."""

    def __init__(self, num_tables: int) -> None:
        super().__init__()
        n = num_tables + 1
        rows, cols = torch.tril_indices(n, n, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, dense: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        features = torch.stack([dense, *pooled], dim=1)  # [B, T+1, D]
        gram = torch.bmm(features, features.transpose(1, 2))  # [B, T+1, T+1]
        return torch.cat([dense, gram[:, self.rows, self.cols]], dim=1)

    @staticmethod
    def output_width(num_tables: int, dim: int) -> int:
        return dim + (num_tables + 1) * num_tables // 2


class CatInteraction(nn.Module):
    """[B, D0] and T tensors [B, D_t] -> [B, D0 + sum D_t]."""

    def forward(self, dense: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([dense, *pooled], dim=1)


class DLRM(nn.Module):
    """Bottom MLP, an embedding module, interaction, top MLP.

    ``embeddings`` is any module mapping a :class:`SparseBatch` to a list of pooled
    ``[B, D_t]`` tensors on the dense device, one per table in spec order, and
    exposing ``weight(name)``.
    """

    def __init__(self, config: ModelConfig, embeddings: nn.Module, embedding_dims: Sequence[int],
                 seed: int = 0) -> None:
        super().__init__()
        config.check(tuple(embedding_dims))
        generator = torch.Generator().manual_seed(seed)
        self.config = config
        self.bottom = mlp((config.dense_features, *config.bottom_mlp), True, generator)
        self.embeddings = embeddings
        num_tables = len(embedding_dims)
        if config.interaction is Interaction.DOT:
            self.interaction: nn.Module = DotInteraction(num_tables)
            width = DotInteraction.output_width(num_tables, config.bottom_mlp[-1])
        else:
            self.interaction = CatInteraction()
            width = config.bottom_mlp[-1] + sum(embedding_dims)
        self.top = mlp((width, *config.top_mlp), False, generator)

    def forward(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        x = self.bottom(dense)  # [B, D]
        pooled = self.embeddings(sparse)  # T x [B, D_t]
        z = self.interaction(x, pooled)  # [B, I]
        return self.top(z).squeeze(1)  # [B] logits

    def mlp_layers(self) -> list[nn.Linear]:
        """Every ``nn.Linear`` of the bottom then the top MLP, in order."""
        return [m for part in (self.bottom, self.top) for m in part if isinstance(m, nn.Linear)]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for part in (self.bottom, self.top) for p in part.parameters()]
