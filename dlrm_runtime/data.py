"""Synthetic click data whose labels come from a hidden teacher, so learning is measurable.

Ids: per table, Zipf-distributed ranks (the table's ``access.zipf`` exponent, else a
default) mapped to rows by a fixed affine permutation, ``round(pooling_factor)`` ids
per sample. Teacher: every (table, row) has a hidden vector derived from a hash (no
memory per row, so tables of any size work); the click logit mixes a dense part, each
table's pooled hidden vector and their pairwise dot products. Labels are Bernoulli
draws of the teacher's probability, which is kept so the teacher's own AUC (the
ceiling any model can reach) is reported next to the model's.

Every batch is a pure function of ``(seed, index)``: a run can resume at any step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dlrm_runtime.sparse import SparseBatch
from planner import TablesSpec

VALIDATION_OFFSET = 1 << 40
"""Batch indices at and above this are the validation stream."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit hash (SplitMix64's finaliser); wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _unit_values(keys: np.ndarray) -> np.ndarray:
    """Hash uint64 keys to values with mean 0 and variance 1 (uniform in +-sqrt 3)."""
    u = (_splitmix64(keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return (2.0 * u - 1.0) * math.sqrt(3.0)


def zipf_ranks(u: np.ndarray, num_rows: int, exponent: float) -> np.ndarray:
    """Map uniforms in [0, 1) to ranks 0..num_rows-1 with P(rank k) ~ (k+1)^-exponent
    (inverse CDF of the continuous power law on [1, num_rows+1))."""
    n1 = float(num_rows + 1)
    if abs(exponent - 1.0) < 1e-9:
        x = np.power(n1, u)
    else:
        a = 1.0 - exponent
        x = np.power((n1 ** a - 1.0) * u + 1.0, 1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, num_rows - 1)


@dataclass(frozen=True, slots=True)
class Batch:
    dense: torch.Tensor
    """[B, F] float32."""
    sparse: SparseBatch
    labels: torch.Tensor
    """[B] float32 in {0, 1}."""
    teacher_prob: torch.Tensor
    """[B] float32: the probability the labels were drawn from."""


class SyntheticClicks:
    """A deterministic stream of batches for a tables spec."""

    def __init__(self, tables: TablesSpec, dense_features: int = 13, seed: int = 0,
                 default_zipf: float = 1.05, teacher_dim: int = 4) -> None:
        self.tables = tables.tables
        self.dense_features = dense_features
        self.seed = seed
        self.teacher_dim = teacher_dim
        self.exponents = [t.access.zipf if t.access.zipf is not None else default_zipf
                          for t in self.tables]
        self.ids_per_sample = [max(1, round(t.pooling_factor)) for t in self.tables]
        rng = np.random.default_rng([seed, 0x7EAC])
        self.multipliers = [_coprime(int(rng.integers(1, 1 << 31)) | 1, t.num_embeddings)
                            for t in self.tables]
        self.shifts = [int(rng.integers(0, t.num_embeddings)) for t in self.tables]
        self.dense_weights = rng.normal(0.0, 1.0, (dense_features, teacher_dim)) / math.sqrt(dense_features)
        self.table_weights = rng.normal(0.0, 1.0, (len(self.tables), teacher_dim))
        num = len(self.tables)
        self.logit_scale = 2.0 / math.sqrt(1.0 + num + 0.25 * num * (num - 1) / 2)

    def batch(self, index: int, batch_size: int) -> Batch:
        rng = np.random.default_rng([self.seed, index])
        dense = rng.normal(0.0, 1.0, (batch_size, self.dense_features))
        dense_part = np.tanh(dense @ self.dense_weights) * math.sqrt(3.0)  # [B, K]
        logit = dense_part.sum(axis=1)
        ids, offsets, hidden = [], [], []
        for t, spec in enumerate(self.tables):
            per = self.ids_per_sample[t]
            ranks = zipf_ranks(rng.random(batch_size * per), spec.num_embeddings, self.exponents[t])
            rows = (ranks * self.multipliers[t] + self.shifts[t]) % spec.num_embeddings
            vectors = self._hidden(t, rows).reshape(batch_size, per, self.teacher_dim).sum(axis=1)
            vectors /= math.sqrt(per)
            hidden.append(vectors)
            logit += vectors @ self.table_weights[t]
            ids.append(torch.from_numpy(rows))
            offsets.append(torch.arange(0, batch_size * per + 1, per, dtype=torch.int64))
        for i in range(1, len(hidden)):
            for j in range(i):
                logit += 0.5 * np.einsum("bk,bk->b", hidden[i], hidden[j]) / math.sqrt(self.teacher_dim)
        prob = 1.0 / (1.0 + np.exp(-self.logit_scale * logit))
        labels = (rng.random(batch_size) < prob).astype(np.float32)
        return Batch(
            dense=torch.from_numpy(dense.astype(np.float32)),
            sparse=SparseBatch(tuple(ids), tuple(offsets)),
            labels=torch.from_numpy(labels),
            teacher_prob=torch.from_numpy(prob.astype(np.float32)),
        )

    def _hidden(self, table: int, rows: np.ndarray) -> np.ndarray:
        """[N, K] hidden teacher vectors of ``rows`` of ``table``."""
        base = (rows.astype(np.uint64) * np.uint64(self.teacher_dim)
                + np.uint64((table + 1) << 40) + np.uint64((self.seed & 0xFFF) << 52))
        keys = base[:, None] + np.arange(self.teacher_dim, dtype=np.uint64)[None, :]
        return _unit_values(keys)


def _coprime(a: int, n: int) -> int:
    while math.gcd(a, n) != 1:
        a += 2
    return a % n if n > 1 else 1
