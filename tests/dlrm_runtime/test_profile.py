"""Measured access profiles: shares on hand-made data, the spec round trip, sources,
the counting paths (shared bincount, add.at, overflow flush) and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dlrm_runtime.data import profile
from dlrm_runtime.data.criteo import CriteoClicks, build_cache, parse_line
from dlrm_runtime.data import Batch, SyntheticClicks
from dlrm_runtime.data.profile import (
    ProfileError,
    access_profile,
    count_accesses,
    profile_points,
    profile_tables,
)
from dlrm_runtime.embeddings import SparseBatch
from planner import TablesSpec, parse_tables
from planner import AccessProfile

SIZES = tuple(20 + 10 * i for i in range(26))


def _tables(sizes: tuple[int, ...] = SIZES, pooling: float = 3.0) -> TablesSpec:
    return parse_tables({"description": "criteo", "tables": [
        {"name": f"C{i + 1}", "num_embeddings": n, "embedding_dim": 8, "pooling_factor": pooling,
         "access": {"zipf": 1.2}} for i, n in enumerate(sizes)]})


def _criteo_file(path: Path, c1_values: list[str]) -> Path:
    """One line per C1 value; the other features are fixed."""
    cats = [f"{i:x}" for i in range(1, 26)]
    path.write_text("".join("\t".join(["1", *[""] * 13, v, *cats]) + "\n" for v in c1_values))
    return path


def test_shares_on_a_hand_made_table() -> None:
    counts = np.array([0, 3, 0, 5, 2, 0, 0, 0, 0, 0])  # 10 rows, 3 seen, 10 lookups
    prof = access_profile(counts)
    assert prof.hot_rows == (1, 2, 3)  # stops at the distinct rows seen: share 1
    assert prof.share == (0.5, 0.8, 1.0)
    assert prof.hit_rate(10, 2) == pytest.approx(0.8)
    with pytest.raises(ProfileError, match="without lookups"):
        access_profile(np.zeros(5, dtype=np.int64))


def test_points_are_log_spaced_and_strictly_increasing() -> None:
    for n in (1, 2, 17, 1000, 10 ** 7):
        ks = profile_points(n)
        assert ks[0] == 1 and ks[-1] == n and (np.diff(ks) > 0).all()
        assert len(ks) <= profile.DEFAULT_POINTS
    assert len(profile_points(10 ** 7)) == profile.DEFAULT_POINTS
    rng = np.random.default_rng(0)
    counts = np.bincount(rng.zipf(1.3, 200_000) % 50_000, minlength=50_000)
    prof = access_profile(counts)
    ks, shares = np.array(prof.hot_rows), np.array(prof.share)
    assert 20 <= len(ks) <= profile.DEFAULT_POINTS + 1
    assert (np.diff(ks) > 0).all() and ks[-1] == np.count_nonzero(counts)
    assert (np.diff(shares) >= 0).all() and 0 < shares[0] and shares[-1] == 1.0
    hottest = np.sort(counts)[::-1]
    for k, s in zip(ks, shares):
        assert s == pytest.approx(hottest[:k].sum() / counts.sum(), abs=1e-6)


def test_profile_from_a_cache_and_the_spec_round_trip(tmp_path: Path) -> None:
    values = ["a"] * 6 + ["b"] * 3 + [""] + ["c"] * 2  # 12 samples, C1: a a ... (missing once)
    source = _criteo_file(tmp_path / "day.tsv", values)
    cache = build_cache(source, tmp_path / "day.cache", SIZES)
    tables = _tables()
    out = profile_tables(cache, tables)
    rows = {v: parse_line("\t".join(["1", *[""] * 13, v, *[""] * 25]), SIZES).rows[0]
            for v in "abc"}
    assert len({*rows.values(), 0}) == 4, "pick values whose rows differ"
    c1 = out.tables[0]
    assert c1.pooling_factor == 1.0 and c1.num_embeddings == SIZES[0]
    assert c1.access.hot_rows == (1, 2, 3, 4)
    assert c1.access.share == pytest.approx((6 / 12, 9 / 12, 11 / 12, 1.0))
    for spec in out.tables[1:]:  # one value each: the hottest row serves everything
        assert spec.access == AccessProfile(hot_rows=(1,), share=(1.0,))
    assert out.description == "criteo" and out.tables[0].embedding_dim == 8
    assert parse_tables(out.to_json()) == out  # valid for the planner
    assert profile_tables(str(tmp_path / "day.cache"), tables) == out  # a path works too
    assert profile_tables(CriteoClicks(cache), tables) == out

    first = profile_tables(cache, tables, sample=4)  # only the four "a" samples
    assert first.tables[0].access == AccessProfile(hot_rows=(1,), share=(1.0,))


def test_cache_for_other_tables_is_refused(tmp_path: Path) -> None:
    cache = build_cache(_criteo_file(tmp_path / "d.tsv", ["a"]), tmp_path / "d.cache", SIZES)
    other = _tables(tuple(n + 1 for n in SIZES))
    with pytest.raises(ProfileError, match=r"table 0 \(C1\) has 20 rows there, 21 in the"):
        profile_tables(cache, other)
    with pytest.raises(ProfileError, match="positive"):
        profile_tables(cache, _tables(), sample=0)
    empty = build_cache(_criteo_file(tmp_path / "e.tsv", []), tmp_path / "e.cache", SIZES)
    with pytest.raises(ProfileError, match="no samples"):
        profile_tables(empty, _tables())


def test_profile_of_a_batch_source_measures_pooling() -> None:
    shapes = [(100, 1.0), (5000, 2.0), (300, 3.0)]
    tables = parse_tables({"tables": [
        {"name": f"t{i}", "num_embeddings": n, "embedding_dim": 4, "pooling_factor": p,
         "access": {"zipf": 1.1}} for i, (n, p) in enumerate(shapes)]})
    data = SyntheticClicks(tables, seed=3)
    out = profile_tables(data, tables, sample=5000)
    assert [t.pooling_factor for t in out.tables] == [1.0, 2.0, 3.0]
    assert parse_tables(out.to_json()) == out
    for spec in out.tables:
        ks = spec.access.hot_rows
        assert ks[-1] <= spec.num_embeddings and (np.diff(ks) > 0).all()
    # the measured profile of a Zipf source is close to the Zipf formula at mid sizes
    measured = out.tables[1].access.hit_rate(5000, 100)
    assert measured == pytest.approx(tables.tables[1].access.hit_rate(5000, 100), abs=0.05)
    with pytest.raises(ProfileError, match="pass sample="):
        profile_tables(data, tables)
    with pytest.raises(ProfileError, match="cannot profile a int"):
        profile_tables(7, tables, sample=3)  # type: ignore[arg-type]


class _FixedBatches:
    """The same jagged ids in every batch."""

    def __init__(self, ids: list[list[int]], samples: int) -> None:
        self.ids, self.samples = ids, samples

    def batch(self, index: int, batch_size: int) -> Batch:
        assert batch_size == self.samples
        ids = tuple(torch.tensor(i, dtype=torch.int64) for i in self.ids)
        offsets = tuple(torch.linspace(0, len(i), self.samples + 1).long() for i in self.ids)
        return Batch(torch.zeros(batch_size, 1), SparseBatch(ids, offsets),
                     torch.zeros(batch_size), torch.zeros(batch_size))


def test_small_and_large_tables_count_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profile, "BATCH_CHUNK", 4)
    monkeypatch.setattr(profile, "SMALL_TABLE_ROWS", 10)  # t1 and t2 are "large"
    tables = parse_tables({"tables": [
        {"name": f"t{i}", "num_embeddings": n, "embedding_dim": 4, "pooling_factor": 1.0}
        for i, n in enumerate([10, 11, 1000])]})
    ids = [[1, 1, 2, 9, 9, 9], [0, 10, 10, 10], [999, 5, 5, 5, 5, 5, 5, 5]]
    source = _FixedBatches(ids, 4)
    counts = count_accesses(source, tables, sample=12)  # three batches of 4
    assert counts.samples == 12 and counts.lookups == (18, 12, 24)
    for t, c in enumerate(counts.counts):
        rows = tables.tables[t].num_embeddings
        np.testing.assert_array_equal(c, 3 * np.bincount(ids[t], minlength=rows))
    monkeypatch.setattr(profile, "_FLUSH_LOOKUPS", 5)  # uint32 counters flushed to int64
    flushed = count_accesses(source, tables, sample=12)
    for a, b in zip(flushed.counts, counts.counts):
        np.testing.assert_array_equal(a, b)
    assert flushed.counts[2].dtype == np.int64
    out = profile_tables(source, tables, sample=12)
    assert [t.pooling_factor for t in out.tables] == [1.5, 1.0, 2.0]
    assert out.tables[2].access == AccessProfile(hot_rows=(1, 2), share=(0.875, 1.0))

    bad = _FixedBatches([[1], [2], [1000]], 1)
    with pytest.raises(ProfileError, match="table t2: id out of range 0..999"):
        count_accesses(bad, tables, sample=1)
    with pytest.raises(ProfileError, match="2 sparse features"):
        count_accesses(_FixedBatches([[1], [2]], 1), tables, sample=1)
