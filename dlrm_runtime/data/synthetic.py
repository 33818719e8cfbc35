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

import numpy as np
import torch

from dlrm_runtime.data.batches import Batch
from dlrm_runtime.embeddings.sparse import SparseBatch
from planner import TablesSpec

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


class ZipfSampler:
    """Draws ranks 0..num_rows-1 with P(rank k) proportional to (k+1)^-exponent.

    Exact for the ``head`` hottest ranks (inverse CDF by binary search), a continuous
    power law with a half-unit correction for the tail: O(head) memory for any table
    size, and the same head/tail split as the planner's hit-rate formula.
    """

    def __init__(self, num_rows: int, exponent: float, head: int = 2048) -> None:
        self.num_rows = num_rows
        self.exponent = exponent
        self.head = min(head, num_rows)
        weights = np.arange(1, self.head + 1, dtype=np.float64) ** -exponent
        self.head_cdf = np.cumsum(weights)
        self.lo, self.hi = self.head + 0.5, num_rows + 0.5
        tail = self._integral(self.lo, self.hi) if num_rows > self.head else 0.0
        self.total = self.head_cdf[-1] + tail

    def _integral(self, a: float, b: float) -> float:
        s = self.exponent
        return math.log(b / a) if abs(s - 1.0) < 1e-9 else (b ** (1 - s) - a ** (1 - s)) / (1 - s)

    def ranks(self, u: np.ndarray) -> np.ndarray:
        """Map uniforms in [0, 1) to ranks."""
        mass = u * self.total
        out = np.searchsorted(self.head_cdf, mass, side="right").astype(np.int64)
        in_tail = mass >= self.head_cdf[-1]
        if in_tail.any():
            rest = mass[in_tail] - self.head_cdf[-1]
            s = self.exponent
            if abs(s - 1.0) < 1e-9:
                x = self.lo * np.exp(rest)
            else:
                x = np.power(self.lo ** (1 - s) + (1 - s) * rest, 1.0 / (1 - s))
            out[in_tail] = np.floor(x + 0.5).astype(np.int64) - 1
        return np.clip(out, 0, self.num_rows - 1)


def zipf_ranks(u: np.ndarray, num_rows: int, exponent: float) -> np.ndarray:
    """Map uniforms in [0, 1) to Zipf ranks 0..num_rows-1 (see :class:`ZipfSampler`)."""
    return ZipfSampler(num_rows, exponent).ranks(u)


class SyntheticClicks:
    """A deterministic stream of batches for a tables spec."""

    has_validation = True

    def __init__(self, tables: TablesSpec, dense_features: int = 13, seed: int = 0,
                 default_zipf: float = 1.05, teacher_dim: int = 4) -> None:
        self.tables = tables.tables
        self.dense_features = dense_features
        self.seed = seed
        self.teacher_dim = teacher_dim
        self.samplers = [ZipfSampler(t.num_embeddings,
                                     t.access.zipf if t.access.zipf is not None else default_zipf)
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
            ranks = self.samplers[t].ranks(rng.random(batch_size * per))
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
