"""A straightforward PyTorch DLRM, written the way the paper's reference implementation
(facebookresearch/dlrm, ``dlrm_s_pytorch.py``) writes it, as the baseline of
``bench/throughput.py``:

- one ``nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)`` per table, initialised
  uniform in +-sqrt(1/rows);
- bottom MLP with ReLU after every layer, top MLP with ReLU between layers and a
  sigmoid at the end, ``nn.Linear`` layers initialised N(0, sqrt(2/(fan_in+fan_out))),
  biases N(0, sqrt(1/fan_out));
- dot interaction: ``bmm`` of the stacked features with themselves, the strictly lower
  triangle gathered by index, concatenated after the bottom output;
- ``nn.BCELoss`` on the sigmoid output, one ``torch.optim.SGD`` over all parameters
  (sparse embedding gradients included), ``zero_grad``, ``backward``, ``step``.

One deviation in the reference's favour: the triangle's index tensors are built once
here, where the reference builds them with a Python list comprehension every forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def _mlp(widths: Sequence[int], sigmoid_layer: int, rng: np.random.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        n, m = widths[i], widths[i + 1]
        linear = nn.Linear(n, m, bias=True)
        w = rng.normal(0.0, math.sqrt(2.0 / (m + n)), size=(m, n)).astype(np.float32)
        b = rng.normal(0.0, math.sqrt(1.0 / m), size=m).astype(np.float32)
        linear.weight.data = torch.tensor(w, requires_grad=True)
        linear.bias.data = torch.tensor(b, requires_grad=True)
        layers.append(linear)
        layers.append(nn.Sigmoid() if i == sigmoid_layer else nn.ReLU())
    return nn.Sequential(*layers)


class ReferenceDLRM(nn.Module):
    """``ln_bot`` includes the dense input width; ``ln_top`` excludes the interaction
    width (prepended here, as the reference does with ``--arch-mlp-top``)."""

    def __init__(self, table_rows: Sequence[int], dim: int, ln_bot: Sequence[int],
                 ln_top: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.emb_l = nn.ModuleList()
        for n in table_rows:
            bag = nn.EmbeddingBag(n, dim, mode="sum", sparse=True)
            w = rng.uniform(-np.sqrt(1 / n), np.sqrt(1 / n), size=(n, dim)).astype(np.float32)
            bag.weight.data = torch.tensor(w, requires_grad=True)
            self.emb_l.append(bag)
        self.bot_l = _mlp(ln_bot, -1, rng)
        num_features = len(table_rows) + 1
        num_int = dim + num_features * (num_features - 1) // 2
        widths = [num_int, *ln_top]
        self.top_l = _mlp(widths, len(widths) - 2, rng)
        li = [i for i in range(num_features) for j in range(i)]
        lj = [j for i in range(num_features) for j in range(i)]
        self.register_buffer("li", torch.tensor(li), persistent=False)
        self.register_buffer("lj", torch.tensor(lj), persistent=False)

    def apply_emb(self, lS_o: Sequence[torch.Tensor], lS_i: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        ly = []
        for k, sparse_index_group_batch in enumerate(lS_i):
            sparse_offset_group_batch = lS_o[k]
            E = self.emb_l[k]
            V = E(sparse_index_group_batch, sparse_offset_group_batch)
            ly.append(V)
        return ly

    def interact_features(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
        (batch_size, d) = x.shape
        T = torch.cat([x] + ly, dim=1).view((batch_size, -1, d))
        Z = torch.bmm(T, torch.transpose(T, 1, 2))
        Zflat = Z[:, self.li, self.lj]
        return torch.cat([x] + [Zflat], dim=1)

    def forward(self, dense_x: torch.Tensor, lS_o: Sequence[torch.Tensor],
                lS_i: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.bot_l(dense_x)
        ly = self.apply_emb(lS_o, lS_i)
        z = self.interact_features(x, ly)
        return self.top_l(z)


class ReferenceTrainer:
    """The reference's training step: forward, BCE, zero_grad, backward, SGD step, and
    the loss read back to the host (the reference accumulates it every step)."""

    def __init__(self, model: ReferenceDLRM, lr: float) -> None:
        self.model = model
        self.loss_fn = nn.BCELoss(reduction="mean")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step(self, dense: torch.Tensor, offsets: Sequence[torch.Tensor],
             ids: Sequence[torch.Tensor], labels: torch.Tensor) -> float:
        Z = self.model(dense, offsets, ids)
        E = self.loss_fn(Z, labels)
        self.optimizer.zero_grad()
        E.backward()
        self.optimizer.step()
        return float(E.detach().cpu().numpy())
