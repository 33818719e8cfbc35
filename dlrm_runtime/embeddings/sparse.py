"""Sparse features of a batch: per table, the ids of every sample (jagged)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SparseBatch:
    """``ids[t]`` holds the ids of table ``t`` for all samples, concatenated;
    ``offsets[t]`` (length B+1) marks where each sample's ids start and end."""

    ids: tuple[torch.Tensor, ...]
    offsets: tuple[torch.Tensor, ...]

    @property
    def batch_size(self) -> int:
        return int(self.offsets[0].numel()) - 1
