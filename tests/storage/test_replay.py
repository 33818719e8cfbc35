"""The cache-policy simulator: hand-computed traces, brute-force references, errors."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import pytest

from storage.replay import (
    POLICIES,
    CacheCounters,
    ReplayError,
    belady_hit_rate,
    replay,
    static_topk_hit_rate,
)

# ------------------------------------------------------------------ brute-force references


def reference(trace: Sequence[int], num_rows: int, cache_rows: int, policy: str,
              profile: Sequence[float] | None = None, lookahead: int = 0) -> CacheCounters:
    """The documented policies, recomputed by scanning every resident row on each miss."""
    cache_rows = min(cache_rows, num_rows)
    counts = [0.0] * num_rows if profile is None else [float(c) for c in profile]
    last: dict[int, int] = {}  # resident row -> position of its latest access
    if profile is not None:
        hottest = sorted(range(num_rows), key=lambda r: (-counts[r], r))[:cache_rows]
        warm = [r for r in hottest if counts[r] > 0]
        last = {r: i - len(warm) for i, r in enumerate(warm)}
    preloaded = len(last)
    hits = evictions = 0
    for t, row in enumerate(trace):
        if row in last:
            hits += 1
        else:
            if len(last) >= cache_rows:
                evictions += 1
                del last[choose_victim(trace, t, last, counts, policy, lookahead)]
        last[row] = t
        counts[row] += 1
    return CacheCounters(len(trace), hits, len(trace) - hits, evictions, preloaded)


def choose_victim(trace: Sequence[int], t: int, last: dict[int, int], counts: list[float],
                  policy: str, lookahead: int) -> int:
    if policy == "lru":
        return min(last, key=lambda r: last[r])
    if policy in ("lfu", "profile"):
        return min(last, key=lambda r: (counts[r], last[r]))
    window = list(trace[t + 1:t + 1 + lookahead])
    absent = [r for r in last if r not in window]
    if absent:
        return min(absent, key=lambda r: (counts[r], last[r]))
    return max(last, key=window.index)


def brute_force_best_hits(trace: Sequence[int], cache_rows: int) -> int:
    """Most hits of any demand-fetch cache: try every eviction choice."""

    @functools.cache
    def best(t: int, cache: frozenset[int]) -> int:
        if t == len(trace):
            return 0
        row = trace[t]
        if row in cache:
            return 1 + best(t + 1, cache)
        if len(cache) < cache_rows:
            return best(t + 1, cache | {row})
        return max(best(t + 1, (cache - {victim}) | {row}) for victim in cache)

    return best(0, frozenset())


def random_traces(count: int, seed: int, rows: tuple[int, int] = (1, 8),
                  length: tuple[int, int] = (0, 40),
                  tight: bool = False) -> list[tuple[list[int], int, int]]:
    """``(trace, num_rows, cache_rows)`` triples, skewed so that hits happen.

    ``rows`` and ``length`` are inclusive ranges; ``tight`` keeps the cache smaller
    than the table, so that every trace has evictions to get right.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        num_rows = int(rng.integers(rows[0], rows[1] + 1))
        weights = rng.random(num_rows) ** 3 + 0.01
        trace = rng.choice(num_rows, size=int(rng.integers(length[0], length[1] + 1)),
                           p=weights / weights.sum())
        cache_rows = int(rng.integers(1, num_rows if tight else num_rows + 2))
        out.append((trace.tolist(), num_rows, cache_rows))
    return out


# ------------------------------------------------------------------------ hand-computed


def test_lru_hand_trace() -> None:
    # [0] [0 1] [1 2] (evict 0) [2 0] (evict 1) [0 3] (evict 2) 0 hits, [0 1] (evict 3)
    got = replay([0, 1, 2, 0, 3, 0, 1], num_rows=4, cache_rows=2, policy="lru")
    assert got == CacheCounters(accesses=7, hits=1, misses=6, evictions=4)
    assert got.hit_rate == pytest.approx(1 / 7)


def test_lfu_hand_trace() -> None:
    # counts persist across evictions; ties go to the least recently used row:
    # t3 evicts 1 (count 1 < 2), t4 evicts 2 (1 < 2), t5 evicts 0 (2 = 2, older),
    # t6 evicts 1 (2 = 2, older)
    trace = [0, 0, 1, 2, 1, 2, 0]
    assert replay(trace, num_rows=3, cache_rows=2, policy="lfu") == CacheCounters(7, 1, 6, 4)
    assert replay(trace, num_rows=3, cache_rows=2, policy="lru") == CacheCounters(7, 3, 4, 2)


def test_profile_hand_trace() -> None:
    # rows 1 (count 5) and 2 (count 3) are preloaded; t1 evicts 2 (4 < 5), t4 evicts 3 (3 < 6)
    got = replay([2, 3, 1, 3, 0], num_rows=4, cache_rows=2, policy="profile",
                 profile=[0, 5, 3, 1])
    assert got == CacheCounters(accesses=5, hits=3, misses=2, evictions=2, preloaded=2)


def test_profile_skips_rows_never_seen() -> None:
    got = replay([2, 0, 2], num_rows=3, cache_rows=3, policy="profile", profile=[0, 0, 7])
    assert got == CacheCounters(accesses=3, hits=2, misses=1, evictions=0, preloaded=1)


def test_lookahead_hand_trace() -> None:
    trace = [0, 0, 1, 2, 2, 2, 1, 0]
    # window 1: t3 sees only 2 coming -> evicts 1 (count 1 < 2); t6 sees 0 coming -> evicts 2
    got = replay(trace, num_rows=3, cache_rows=2, policy="lookahead", lookahead=1)
    assert got == CacheCounters(accesses=8, hits=4, misses=4, evictions=2)
    # plain LFU evicts 0 at t6 (count 2 < 3) and misses it at t7
    assert replay(trace, num_rows=3, cache_rows=2, policy="lfu").hits == 3
    assert belady_hit_rate(trace, 3, 2) == pytest.approx(4 / 8)


def test_lookahead_evicts_farthest_when_all_are_needed() -> None:
    # t2: 0 is next used at 3, 1 at 4 -> evict 1; t4: 0 is not used again -> evict 0
    got = replay([0, 1, 2, 0, 1, 2], num_rows=3, cache_rows=2, policy="lookahead", lookahead=2)
    assert got == CacheCounters(accesses=6, hits=2, misses=4, evictions=2)


def test_lookahead_with_profile_uses_first_use_of_preloaded_rows() -> None:
    # preloaded 2 (count 2) and 1 (count 1); at t0 row 1 is due at t1 (inside the
    # window) so 2 goes although its count is higher; t2 evicts 0 (count 1 < 2)
    got = replay([0, 1, 2], num_rows=3, cache_rows=2, policy="lookahead", lookahead=1,
                 profile=[0, 1, 2])
    assert got == CacheCounters(accesses=3, hits=1, misses=2, evictions=2, preloaded=2)
    without_window = replay([0, 1, 2], num_rows=3, cache_rows=2, policy="profile",
                            profile=[0, 1, 2])
    assert without_window == CacheCounters(3, 1, 2, 2, 2)


def test_static_topk_hand_trace() -> None:
    trace = [0, 1, 1, 2, 2, 2, 3]
    assert static_topk_hit_rate(trace, 4, 1) == pytest.approx(3 / 7)
    assert static_topk_hit_rate(trace, 4, 2) == pytest.approx(5 / 7)
    assert static_topk_hit_rate(trace, 4, 9) == 1.0
    assert static_topk_hit_rate([], 4, 2) == 0.0


def test_belady_counts_compulsory_misses() -> None:
    # 3 distinct rows fit: only the 3 first touches miss
    assert belady_hit_rate([0, 1, 2, 0, 1, 2], 3, 3) == pytest.approx(3 / 6)
    # a cyclic scan one row larger than the cache: LRU never hits, MIN hits every
    # other time (it evicts the row that comes back last)
    cyclic = [0, 1, 2] * 3
    assert belady_hit_rate(cyclic, 3, 2) == pytest.approx(3 / 9)
    assert replay(cyclic, num_rows=3, cache_rows=2, policy="lru").hits == 0


# --------------------------------------------------------------------- against references


@pytest.mark.parametrize("policy", ["lru", "lfu", "lookahead"])
def test_policies_match_brute_force_reference(policy: str) -> None:
    for trace, num_rows, cache_rows in random_traces(150, seed=len(policy)):
        for lookahead in ((1, 3, 50) if policy == "lookahead" else (0,)):
            got = replay(trace, num_rows=num_rows, cache_rows=cache_rows, policy=policy,
                         lookahead=lookahead)
            want = reference(trace, num_rows, cache_rows, policy, lookahead=lookahead)
            assert got == want, (trace, num_rows, cache_rows, lookahead)


@pytest.mark.parametrize("policy", ["profile", "lookahead"])
def test_profile_policies_match_brute_force_reference(policy: str) -> None:
    rng = np.random.default_rng(7)
    for trace, num_rows, cache_rows in random_traces(150, seed=11):
        # integer counts with many ties and zeros, so the tie-breaks are exercised
        profile = rng.integers(0, 4, num_rows).tolist()
        lookahead = 2 if policy == "lookahead" else 0
        got = replay(trace, num_rows=num_rows, cache_rows=cache_rows, policy=policy,
                     profile=profile, lookahead=lookahead)
        want = reference(trace, num_rows, cache_rows, policy, profile, lookahead)
        assert got == want, (trace, num_rows, cache_rows, profile)


def test_belady_equals_brute_force_over_all_evictions() -> None:
    for trace, num_rows, cache_rows in random_traces(150, seed=3, rows=(3, 5), length=(6, 11),
                                                     tight=True):
        best = brute_force_best_hits(trace, min(cache_rows, num_rows))
        assert belady_hit_rate(trace, num_rows, cache_rows) * len(trace) == pytest.approx(best)


def test_belady_beats_every_policy() -> None:
    rng = np.random.default_rng(5)
    for trace, num_rows, cache_rows in random_traces(150, seed=4):
        best = round(belady_hit_rate(trace, num_rows, cache_rows) * len(trace))
        for policy in ("lru", "lfu"):
            assert replay(trace, num_rows=num_rows, cache_rows=cache_rows,
                          policy=policy).hits <= best
        for lookahead in (1, 4):
            assert replay(trace, num_rows=num_rows, cache_rows=cache_rows, policy="lookahead",
                          lookahead=lookahead).hits <= best
        # a warm start can save at most one compulsory miss per preloaded row
        warm = replay(trace, num_rows=num_rows, cache_rows=cache_rows, policy="profile",
                      profile=rng.integers(0, 5, num_rows))
        assert warm.hits - warm.preloaded <= best


def test_lookahead_over_whole_trace_is_belady() -> None:
    for trace, num_rows, cache_rows in random_traces(60, seed=9):
        if trace:
            got = replay(trace, num_rows=num_rows, cache_rows=cache_rows, policy="lookahead",
                         lookahead=len(trace))
            assert got.hit_rate == belady_hit_rate(trace, num_rows, cache_rows)


# ------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("policy", POLICIES)
def test_counters_add_up(policy: str) -> None:
    rng = np.random.default_rng(1)
    trace = rng.zipf(1.3, 3000) % 500
    kwargs: dict[str, object] = {}
    if policy == "profile":
        kwargs["profile"] = np.bincount(rng.zipf(1.3, 3000) % 500, minlength=500)
    if policy == "lookahead":
        kwargs["lookahead"] = 64
    for cache_rows in (1, 7, 50, 499):
        got = replay(trace, num_rows=500, cache_rows=cache_rows, policy=policy, **kwargs)
        assert got.hits + got.misses == got.accesses == 3000
        assert got.evictions <= got.misses
        assert 0.0 <= got.hit_rate <= 1.0
        assert got.miss_rate == pytest.approx(1.0 - got.hit_rate)


@pytest.mark.parametrize("policy", POLICIES)
def test_cache_as_large_as_the_table_only_misses_compulsorily(policy: str) -> None:
    trace = np.array([3, 1, 3, 0, 1, 3, 2, 0], dtype=np.uint16)
    kwargs: dict[str, object] = {"lookahead": 2} if policy == "lookahead" else {}
    if policy == "profile":
        kwargs["profile"] = np.zeros(4)
    for cache_rows in (4, 10**9):
        got = replay(trace, num_rows=4, cache_rows=cache_rows, policy=policy, **kwargs)
        assert got == CacheCounters(accesses=8, hits=4, misses=4, evictions=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_empty_trace(policy: str) -> None:
    kwargs: dict[str, object] = {"lookahead": 1} if policy == "lookahead" else {}
    if policy == "profile":
        kwargs["profile"] = [1, 0]
    got = replay([], num_rows=2, cache_rows=1, policy=policy, **kwargs)
    assert (got.accesses, got.hits, got.misses, got.evictions) == (0, 0, 0, 0)
    assert got.hit_rate == 0.0


def test_counters_are_frozen() -> None:
    got = replay([0, 0], num_rows=1, cache_rows=1, policy="lru")
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.hits = 5  # type: ignore[misc]
    assert not hasattr(got, "__dict__")


def test_profile_reaches_static_topk_on_zipf() -> None:
    """A profile from another sample of the same distribution keeps the cache at top-k."""
    rng = np.random.default_rng(0)
    num_rows, perm = 5000, rng.permutation(5000)
    p = np.arange(1, num_rows + 1, dtype=float) ** -1.05
    cdf = np.cumsum(p / p.sum())

    def sample(n: int) -> np.ndarray:
        return perm[np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), num_rows - 1)]

    trace, profile = sample(50_000), np.bincount(sample(50_000), minlength=num_rows)
    top = static_topk_hit_rate(trace, num_rows, 50)
    got = replay(trace, num_rows=num_rows, cache_rows=50, policy="profile", profile=profile)
    assert got.hit_rate >= top - 0.01
    assert got.hit_rate > replay(trace, num_rows=num_rows, cache_rows=50, policy="lru").hit_rate
    ahead = replay(trace, num_rows=num_rows, cache_rows=50, policy="lookahead", lookahead=1000)
    assert ahead.hit_rate > top


# ---------------------------------------------------------------------------------- errors


def test_error_is_a_value_error() -> None:
    assert issubclass(ReplayError, ValueError)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ids": [0, 5, 12]}, r"ids\[2\] = 12 is out of range for num_rows=10"),
    ({"ids": [-1]}, r"ids\[0\] = -1 is out of range for num_rows=10"),
    ({"ids": [0.5, 1.0]}, r"ids must be integers, got dtype float64"),
    ({"ids": [True, False]}, r"ids must be integers, got dtype bool"),
    ({"ids": [[0, 1], [2, 3]]}, r"ids must be 1-D, got shape \(2, 2\)"),
    ({"policy": "fifo"}, r"unknown policy 'fifo'; choose one of 'lru', 'lfu', 'profile', "
                         r"'lookahead'"),
    ({"policy": None}, r"unknown policy None"),
    ({"cache_rows": 0}, r"cache_rows must be >= 1, got 0"),
    ({"cache_rows": -3}, r"cache_rows must be >= 1, got -3"),
    ({"cache_rows": 2.5}, r"cache_rows must be an integer, got 2.5"),
    ({"num_rows": 0}, r"num_rows must be >= 1, got 0"),
    ({"num_rows": True}, r"num_rows must be an integer, got True"),
    ({"policy": "profile"}, r"policy 'profile' needs profile="),
    ({"policy": "profile", "profile": [1, 2]},
     r"profile must have length num_rows=10, got shape \(2,\)"),
    ({"policy": "profile", "profile": [1] * 9 + [-1]}, r"profile\[9\] = -1.0 must be a finite"),
    ({"policy": "profile", "profile": [1] * 9 + [float("nan")]}, r"profile\[9\] = nan"),
    ({"policy": "profile", "profile": ["a"] * 10}, r"profile must be per-row access counts"),
    ({"policy": "lfu", "profile": [1] * 10}, r"profile is only used by policies 'profile' "
                                             r"and 'lookahead', not 'lfu'"),
    ({"policy": "lookahead"}, r"policy 'lookahead' needs lookahead >= 1 .*got 0"),
    ({"policy": "lookahead", "lookahead": -4}, r"lookahead must be >= 0, got -4"),
    ({"policy": "lru", "lookahead": 8}, r"lookahead=8 is only used by policy 'lookahead', "
                                        r"not 'lru'"),
])
def test_replay_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"ids": [0, 1, 2], "num_rows": 10, "cache_rows": 2,
                               "policy": "lru", **kwargs}
    with pytest.raises(ReplayError, match=message):
        replay(**args)  # type: ignore[arg-type]


def test_reference_rates_validate_their_arguments() -> None:
    with pytest.raises(ReplayError, match=r"ids\[1\] = 4 is out of range for num_rows=4"):
        static_topk_hit_rate([0, 4], 4, 2)
    with pytest.raises(ReplayError, match=r"cache_rows must be >= 1, got 0"):
        belady_hit_rate([0, 1], 4, 0)
    with pytest.raises(ReplayError, match=r"ids must be 1-D"):
        belady_hit_rate(np.zeros((2, 2), dtype=int), 4, 1)
