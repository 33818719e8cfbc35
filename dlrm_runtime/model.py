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
from dlrm_runtime.embeddings.sparse import SparseBatch


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """The reference implementation's init: W ~ N(0, sqrt(2/(fan_in+fan_out))),
    b ~ N(0, sqrt(1/fan_out))."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
        layer.bias.normal_(0.0, math.sqrt(1.0 / fan_out), generator=generator)


class _MLPFunction(torch.autograd.Function):
    """An MLP's forward and backward as one autograd node: ``addmm`` per layer with an
    in-place ReLU, and the backward written out (``dh = g W``, ``dW = g^T h``,
    ``db = sum g``, the ReLU mask from the saved outputs). Same math as
    ``nn.Linear`` + ``nn.ReLU`` under autograd, without its per-layer nodes (four
    per layer) and with no ReLU output allocated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, relus: tuple[bool, ...], *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        outputs = []
        h = x
        for i, relu in enumerate(relus):
            h = torch.addmm(params[2 * i + 1], h, params[2 * i].t())
            if relu:
                h.relu_()
            outputs.append(h)
        ctx.relus = relus
        ctx.save_for_backward(x, *outputs, *params)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        relus = ctx.relus
        layers = len(relus)
        saved = ctx.saved_tensors
        inputs = saved[:layers]  # the input of every layer: x, then each hidden output
        outputs = saved[1:layers + 1]
        params = saved[layers + 1:]
        grads: list[torch.Tensor | None] = [None] * (2 * layers)
        for i in reversed(range(layers)):
            if relus[i]:
                grad = torch.ops.aten.threshold_backward(grad, outputs[i], 0)
            grads[2 * i] = grad.t().mm(inputs[i])
            grads[2 * i + 1] = grad.sum(0)
            if i > 0 or ctx.needs_input_grad[0]:
                grad = grad.mm(params[2 * i])
        grad_x = grad if ctx.needs_input_grad[0] else None
        return (grad_x, None, *grads)


class MLP(nn.Sequential):
    """Linear layers with ReLUs, as an ``nn.Sequential`` (so parameters, state dicts and
    :meth:`DLRM.mlp_layers` read as usual) whose forward is one fused autograd node
    (:class:`_MLPFunction`)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        linears = [m for m in self if isinstance(m, nn.Linear)]
        relus = []
        for k, m in enumerate(self):
            if isinstance(m, nn.Linear):
                following = self[k + 1] if k + 1 < len(self) else None
                relus.append(isinstance(following, nn.ReLU))
        self._linears = linears
        self._relus = tuple(relus)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        params = [p for linear in self._linears for p in (linear.weight, linear.bias)]
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _MLPFunction.apply(x, self._relus, *params)
        return super().forward(x)


def mlp(widths: Sequence[int], relu_last: bool, generator: torch.Generator) -> MLP:
    """Linear layers ``widths[0] -> widths[1] -> ...`` with ReLU between them (and after
    the last when ``relu_last``)."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        linear = nn.Linear(widths[i], widths[i + 1])
        _init_linear(linear, generator)
        layers.append(linear)
        if relu_last or i < len(widths) - 2:
            layers.append(nn.ReLU(inplace=True))
    return MLP(*layers)


class _TriangleDots(torch.autograd.Function):
    """``features [B, n, D]`` -> the strictly-lower-triangle entries (row-major) of
    each sample's Gram matrix ``F F^T``, ``[B, n(n-1)/2]``.

    Backward uses the Gram matrix's symmetry: with ``G`` the upstream gradient put at
    both (i, j) and (j, i), ``dF = G F``: one batched matmul where autograd's
    ``bmm(F, F^T)`` takes two, and one scatter where advanced indexing's backward
    accumulates."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, lower: torch.Tensor, both: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        batch, n, _ = features.shape
        gram = torch.bmm(features, features.transpose(1, 2))
        ctx.save_for_backward(features, both)
        return gram.view(batch, n * n).index_select(1, lower)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        features, both = ctx.saved_tensors
        batch, n, _ = features.shape
        sym = grad.new_zeros(batch, n * n)
        sym.scatter_(1, both.expand(batch, -1), torch.cat([grad, grad], dim=1))
        return torch.bmm(sym.view(batch, n, n), features), None, None


class DotInteraction(nn.Module):
    """[B, D] and T tensors [B, D] (or one [T, B, D]) -> [B, D + (T+1)T/2]: the bottom
    output followed by the strictly-lower-triangle pairwise dot products (row-major:
    for i in 1..T, for j in 0..i-1) of the features [x, e_0, ..., e_{T-1}]."""

    def __init__(self, num_tables: int) -> None:
        super().__init__()
        n = num_tables + 1
        rows, cols = torch.tril_indices(n, n, offset=-1)
        lower = rows * n + cols
        self.register_buffer("lower", lower, persistent=False)
        self.register_buffer("both", torch.cat([lower, cols * n + rows]), persistent=False)

    def forward(self, dense: torch.Tensor, pooled: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(pooled, torch.Tensor):  # [T, B, D]
            features = torch.cat([dense.unsqueeze(1), pooled.transpose(0, 1)], dim=1)
        else:
            features = torch.stack([dense, *pooled], dim=1)  # [B, T+1, D]
        dots = _TriangleDots.apply(features, self.lower, self.both)
        return torch.cat([dense, dots], dim=1)

    @staticmethod
    def output_width(num_tables: int, dim: int) -> int:
        return dim + (num_tables + 1) * num_tables // 2


class CatInteraction(nn.Module):
    """[B, D0] and T tensors [B, D_t] -> [B, D0 + sum D_t]."""

    def forward(self, dense: torch.Tensor, pooled: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(pooled, torch.Tensor):  # [T, B, D]
            pooled = pooled.unbind(0)
        return torch.cat([dense, *pooled], dim=1)


class DLRM(nn.Module):
    """Bottom MLP, an embedding module, interaction, top MLP.

    ``embeddings`` is any module mapping a :class:`SparseBatch` to a list of pooled
    ``[B, D_t]`` tensors on the dense device, one per table in spec order, and
    exposing ``weight(name)``. When it also has ``forward_stacked`` (one ``[T, B, D]``
    tensor) and every table shares the bottom MLP's output width, the dot interaction
    reads that tensor directly (no per-table views and re-stacking).

    The module does not move the embeddings: they stay where the plan put them; move
    the dense parts with :meth:`dense_to`.
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
        self._stacked = (config.interaction is Interaction.DOT
                         and callable(getattr(embeddings, "forward_stacked", None))
                         and len(set(embedding_dims)) == 1)

    def dense_to(self, device: torch.device) -> DLRM:
        """Move the MLPs and interaction to ``device``, leaving the embeddings in place."""
        for part in (self.bottom, self.interaction, self.top):
            part.to(device)
        return self

    def forward(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        return self.dense_forward(dense, self.lookup(sparse))

    def lookup(self, sparse: SparseBatch) -> torch.Tensor | list[torch.Tensor]:
        """The embeddings' pooled outputs: ``[T, B, D]`` or ``T x [B, D_t]``."""
        if self._stacked:
            return self.embeddings.forward_stacked(sparse)
        return self.embeddings(sparse)

    def dense_forward(self, dense: torch.Tensor,
                      pooled: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Bottom MLP, interaction with ``pooled`` (from :meth:`lookup`), top MLP: the
        ``[B]`` logits."""
        x = self.bottom(dense)  # [B, D]
        z = self.interaction(x, pooled)  # [B, I]
        return self.top(z).squeeze(1)

    def mlp_layers(self) -> list[nn.Linear]:
        """Every ``nn.Linear`` of the bottom then the top MLP, in order."""
        return [m for part in (self.bottom, self.top) for m in part if isinstance(m, nn.Linear)]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for part in (self.bottom, self.top) for p in part.parameters()]
