"""Measured access profiles: how each table's lookups spread over its rows.

:func:`profile_tables` counts, per table, how often every row is looked up in a data
source and returns the tables spec with each table's ``access`` replaced by the
measured cumulative profile (the share of lookups served by the hottest ``k`` rows,
at about :data:`DEFAULT_POINTS` log-spaced ``k``) and its ``pooling_factor`` by the
measured mean ids per sample. The planner reads the hit rate of a cache of ``c`` rows
from this profile (piecewise-linear between the points).

Sources: a Criteo cache (:class:`dlrm_runtime.data.criteo.CriteoCache`, its path, or a
:class:`dlrm_runtime.data.criteo.CriteoClicks`), read in file order, or any object with
``batch(index, batch_size) -> Batch`` (e.g. :class:`dlrm_runtime.data.SyntheticClicks`),
read from batch 0 on, which needs ``sample``.

Counting memory: 4 bytes per row of tables over :data:`SMALL_TABLE_ROWS` rows (8 once a
table has seen 2**32 lookups), 8 bytes per row of smaller ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dlrm_runtime.data.batches import Batch
from dlrm_runtime.data.criteo import CriteoCache, CriteoClicks
from dlrm_runtime.errors import RuntimeErrorBase
from planner import AccessProfile, TablesSpec

DEFAULT_POINTS = 28
"""Log-spaced ``k`` per profile (plus the number of distinct rows seen)."""
SHARE_DIGITS = 6
"""Decimal digits kept in each share."""
CACHE_CHUNK = 1 << 16
"""Samples counted per step from a cache (small enough for the CPU cache: 6.5 MiB)."""
_ONE = np.uint32(1)
_FLUSH_LOOKUPS = (1 << 32) - 1
"""Lookups a uint32 counter array may take before it is added into an int64 one."""
SMALL_TABLE_ROWS = 1 << 18
"""Tables up to this many rows are counted together with one ``bincount``."""
BATCH_CHUNK = 1 << 16
"""Samples per batch drawn from a batch source."""


class ProfileError(RuntimeErrorBase, ValueError):
    """Profiling is impossible: no samples, or data that does not fit the tables spec."""


class BatchSource(Protocol):
    def batch(self, index: int, batch_size: int) -> Batch: ...


@dataclass(frozen=True, slots=True)
class AccessCounts:
    """Lookups per row of every table over ``samples`` samples."""

    counts: tuple[np.ndarray, ...]
    """Per table, [num_embeddings] unsigned or int64 integers: lookups of each row."""
    lookups: tuple[int, ...]
    """Ids looked up per table in total."""
    samples: int

    @property
    def pooling_factors(self) -> tuple[float, ...]:
        """Mean ids per sample, per table."""
        return tuple(n / self.samples for n in self.lookups)


def count_accesses(source: CriteoCache | CriteoClicks | BatchSource | str | os.PathLike[str],
                   tables: TablesSpec, *, sample: int | None = None) -> AccessCounts:
    """Count row lookups per table over the first ``sample`` samples of ``source`` (all
    of a cache when ``None``). Raises :class:`ProfileError` (see :func:`profile_tables`)."""
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int)
                               or sample < 1):
        raise ProfileError(f"sample must be a positive number of samples, got {sample!r}")
    counter = _Counter(tuple(t.num_embeddings for t in tables.tables))
    for rows in _chunks(source, tables, sample):
        if rows.check:
            for t, ids in enumerate(rows.ids):
                if ids.size and (int(ids.max()) >= counter.sizes[t] or int(ids.min()) < 0):
                    raise ProfileError(f"table {tables.tables[t].name}: id out of range "
                                       f"0..{counter.sizes[t] - 1} in the data")
        counter.add(rows)
    if counter.samples == 0:
        raise ProfileError("no samples to profile: the source is empty")
    return counter.result()


class _Counter:
    """Per-row lookup counts. Tables of at most :data:`SMALL_TABLE_ROWS` rows share one
    int64 ``bincount`` (ids offset into one key space); larger tables are counted with
    ``np.add.at`` into uint32 arrays (half the memory and page faults of int64), which
    are flushed into int64 ones before they could overflow."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes
        self.small = [t for t, n in enumerate(sizes) if n <= SMALL_TABLE_ROWS]
        self.large = [t for t, n in enumerate(sizes) if n > SMALL_TABLE_ROWS]
        self.offsets = np.cumsum([0] + [sizes[t] for t in self.small], dtype=np.int64)
        self.small_counts = np.zeros(int(self.offsets[-1]), dtype=np.int64)
        self.large_counts = {t: np.zeros(sizes[t], dtype=np.uint32) for t in self.large}
        for c in self.large_counts.values():  # fault the pages in now, in order: far
            c.fill(0)                         # cheaper than at random while counting
        self.flushed: dict[int, np.ndarray] = {}
        self.unflushed = dict.fromkeys(self.large, 0)
        self.lookups = [0] * len(sizes)
        self.samples = 0

    def add(self, rows: _Rows) -> None:
        self.samples += rows.samples
        for t, ids in enumerate(rows.ids):
            self.lookups[t] += int(ids.size)
        if self.small:
            if rows.matrix is not None:  # [n, tables]: offset all small columns at once
                keys = np.take(rows.matrix, self.small, axis=1).astype(np.int64)  # C order
                keys += self.offsets[:-1]
            else:
                keys = np.concatenate([rows.ids[t] + self.offsets[i]
                                       for i, t in enumerate(self.small)])
            self.small_counts += np.bincount(keys.ravel(), minlength=self.small_counts.size)
        for t in self.large:
            ids = rows.ids[t]
            if self.unflushed[t] + ids.size > _FLUSH_LOOKUPS:
                self._flush(t)
            # a contiguous index and a uint32 one: add.at is many times slower otherwise
            np.add.at(self.large_counts[t], np.ascontiguousarray(ids), _ONE)
            self.unflushed[t] += int(ids.size)

    def _flush(self, t: int) -> None:
        total = self.flushed.setdefault(t, np.zeros(self.sizes[t], dtype=np.int64))
        total += self.large_counts[t]
        self.large_counts[t].fill(0)
        self.unflushed[t] = 0

    def result(self) -> AccessCounts:
        counts: list[np.ndarray] = []
        for t in range(len(self.sizes)):
            if t in self.large_counts:
                counts.append(self.large_counts[t] if t not in self.flushed
                              else self.flushed[t] + self.large_counts[t])
            else:
                i = self.small.index(t)
                counts.append(self.small_counts[self.offsets[i]:self.offsets[i + 1]])
        return AccessCounts(tuple(counts), tuple(self.lookups), self.samples)


@dataclass(frozen=True, slots=True)
class _Rows:
    """The ids of a run of samples, per table."""

    samples: int
    ids: tuple[np.ndarray, ...]
    matrix: np.ndarray | None
    """[samples, tables] when every table has one id per sample (``ids`` are its columns)."""
    check: bool
    """Check the ids' range (a cache built for the same table sizes needs no check)."""


def _chunks(source: object, tables: TablesSpec, sample: int | None) -> Iterator[_Rows]:
    if isinstance(source, (str, os.PathLike)):
        source = CriteoCache.open(source)
    if isinstance(source, CriteoClicks):
        source = source.train
    if isinstance(source, CriteoCache):
        spec_sizes = tuple(t.num_embeddings for t in tables.tables)
        if spec_sizes != source.table_sizes:
            raise ProfileError(_size_mismatch(tables, source.table_sizes, str(source.path)))
        for block in source.row_chunks(sample, CACHE_CHUNK):
            yield _Rows(block.shape[0], tuple(block.T), block, check=False)
        return
    if not callable(getattr(source, "batch", None)):
        raise ProfileError(f"cannot profile a {type(source).__name__}: pass a Criteo cache or "
                           f"an object with batch(index, batch_size)")
    if sample is None:
        raise ProfileError("a batch source has no end: pass sample= (samples to count)")
    index, done = 0, 0
    while done < sample:
        size = min(BATCH_CHUNK, sample - done)
        batch = source.batch(index, size)  # type: ignore[attr-defined]
        ids = batch.sparse.ids
        if len(ids) != len(tables.tables):
            raise ProfileError(f"the data has {len(ids)} sparse features, the tables spec "
                               f"{len(tables.tables)} tables")
        yield _Rows(batch.sparse.batch_size, tuple(i.cpu().numpy() for i in ids), None, check=True)
        index, done = index + 1, done + size


def _size_mismatch(tables: TablesSpec, sizes: tuple[int, ...], where: str) -> str:
    if len(sizes) != len(tables.tables):
        return f"{where} has {len(sizes)} tables, the tables spec {len(tables.tables)}"
    t = next(i for i, (a, b) in enumerate(zip(tables.tables, sizes)) if a.num_embeddings != b)
    return (f"{where}: table {t} ({tables.tables[t].name}) has {sizes[t]} rows there, "
            f"{tables.tables[t].num_embeddings} in the tables spec; rebuild the cache for "
            f"this spec")


def profile_points(num_rows: int, points: int = DEFAULT_POINTS) -> np.ndarray:
    """``points`` log-spaced row counts from 1 to ``num_rows`` (int64, strictly increasing;
    fewer when rounding merges some)."""
    if num_rows < 1 or points < 1:
        raise ProfileError(f"need num_rows >= 1 and points >= 1, got {num_rows}, {points}")
    grid = np.geomspace(1, num_rows, num=points) if points > 1 else np.array([num_rows])
    return np.unique(np.clip(np.rint(grid).astype(np.int64), 1, num_rows))


def access_profile(counts: np.ndarray, points: int = DEFAULT_POINTS) -> AccessProfile:
    """The measured profile of one table from its per-row lookup counts.

    ``hot_rows`` are the log-spaced ``k`` up to the number of distinct rows seen (which
    is always the last point: its share is 1); ``share[i]`` is the share of lookups
    served by the ``hot_rows[i]`` most looked-up rows. Raises :class:`ProfileError`
    for a table without lookups.
    """
    counts = np.asarray(counts)
    seen = counts[counts > 0]
    total = int(seen.sum(dtype=np.int64))
    if total == 0:
        raise ProfileError("a table without lookups has no profile")
    hottest = np.sort(seen)[::-1]
    cumulative = np.cumsum(hottest, dtype=np.int64)
    ks = profile_points(counts.size, points)
    ks = np.union1d(ks[ks < seen.size], [seen.size])
    shares = cumulative[ks - 1] / total
    share = tuple(min(1.0, round(float(s), SHARE_DIGITS)) for s in shares)  # the last is 1
    return AccessProfile(hot_rows=tuple(int(k) for k in ks), share=share)


def profile_from_counts(counts: AccessCounts, tables: TablesSpec,
                        points: int = DEFAULT_POINTS) -> TablesSpec:
    """``tables`` with each table's ``access`` and ``pooling_factor`` measured from
    ``counts``; a table that was never looked up keeps its spec."""
    out = []
    for spec, c, pooling in zip(tables.tables, counts.counts, counts.pooling_factors):
        if pooling == 0:
            out.append(spec)
            continue
        out.append(dataclasses.replace(spec, access=access_profile(c, points),
                                       pooling_factor=_round_pooling(pooling)))
    return TablesSpec(tables=tuple(out), description=tables.description)


def _round_pooling(value: float) -> float:
    digits = SHARE_DIGITS - math.floor(math.log10(value)) - 1
    return round(value, max(digits, 0))


def profile_tables(source: CriteoCache | CriteoClicks | BatchSource | str | os.PathLike[str],
                   tables: TablesSpec, *, sample: int | None = None,
                   points: int = DEFAULT_POINTS) -> TablesSpec:
    """``tables`` with measured access profiles and pooling factors.

    ``source``: a Criteo cache, its path, a :class:`CriteoClicks` (its training cache),
    or an object with ``batch(index, batch_size)``. ``sample``: count at most this
    many samples, the first ones in order (required for a batch source). ``points``:
    log-spaced ``k`` per profile. The result passes ``planner.parse_tables`` when
    written with ``to_json()``; the description is kept.

    Raises :class:`ProfileError` for an empty source, a cache built for other table
    sizes, ids outside a table, or a non-positive ``sample``;
    :class:`dlrm_runtime.data.criteo.CriteoCacheError` for an unreadable cache path.
    """
    return profile_from_counts(count_accesses(source, tables, sample=sample), tables, points)
