"""Fused row-wise updates of embedding weights from their sparse gradients.

The optimizer works on :class:`~dlrm_runtime.embeddings.base.RowBlock` objects: a whole
table, a batch of whole tables sharing one weight, or one shard of a sharded table.
Its state lives next to each block's rows (on the block's device), so a sharded table
carries the optimizer state of exactly the rows each shard owns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dlrm_runtime.embeddings.base import RowBlock, Segment, add_pooled_
from planner import Optimizer, TableSpec
from storage import rowwise_adagrad_

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class RowOptimizer:
    """Applies each table's optimizer (from its spec) to the rows touched this step.

    - SGD: ``w[r] -= lr * g[r]`` (``g[r]`` summed over the step's lookups of row r);
    - row-wise Adagrad: one fp32 accumulator per row, ``s[r] += mean(g[r]**2)``,
      ``w[r] -= lr * g[r] / (sqrt(s[r]) + eps)``. The mean is over the FULL row: for a
      column-wise table the shards' sums of squares are added before dividing by the
      table's dim, and each column shard keeps an identical copy of the row state
      (in the multi-process case that sum is an all-reduce among the column shards),
      so the update equals the unsharded table's;
    - Adam: per-element moments, updated lazily on touched rows only (the algorithm of
      ``torch.optim.SparseAdam``), with one step count for all tables.

    ``RowOptimizer(specs, weights, lr)`` optimises one whole-table weight per spec;
    :meth:`for_blocks` takes the blocks of an embeddings module.
    """

    def __init__(self, specs: Sequence[TableSpec], weights: Sequence[nn.Parameter], lr: float) -> None:
        blocks = [RowBlock(weight, spec.optimizer,
                           (Segment(spec.name, 0, 0, spec.num_embeddings, 0, spec.embedding_dim),),
                           spec.embedding_dim)
                  for spec, weight in zip(specs, weights)]
        self._setup(blocks, lr)

    @classmethod
    def for_blocks(cls, blocks: Sequence[RowBlock], lr: float) -> RowOptimizer:
        self = cls.__new__(cls)
        self._setup(list(blocks), lr)
        return self

    def _setup(self, blocks: list[RowBlock], lr: float) -> None:
        self.lr = lr
        self.blocks = blocks
        self.steps = 0
        """Optimizer steps taken (Adam's bias correction uses it)."""
        self.state: list[dict[str, torch.Tensor]] = []
        self._buffers: dict[int, torch.Tensor] = {}
        for block in blocks:
            rows, cols = block.weight.shape
            device = block.weight.device
            if block.optimizer is Optimizer.ROWWISE_ADAGRAD:
                self.state.append({"sum_sq": torch.zeros(rows, dtype=torch.float32, device=device)})
            elif block.optimizer is Optimizer.ADAM:
                self.state.append({
                    "exp_avg": torch.zeros(rows, cols, dtype=torch.float32, device=device),
                    "exp_avg_sq": torch.zeros(rows, cols, dtype=torch.float32, device=device),
                })
            else:
                self.state.append({})

    def zero_grad(self) -> None:
        for block in self.blocks:
            block.weight.grad = None
            if block.pending is not None:
                block.pending.clear()

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        column_groups: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for i, block in enumerate(self.blocks):
            if not block.has_grad():
                continue
            if block.optimizer is Optimizer.SGD:
                self._sgd(i, block)
                continue
            grad = block.sparse_grad()
            rows, values = grad.indices()[0], grad.values().float()
            if block.optimizer is Optimizer.ADAM:
                self._adam(i, rows, values)
            elif block.row_group is None:
                self._adagrad(i, rows, values, values.pow(2).mean(dim=1))
            else:
                column_groups.setdefault(block.row_group, []).append((i, rows, values))
        for name, shards in column_groups.items():
            first = shards[0][1]
            if any(rows.shape != first.shape for _, rows, _ in shards):
                raise RuntimeError(f"table {name!r}: column shards saw different rows")
            device = first.device
            total = sum(values.pow(2).sum(dim=1).to(device) for _, _, values in shards)
            mean = total / self.blocks[shards[0][0]].full_dim
            for i, rows, values in shards:
                self._adagrad(i, rows, values, mean.to(rows.device))

    def _sgd(self, i: int, block: RowBlock) -> None:
        """Uncoalesced is fine: the scatter sums duplicate rows. Pending (batched)
        gradients are scaled while still pooled (``bags x dim``, not ``ids x dim``) and
        added by :func:`~dlrm_runtime.embeddings.base.add_pooled_`; ragged bags are
        expanded into a buffer reused across steps."""
        weight = block.weight
        if block.pending is None:
            grad = weight.grad  # pre-scaled: index_add_ with alpha takes a slower path
            weight.index_add_(0, grad._indices()[0], grad._values() * -self.lr)
            return
        for ids, offsets, pooled in block.pending:
            scaled = (pooled * -self.lr).to(weight.dtype)
            add_pooled_(weight, ids, offsets, scaled,
                        scratch=lambda n, like=scaled: self._buffer(i, n, like))

    def _buffer(self, i: int, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A ``[rows, dim]`` scratch tensor for block ``i``, kept between steps."""
        buffer = self._buffers.get(i)
        if buffer is None or buffer.shape[0] < rows or buffer.dtype != like.dtype:
            buffer = torch.empty(max(rows, 1), like.shape[1], dtype=like.dtype, device=like.device)
            self._buffers[i] = buffer
        return buffer[:rows]

    def _adagrad(self, i: int, rows: torch.Tensor, values: torch.Tensor,
                 mean_sq: torch.Tensor) -> None:
        """``rows`` unique (coalesced); ``mean_sq`` the rows' mean squared gradient."""
        rowwise_adagrad_(self.blocks[i].weight, self.state[i]["sum_sq"], rows, values, self.lr,
                         mean_sq=mean_sq)

    def _adam(self, i: int, rows: torch.Tensor, values: torch.Tensor) -> None:
        """SparseAdam's update on the touched (unique) rows."""
        weight, state = self.blocks[i].weight, self.state[i]
        beta1, beta2 = ADAM_BETAS
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        old_avg, old_sq = exp_avg[rows], exp_avg_sq[rows]
        new_avg = old_avg + (values - old_avg) * (1 - beta1)
        new_sq = old_sq + (values.pow(2) - old_sq) * (1 - beta2)
        exp_avg[rows] = new_avg
        exp_avg_sq[rows] = new_sq
        bias1 = 1 - beta1 ** self.steps
        bias2 = 1 - beta2 ** self.steps
        step_size = self.lr * math.sqrt(bias2) / bias1
        update = new_avg / (new_sq.sqrt() + ADAM_EPS)
        weight.index_add_(0, rows, (update * -step_size).to(weight.dtype))
