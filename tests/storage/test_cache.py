"""Row cache over a table store: policy counters against storage.replay and a batch
reference, bit-exact optimizer steps against an in-memory table through a cache
smaller than the working set, batches larger than the cache, prefetch correctness,
flush + checkpoint + reopen, the hash index, and every error path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import (
    CacheArgumentError,
    CacheStats,
    CacheWriteError,
    MissingArrayError,
    ReadOnlyStoreError,
    RowCache,
    RowIndexError,
    RowShapeError,
    StoreError,
    TableStore,
    lookup_many,
    replay,
)
from storage.cache.index import DenseIndex, SortedIndex, make_index

ROWS, DIM = 3000, 8
LR, EPS = 0.05, 1e-8


# ---- helpers -----------------------------------------------------------------------------
def make_store(path: Path, *, rows: int = ROWS, dim: int = DIM, dtype: str = "fp32",
               state: bool = True) -> TableStore:
    store = TableStore.create(path)
    store.add_table("t", rows, dim, dtype=dtype, seed=1,
                    optimizer_state="rowwise_adagrad" if state else None)
    return store


def zipf_ids(rng: np.random.Generator, rows: int, count: int, exponent: float = 1.05
             ) -> np.ndarray:
    """``count`` ids of a stationary Zipf distribution (the same hot rows every call)."""
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
    ranks = rng.choice(rows, size=count, p=weights / weights.sum())
    return np.random.default_rng(rows).permutation(rows)[ranks]


def as_torch(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """A table read from the store as a torch tensor of its dtype (bf16 from its bits)."""
    if dtype == "bf16":
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(stored)


class Reference:
    """The optimizers on a plain in-memory table, written out independently of the cache."""

    def __init__(self, store: TableStore, dtype: str) -> None:
        self.weights = as_torch(store.read_table("t"), dtype).clone()
        self.state = torch.from_numpy(store.read_table("t", state=True)[:, 0]).clone()

    def summed(self, ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = torch.zeros(self.weights.shape, dtype=torch.float32)
        dense.index_add_(0, ids, grads)  # in the order of the ids
        touched = torch.unique(ids)
        return touched, dense[touched]

    def sgd(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        u, g = self.summed(ids, grads)
        w = self.weights[u].float()
        w -= LR * g
        self.weights[u] = w.to(self.weights.dtype)

    def adagrad(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        u, g = self.summed(ids, grads)
        s = self.state[u] + g.pow(2).mean(dim=1)
        self.state[u] = s
        w = self.weights[u].float()
        w -= LR * g / (torch.sqrt(s).unsqueeze(1) + EPS)
        self.weights[u] = w.to(self.weights.dtype)


def counting(store: TableStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the store's row calls (patched on the instance)."""
    calls = {"gather": 0, "gather_state": 0, "scatter": 0, "scatter_state": 0}
    for name in calls:
        original = getattr(store, name)

        def wrapper(*args: object, _name: str = name, _original: Callable = original,
                    **kwargs: object) -> object:
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(store, name, wrapper)
    return calls


# ---- policies and counters ---------------------------------------------------------------
CASES = [("lru", False, 0), ("lfu", False, 0), ("profile", True, 0),
         ("lookahead", False, 1), ("lookahead", False, 4), ("lookahead", True, 3),
         ("lookahead", False, 1500)]


@pytest.mark.parametrize("policy, with_profile, lookahead", CASES)
@pytest.mark.parametrize("seed, index", [(5, "dense"), (6, "dense"), (7, "sorted")])
def test_access_by_access_counters_match_replay(tmp_path: Path, policy: str,
                                                with_profile: bool, lookahead: int,
                                                seed: int, index: str) -> None:
    """Every policy through the cache's tensor index and policy state, one id per batch,
    counts the hits, misses and evictions of ``storage.replay`` on random Zipf streams
    (lookahead: the next ids announced before each lookup; 1500 = the whole trace,
    Belady's MIN)."""
    rng = np.random.default_rng(seed)
    rows, slots = int(rng.integers(100, 400)), int(rng.integers(5, 60))
    trace = zipf_ids(rng, rows, 1500, exponent=float(rng.uniform(0.6, 1.3)))
    profile = np.bincount(zipf_ids(rng, rows, 2500), minlength=rows) if with_profile \
        else None
    with make_store(tmp_path / "s", rows=rows, state=False) as store:
        cache = RowCache(store, "t", slots=slots, policy=policy, profile=profile, index=index)
        for t, row in enumerate(trace):
            if lookahead:
                cache.announce(trace[t + 1:t + 1 + lookahead])
            cache.lookup(np.array([row]))
        got = cache.stats()
    want = replay(trace, num_rows=rows, cache_rows=slots, policy=policy, profile=profile,
                  lookahead=lookahead)
    assert want.evictions > 100
    assert (got.accesses, got.hits, got.misses, got.evictions, got.preloaded) == (
        want.accesses, want.hits, want.misses, want.evictions, want.preloaded)


def test_lookup_many_equals_lookups_one_by_one(tmp_path: Path) -> None:
    """One grouped lookup per step over tables of different sizes and policies (one
    batch larger than its cache, one empty) leaves every cache as the single lookups do."""
    rng = np.random.default_rng(9)
    specs = [("a", 400, 30, "lru"), ("b", 900, 50, "lfu"), ("c", 300, 8, "lookahead")]
    with TableStore.create(tmp_path / "s") as store:
        for name, rows, _, _ in specs:
            store.add_table(name, rows, DIM, seed=3)

        def caches() -> list[RowCache]:
            return [RowCache(store, name, slots=slots, policy=policy)
                    for name, _, slots, policy in specs]

        grouped, single = caches(), caches()
        for step in range(25):
            batches = [zipf_ids(rng, rows, int(rng.integers(0, 40))) for _, rows, _, _ in specs]
            if step == 3:
                batches[2] = np.arange(20)  # more distinct rows than its 8 slots
            got = lookup_many(grouped, batches)
            want = [cache.lookup(batch) for cache, batch in zip(single, batches)]
            for g, w, a, b in zip(got, want, grouped, single):
                assert torch.equal(g, w)
                assert np.array_equal(a.resident_rows(), b.resident_rows())
        assert [c.stats() for c in grouped] == [c.stats() for c in single]
        assert grouped[2].stats().uncached > 0 and grouped[1].stats().evictions > 0
        with pytest.raises(CacheArgumentError, match="one ids per cache"):
            lookup_many(grouped, [np.array([1])])
        with pytest.raises(RowIndexError):
            lookup_many(grouped, [np.array([1]), np.array([900]), np.array([1])])
        assert grouped[0].stats().accesses == single[0].stats().accesses


def batch_lru_reference(batches: list[np.ndarray], slots: int) -> tuple[list[set[int]], dict]:
    """The documented batch semantics of LRU, one row at a time in plain Python."""
    last: dict[int, int] = {}  # resident row -> number of the latest batch that used it
    totals = {"hits": 0, "misses": 0, "evictions": 0, "uncached": 0}
    residents = []
    for number, batch in enumerate(batches):
        ids = batch.tolist()
        hit_rows = {r for r in ids if r in last}
        missing = sorted({r for r in ids if r not in last})
        room = slots - len(hit_rows)
        if len(missing) > room:
            cached = sorted(sorted(missing, key=lambda r: (-ids.count(r), r))[:room])
        else:
            cached = missing
        need = len(cached) - (slots - len(last))
        if need > 0:
            candidates = sorted((p, r) for r, p in last.items() if r not in hit_rows)
            for _, r in candidates[:need]:
                del last[r]
            totals["evictions"] += need
        for r in ids:
            if r in hit_rows or r in cached:
                last[r] = number
        totals["misses"] += len(missing)
        totals["hits"] += len(ids) - len(missing)
        totals["uncached"] += len(missing) - len(cached)
        residents.append(set(last))
    return residents, totals


def test_batch_lru_matches_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    slots = 32
    batches = [zipf_ids(rng, 200, int(n)) for n in rng.integers(1, 70, 150)]
    residents, totals = batch_lru_reference(batches, slots)
    with make_store(tmp_path / "s", rows=200, state=False) as store:
        cache = RowCache(store, "t", slots=slots, policy="lru")
        for batch, resident in zip(batches, residents):
            cache.gather(torch.from_numpy(batch))
            assert set(cache.resident_rows().tolist()) == resident
        got = cache.stats()
    assert totals["uncached"] > 0  # some batches overflow the cache
    assert (got.hits, got.misses, got.evictions, got.uncached) == (
        totals["hits"], totals["misses"], totals["evictions"], totals["uncached"])


def test_one_gather_and_one_scatter_per_lookup(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with make_store(tmp_path / "s") as store:
        cache = RowCache(store, "t", slots=64, with_state=True, write_behind=True)
        first = torch.arange(0, 128, 2)
        cache.gather(first)
        cache.apply_sgd(first, torch.ones(64, DIM), LR)  # every slot dirty
        calls = counting(store, monkeypatch)
        cache.gather(torch.arange(1, 100, 2).repeat(2))  # 50 distinct misses, 50 victims
        cache.settle()  # the write-back runs on the background thread
        assert calls == {"gather": 1, "gather_state": 1, "scatter": 1, "scatter_state": 1}
        assert cache.stats().write_backs == 50
        cache.gather(torch.arange(1, 100, 2))  # all hits: no store access at all
        assert calls == {"gather": 1, "gather_state": 1, "scatter": 1, "scatter_state": 1}


def test_profile_preloads_hottest_rows_in_one_gather(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    profile = np.zeros(ROWS)
    profile[[7, 9, 11, 13, 500]] = [5, 50, 5, 1, 9]
    with make_store(tmp_path / "s") as store:
        calls = counting(store, monkeypatch)
        cache = RowCache(store, "t", slots=4, policy="profile", profile=profile,
                         with_state=True)
        assert calls["gather"] == 1 and calls["gather_state"] == 1
        assert cache.resident_rows().tolist() == [7, 9, 11, 500]  # ties: lower row id
        cache.gather(torch.tensor([9, 500, 7, 11]))
        stats = cache.stats()
        assert (stats.preloaded, stats.hits, stats.misses) == (4, 4, 0)
        cache.gather(torch.tensor([13]))  # evicts the least counted: 7 or 11 (5+1), 7 older
        assert cache.resident_rows().tolist() == [9, 11, 13, 500]


# ---- optimizer exactness ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "profile"])
def test_updates_equal_in_memory_table(tmp_path: Path, dtype: str, optimizer: str,
                                       policy: str) -> None:
    rng = np.random.default_rng(11)
    profile = np.bincount(zipf_ids(rng, ROWS, 5000), minlength=ROWS) \
        if policy == "profile" else None
    with make_store(tmp_path / "s", dtype=dtype) as store:
        ref = Reference(store, dtype)
        cache = RowCache(store, "t", slots=48, policy=policy, profile=profile,
                         with_state=optimizer == "adagrad")
        for _ in range(40):
            ids = torch.from_numpy(zipf_ids(rng, ROWS, 40))
            rows = cache.gather(ids)
            assert rows.dtype == ref.weights.dtype
            assert torch.equal(rows, ref.weights[ids])
            grads = torch.from_numpy(rng.standard_normal((40, DIM)).astype(np.float32))
            if optimizer == "sgd":
                cache.apply_sgd(ids, grads, LR)
                ref.sgd(ids, grads)
            else:
                cache.apply_rowwise_adagrad(ids, grads, LR, EPS)
                ref.adagrad(ids, grads)
        stats = cache.stats()
        assert stats.evictions > 0 and stats.write_backs > 0
        cache.flush()
        assert cache.dirty_rows().size == 0
        assert torch.equal(as_torch(store.read_table("t"), dtype), ref.weights)
        if optimizer == "adagrad":
            assert torch.equal(torch.from_numpy(store.read_table("t", state=True)[:, 0]),
                               ref.state)


def test_evicted_dirty_row_is_written_back_and_fetched_again(tmp_path: Path) -> None:
    with make_store(tmp_path / "s") as store:
        ref = Reference(store, "fp32")
        cache = RowCache(store, "t", slots=2, with_state=True)
        one = torch.tensor([5])
        cache.gather(one)
        cache.apply_rowwise_adagrad(one, torch.ones(1, DIM), LR, EPS)
        ref.adagrad(one, torch.ones(1, DIM))
        cache.gather(torch.tensor([6, 7]))  # evicts row 5, dirty: written with its state
        assert 5 not in cache.resident_rows()
        cache.settle()
        assert np.array_equal(store.gather("t", [5]), ref.weights[[5]].numpy())
        assert store.gather_state("t", [5])[0, 0] == ref.state[5]
        cache.gather(one)  # fetched again with its state
        cache.apply_rowwise_adagrad(one, torch.ones(1, DIM), LR, EPS)
        ref.adagrad(one, torch.ones(1, DIM))
        assert torch.equal(cache.gather(one), ref.weights[one])


def test_an_update_after_a_lookup_uses_its_slots_only_for_the_same_ids(tmp_path: Path) -> None:
    """The slots of the latest lookup serve an ``apply_*`` of equal ids; ids changed in
    place since (through torch or their numpy view), or another lookup between, are
    looked up again."""
    with make_store(tmp_path / "s") as store:
        ref = Reference(store, "fp32")
        cache = RowCache(store, "t", slots=6)
        grads = torch.ones(3, DIM)
        ids = torch.tensor([1, 2, 1])
        cache.gather(ids)
        cache.apply_sgd(ids, grads, LR)  # the lookup's slots
        ref.sgd(ids, grads)
        cache.gather(ids)
        ids.numpy()[:] = [3, 4, 3]  # other rows, none resident: updated in the store
        cache.apply_sgd(ids, grads, LR)
        ref.sgd(ids, grads)
        cache.gather(torch.tensor([1, 2, 5]))
        ids[:] = torch.tensor([5, 2, 2])
        cache.apply_sgd(ids, grads, LR)
        ref.sgd(ids, grads)
        first = torch.tensor([1, 2, 1])
        cache.gather(first)
        cache.gather(torch.tensor([6, 7, 8]))  # evicts: the slots of ``first`` are stale
        cache.apply_sgd(first, grads, LR)
        ref.sgd(first, grads)
        cache.flush()
        assert torch.equal(torch.from_numpy(store.read_table("t")), ref.weights)


# ---- batches larger than the cache -----------------------------------------------------
def test_batch_with_more_distinct_rows_than_slots(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with make_store(tmp_path / "s") as store:
        ref = Reference(store, "fp32")
        cache = RowCache(store, "t", slots=8, with_state=True)
        cache.gather(torch.arange(4))
        ids = torch.cat([torch.arange(100), torch.tensor([50, 50, 60])])  # 50, 60 used most
        calls = counting(store, monkeypatch)
        rows = cache.gather(ids)
        assert calls["gather"] == 1  # cached and uncached misses in one read
        assert torch.equal(rows, ref.weights[ids])
        assert set(cache.resident_rows().tolist()) >= {0, 1, 2, 3, 50, 60}
        assert cache.stats().uncached == 100 - 8
        slots = cache.lookup(ids)
        assert int((slots < 0).sum()) == 92  # each uncached id appears once in ids
        grads = torch.from_numpy(np.random.default_rng(0).standard_normal(
            (ids.numel(), DIM)).astype(np.float32))
        cache.apply_rowwise_adagrad(ids, grads, LR, EPS)  # resident in slots, others direct
        ref.adagrad(ids, grads)
        assert cache.stats().direct_updates == 100 - 8
        assert torch.equal(cache.gather(ids), ref.weights[ids])
        cache.flush()
        assert np.array_equal(store.read_table("t"), ref.weights.numpy())
        assert np.array_equal(store.read_table("t", state=True)[:, 0], ref.state.numpy())


def test_slots_are_clamped_to_the_table(tmp_path: Path) -> None:
    with make_store(tmp_path / "s", rows=10, state=False) as store:
        cache = RowCache(store, "t", slots=1000)
        assert cache.num_slots == 10 and cache.weights.shape == (10, DIM)
        cache.gather(torch.arange(10))
        assert cache.stats().evictions == 0


# ---- prefetch ------------------------------------------------------------------------
def cache_threads() -> set[str]:
    """Names of the row caches' background threads alive now."""
    import threading

    return {t.name for t in threading.enumerate() if t.name.startswith("row-cache-store")}


def train(store: TableStore, use_prefetch: bool, write_behind: bool,
          steps: int = 30, background: bool = True) -> tuple[list, CacheStats, set[str]]:
    """Rows seen per step, the cache's stats and the row-cache threads alive before it
    closed."""
    rng = np.random.default_rng(3)
    batches = [torch.from_numpy(zipf_ids(rng, ROWS, 64)) for _ in range(steps + 1)]
    seen = []
    with RowCache(store, "t", slots=60, with_state=True, write_behind=write_behind,
                  background=background) as cache:
        rows = cache.gather(batches[0])
        for step in range(steps):
            if use_prefetch:
                cache.prefetch(batches[step + 1])
            seen.append(rows.clone())
            grads = torch.from_numpy(rng.standard_normal((64, DIM)).astype(np.float32))
            cache.apply_rowwise_adagrad(batches[step], grads, LR, EPS)
            rows = cache.gather(batches[step + 1])
        cache.flush()
        return seen, cache.stats(), cache_threads()


@pytest.mark.parametrize("background", [True, False], ids=["thread", "inline"])
@pytest.mark.parametrize("write_behind", [False, True])
def test_prefetch_gives_identical_results(tmp_path: Path, write_behind: bool,
                                          background: bool) -> None:
    """Prefetch and write-behind, on the background thread or inline (``background=
    False``: no thread at all), change no result and no hit or miss."""
    before = cache_threads()  # only the row caches' threads: other tests' come and go
    with make_store(tmp_path / "a") as plain, make_store(tmp_path / "b") as fetched:
        seen_plain, stats_plain, _ = train(plain, use_prefetch=False, write_behind=False)
        seen_fetched, stats_fetched, alive = train(fetched, use_prefetch=True,
                                                   write_behind=write_behind,
                                                   background=background)
        assert (alive == before) == (not background)
        assert all(torch.equal(a, b) for a, b in zip(seen_plain, seen_fetched))
        assert np.array_equal(plain.read_table("t"), fetched.read_table("t"))
        assert np.array_equal(plain.read_table("t", state=True),
                              fetched.read_table("t", state=True))
    assert stats_fetched.prefetched_rows > 0 and stats_plain.prefetched_rows == 0
    assert (stats_fetched.hits, stats_fetched.misses, stats_fetched.write_backs) == (
        stats_plain.hits, stats_plain.misses, stats_plain.write_backs)
    assert stats_fetched.background_read_s > 0 and stats_plain.background_read_s == 0
    assert (stats_fetched.background_write_s > 0) == write_behind
    assert stats_plain.background_write_s == 0
    assert stats_fetched.background_wait_s >= 0 and stats_fetched.background_hidden_s >= 0
    if not background:  # inline: nothing overlapped, all of it was waited for
        assert stats_fetched.background_hidden_s == 0 and stats_fetched.background_wait_s > 0


def test_failed_background_write_is_sticky(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with make_store(tmp_path / "s") as store:
        cache = RowCache(store, "t", slots=2, write_behind=True)
        cache.gather(torch.tensor([1, 2]))
        cache.apply_sgd(torch.tensor([1, 2]), torch.ones(2, DIM), LR)

        def full_disk(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store, "scatter", full_disk)
        cache.gather(torch.tensor([3, 4]))  # evicts dirty 1 and 2; their write fails later
        for call in (cache.settle, cache.flush, lambda: cache.gather(torch.tensor([5]))):
            with pytest.raises(CacheWriteError, match="No space left") as info:
                call()
            assert isinstance(info.value, StoreError) and isinstance(info.value, OSError)
        cache.gather(torch.tensor([3, 4]))  # hits touch no store: still served
        with pytest.raises(CacheWriteError):
            cache.close()


def test_failed_write_in_the_lookup_changes_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with make_store(tmp_path / "s") as store:
        ref = Reference(store, "fp32")
        cache = RowCache(store, "t", slots=3, write_behind=False)
        cache.gather(torch.tensor([1, 2]))
        cache.apply_sgd(torch.tensor([1, 2]), torch.ones(2, DIM), LR)
        ref.sgd(torch.tensor([1, 2]), torch.ones(2, DIM))
        original = store.scatter

        def full_disk(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store, "scatter", full_disk)
        with pytest.raises(OSError, match="No space"):
            cache.gather(torch.tensor([3, 4]))  # needs a free slot and a dirty victim
        assert cache.resident_rows().tolist() == [1, 2]
        assert cache.dirty_rows().tolist() == [1, 2]
        monkeypatch.setattr(store, "scatter", original)
        assert torch.equal(cache.gather(torch.tensor([3, 4])), ref.weights[[3, 4]])
        cache.flush()
        assert np.array_equal(store.read_table("t"), ref.weights.numpy())


def test_failed_prefetch_read_is_raised_once(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with make_store(tmp_path / "s") as store:
        ref = Reference(store, "fp32")
        cache = RowCache(store, "t", slots=4)
        original = store.gather

        def flaky(*args: object, **kwargs: object) -> np.ndarray:
            monkeypatch.setattr(store, "gather", original)
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(store, "gather", flaky)
        cache.prefetch(torch.tensor([1, 2]))
        with pytest.raises(OSError, match="Input/output"):
            cache.gather(torch.tensor([1, 2]))
        assert torch.equal(cache.gather(torch.tensor([1, 2])), ref.weights[[1, 2]])


def test_prefetched_row_updated_directly_is_not_served_stale(tmp_path: Path) -> None:
    with make_store(tmp_path / "s") as store:
        ref = Reference(store, "fp32")
        cache = RowCache(store, "t", slots=4, with_state=True)
        cache.prefetch(torch.tensor([9, 10]))
        grads = torch.ones(1, DIM)
        cache.apply_rowwise_adagrad(torch.tensor([9]), grads, LR, EPS)  # not resident
        ref.adagrad(torch.tensor([9]), grads)
        assert torch.equal(cache.gather(torch.tensor([9, 10])), ref.weights[[9, 10]])
        stats = cache.stats()
        assert (stats.direct_updates, stats.prefetched_rows, stats.prefetch_discarded) == (1, 1, 1)
        cache.apply_rowwise_adagrad(torch.tensor([9]), grads, LR, EPS)
        ref.adagrad(torch.tensor([9]), grads)
        assert torch.equal(cache.state[cache.lookup(torch.tensor([9]))], ref.state[[9]])


def test_prefetched_row_made_dirty_resident_meanwhile_is_kept(tmp_path: Path) -> None:
    with make_store(tmp_path / "s") as store:
        ref = Reference(store, "fp32")
        cache = RowCache(store, "t", slots=3)
        cache.prefetch(torch.tensor([1, 2]))
        cache.gather(torch.tensor([2]))  # a lookup that misses consumes the prefetch
        cache.apply_sgd(torch.tensor([2]), torch.ones(1, DIM), LR)
        ref.sgd(torch.tensor([2]), torch.ones(1, DIM))
        cache.prefetch(torch.tensor([2, 3]))  # 2 is resident (dirty): only 3 is read
        assert torch.equal(cache.gather(torch.tensor([1, 2, 3])), ref.weights[[1, 2, 3]])
        # evict dirty 2 (written back), prefetch 2 again, update it directly, then use it
        cache.gather(torch.tensor([4, 5, 6]))
        cache.prefetch(torch.tensor([2]))
        cache.apply_sgd(torch.tensor([2]), torch.ones(1, DIM), LR)
        ref.sgd(torch.tensor([2]), torch.ones(1, DIM))
        assert torch.equal(cache.gather(torch.tensor([2])), ref.weights[[2]])


# ---- durability and errors ---------------------------------------------------------------
def test_flush_checkpoint_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s"
    rng = np.random.default_rng(4)
    with make_store(path) as store:
        ref = Reference(store, "fp32")
        with RowCache(store, "t", slots=16, with_state=True) as cache:
            for _ in range(10):
                ids = torch.from_numpy(zipf_ids(rng, ROWS, 32))
                cache.gather(ids)
                grads = torch.from_numpy(rng.standard_normal((32, DIM)).astype(np.float32))
                cache.apply_rowwise_adagrad(ids, grads, LR, EPS)
                ref.adagrad(ids, grads)
            dirty = cache.dirty_rows()
            assert dirty.size and not np.array_equal(store.gather("t", dirty),
                                                     ref.weights[dirty].numpy())
            cache.flush()
        store.checkpoint(7)
    with TableStore.open(path, mode="r") as store:
        assert store.checkpoint_step == 7
        assert np.array_equal(store.read_table("t"), ref.weights.numpy())
        assert np.array_equal(store.read_table("t", state=True)[:, 0], ref.state.numpy())


def test_rows_updated_in_place_and_marked_dirty_are_written_back(tmp_path: Path) -> None:
    """A caller's own step on the slots of a lookup (what the runtime's fused optimizer
    does), then ``mark_dirty``: the rows reach the store on eviction and at flush, with
    their state; bad slots and a read-only store are refused."""
    path = tmp_path / "s"
    with make_store(path) as store:
        expected = store.read_table("t")
        with RowCache(store, "t", slots=4, with_state=True) as cache:
            for ids in ([1, 2, 3], [2, 3, 4], [10, 11, 12, 13]):  # the last evicts all
                slots = cache.lookup(torch.tensor(ids))
                cache.weights[slots] += 1.0
                assert cache.state is not None
                cache.state[slots] += 0.5
                cache.mark_dirty(slots)
                expected[ids] += 1.0
            assert np.array_equal(store.gather("t", [1, 2, 3, 4]), expected[[1, 2, 3, 4]])
            cache.flush()
            with pytest.raises(CacheArgumentError, match="mark_dirty needs slots holding rows"):
                cache.mark_dirty(torch.tensor([7]))
            with pytest.raises(RowShapeError, match="slots must be a 1-D integer array"):
                cache.mark_dirty(torch.zeros(2, 2, dtype=torch.int64))
            cache.mark_dirty(torch.zeros(0, dtype=torch.int64))
        assert np.array_equal(store.read_table("t"), expected)
        state = store.read_table("t", state=True)[:, 0]
        assert state[[1, 4, 10]].tolist() == [0.5, 0.5, 0.5] and state[[2, 3]].tolist() == [1, 1]
    with TableStore.open(path, mode="r") as store:
        cache = RowCache(store, "t", slots=4)
        with pytest.raises(ReadOnlyStoreError, match="mark_dirty"):
            cache.mark_dirty(cache.lookup(torch.tensor([1])))


def test_read_only_store_refuses_updates_before_work(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make_store(path).close()
    with TableStore.open(path, mode="r") as store:
        cache = RowCache(store, "t", slots=8, with_state=True)
        ids = torch.tensor([1, 2, 3])
        before = cache.gather(ids).clone()
        stats = cache.stats()
        with pytest.raises(ReadOnlyStoreError, match="apply_sgd") as info:
            cache.apply_sgd(torch.tensor([1, ROWS + 5]), torch.ones(2, DIM), LR)
        assert isinstance(info.value, PermissionError) and info.value.path == str(path)
        with pytest.raises(ReadOnlyStoreError):
            cache.apply_rowwise_adagrad(ids, torch.ones(3, DIM), LR, EPS)
        assert cache.stats() == stats and torch.equal(cache.gather(ids), before)
        cache.flush()  # nothing dirty: nothing to refuse


@pytest.mark.parametrize("bad", [-1, ROWS, ROWS + 10])
def test_ids_out_of_range_name_table_id_and_rows(tmp_path: Path, bad: int) -> None:
    with make_store(tmp_path / "s") as store:
        cache = RowCache(store, "t", slots=8, with_state=True)
        ids = torch.tensor([0, bad, 1])
        calls: list[Callable[[], object]] = [
            lambda: cache.gather(ids), lambda: cache.lookup(ids), lambda: cache.prefetch(ids),
            lambda: cache.apply_sgd(ids, torch.zeros(3, DIM), LR),
            lambda: cache.apply_rowwise_adagrad(ids, torch.zeros(3, DIM), LR, EPS),
        ]
        for call in calls:
            with pytest.raises(RowIndexError) as info:
                call()
            assert (info.value.table, info.value.row_id, info.value.num_rows) == ("t", bad, ROWS)
            assert f"row id {bad}" in str(info.value) and isinstance(info.value, IndexError)
        assert cache.stats().accesses == 0 and cache.resident_rows().size == 0


def test_bad_ids_and_grads_raise_row_shape_error(tmp_path: Path) -> None:
    with make_store(tmp_path / "s") as store:
        cache = RowCache(store, "t", slots=8)
        for ids in (torch.zeros((2, 2), dtype=torch.int64), torch.tensor([0.5]),
                    np.array([True])):
            with pytest.raises(RowShapeError, match="1-D integer"):
                cache.gather(ids)
        with pytest.raises(RowShapeError, match=r"grads .*\(2, 8\)"):
            cache.apply_sgd(torch.tensor([1, 2]), torch.zeros(2, DIM + 1), LR)
        with pytest.raises(RowShapeError):
            cache.apply_sgd(torch.tensor([1, 2]), np.zeros((2, DIM)), LR)  # type: ignore[arg-type]
        assert cache.gather(np.array([], dtype=np.int64)).shape == (0, DIM)


def test_argument_errors(tmp_path: Path) -> None:
    with make_store(tmp_path / "s") as store:
        store.add_table("plain", 50, 4)
        for kwargs, pattern in [
            ({"slots": 0}, "slots"), ({"slots": True}, "slots"),
            ({"slots": 4, "policy": "fifo"}, "policy"),
            ({"slots": 4, "policy": "lru", "profile": np.ones(ROWS)}, "profile"),
            ({"slots": 4, "policy": "profile"}, "profile"),
            ({"slots": 4, "policy": "profile", "profile": np.ones(5)}, "shape"),
            ({"slots": 4, "policy": "profile", "profile": -np.ones(ROWS)}, ">= 0"),
            ({"slots": 4, "index": "tree"}, "index"),
        ]:
            with pytest.raises(CacheArgumentError, match=pattern) as info:
                RowCache(store, "t", **kwargs)
            assert isinstance(info.value, StoreError) and isinstance(info.value, ValueError)
        with pytest.raises(MissingArrayError, match="optimizer_state"):
            RowCache(store, "plain", slots=4, with_state=True)
        with pytest.raises(MissingArrayError, match="no table"):
            RowCache(store, "nope", slots=4)
        cache = RowCache(store, "plain", slots=4)
        with pytest.raises(CacheArgumentError, match="with_state=True"):
            cache.apply_rowwise_adagrad(torch.tensor([1]), torch.zeros(1, 4), LR)
        with pytest.raises(CacheArgumentError, match="lr"):
            cache.apply_sgd(torch.tensor([1]), torch.zeros(1, 4), float("nan"))


# ---- indexes ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 10_000), max_size=40)),
                max_size=30))
@pytest.mark.parametrize("kind", ["dense", "sorted"])
def test_index_matches_a_dict(kind: str, ops: list[tuple[bool, list[int]]]) -> None:
    slots = 64
    index, truth = make_index(kind, 10_001, slots), {}
    next_slot = 0
    for insert, values in ops:
        rows = np.unique(np.asarray(values, dtype=np.int64))
        if insert:
            rows = np.array([r for r in rows if r not in truth][:slots - len(truth)],
                            dtype=np.int64)
            slot_ids = np.arange(next_slot, next_slot + rows.size) % slots
            next_slot += rows.size
            index.insert(torch.from_numpy(rows), torch.from_numpy(slot_ids))
            truth.update(zip(rows.tolist(), slot_ids.tolist()))
        else:
            rows = np.array([r for r in rows if r in truth], dtype=np.int64)
            index.remove(torch.from_numpy(rows))
            for r in rows.tolist():
                del truth[r]
        probe = np.arange(0, 10_001, 7, dtype=np.int64)
        probe = np.concatenate([probe, np.array(list(truth), dtype=np.int64)])
        want = np.array([truth.get(r, -1) for r in probe.tolist()], dtype=np.int64)
        assert np.array_equal(index.find(torch.from_numpy(probe)).numpy(), want)


def test_sorted_index_remove_then_insert_in_one_batch() -> None:
    """The cache's pattern: evict some rows, then insert more rows than it evicted into
    their places and fresh ones (the cleared places are refilled first)."""
    index = SortedIndex(6, torch.device("cpu"))
    index.insert(torch.tensor([50, 10, 30, 20]), torch.tensor([0, 1, 2, 3]))
    index.remove(torch.tensor([10, 50]))
    assert index.find(torch.tensor([10, 20, 30, 50])).tolist() == [-1, 3, 2, -1]
    index.insert(torch.tensor([5, 60, 25]), torch.tensor([1, 0, 4]))
    assert index.find(torch.tensor([5, 10, 20, 25, 30, 50, 60])).tolist() == \
        [1, -1, 3, 4, 2, -1, 0]
    index.remove(torch.tensor([5, 20, 60]))
    index.insert(torch.tensor([7]), torch.tensor([3]))  # two cleared places stay unused
    assert index.find(torch.tensor([5, 7, 20, 25, 30, 60])).tolist() == [-1, 3, -1, 4, 2, -1]
    index.insert(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 5]))
    assert index.find(torch.tensor([1, 2, 3, 7, 25, 30])).tolist() == [0, 1, 5, 3, 4, 2]


def test_index_choice() -> None:
    assert isinstance(make_index("auto", 1000, 10), DenseIndex)
    assert isinstance(make_index("sorted", 1000, 10), SortedIndex)
    assert isinstance(make_index("hash", 1000, 10), SortedIndex)
    assert make_index("auto", 10**12, 1000).nbytes <= 16 * 1001
    with pytest.raises(CacheArgumentError, match="index must be"):
        make_index("btree", 1000, 10)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_sorted_index_cache_behaves_like_dense(tmp_path: Path, policy: str) -> None:
    rng = np.random.default_rng(8)
    batches = [torch.from_numpy(zipf_ids(rng, ROWS, 50)) for _ in range(40)]
    with make_store(tmp_path / "s") as store:
        dense = RowCache(store, "t", slots=40, policy=policy, index="dense")
        hashed = RowCache(store, "t", slots=40, policy=policy, index="sorted")
        for ids in batches:
            assert torch.equal(dense.gather(ids), hashed.gather(ids))
            assert np.array_equal(dense.resident_rows(), hashed.resident_rows())
        assert dense.stats() == hashed.stats()


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_device_gather_path_equals_host_path(tmp_path: Path, dtype: str) -> None:
    """On the CPU, gathers of resident rows go through numpy; on other devices through
    ``index_select``. Forcing the latter on the CPU must give the same rows."""
    rng = np.random.default_rng(6)
    with make_store(tmp_path / "s", dtype=dtype, state=False) as store:
        host = RowCache(store, "t", slots=32)
        device = RowCache(store, "t", slots=32)
        device._host_rows = None  # what a CUDA cache does
        for _ in range(10):
            ids = torch.from_numpy(zipf_ids(rng, ROWS, 30))
            rows = host.gather(ids)
            assert rows.dtype == as_torch(store.read_table("t"), dtype).dtype
            assert torch.equal(rows, device.gather(ids))


def test_closing_the_store_stops_the_cache_background_work(tmp_path) -> None:
    from storage import RowCache, TableStore

    store = TableStore.create(tmp_path / "s")
    store.add_table("t", 5000, 8, init="zeros")
    cache = RowCache(store, "t", slots=100)
    cache.prefetch(torch.arange(200, 400))
    store.close()  # must wait for the prefetch instead of unmapping under it
    assert cache._worker is not None


def test_recency_keys_keep_their_order_when_renormalised() -> None:
    """Recency keys are ``batch * num_rows + row``; for a huge table they are replaced
    by their ranks before they would leave int64, and victims stay the least recent."""
    from storage.cache.policy import LRU, SlotView

    num_rows, slots = 1 << 60, 5
    policy = LRU(num_rows, slots, torch.device("cpu"))
    slot_row = torch.tensor([40, 10, 30, 20, 50, -1])
    uses = [[0, 1], [2], [3], [4], [1]]  # batch b uses these slots; renormalised at batch 3
    for batch, used in enumerate(uses):
        policy.on_access(torch.tensor(used), slot_row[used], batch)
    assert policy._base == 3
    protected = torch.zeros(slots + 1, dtype=torch.bool)
    view = SlotView(slots, protected, slot_row, lambda rows: rows)
    order = [set(policy.victims(k, view).tolist()) for k in range(1, 6)]
    assert order == [{0}, {0, 2}, {0, 2, 3}, {0, 2, 3, 4}, {0, 1, 2, 3, 4}]
    protected[2] = True
    assert set(policy.victims(2, view).tolist()) == {0, 3}


@pytest.mark.parametrize("seed", range(6))
def test_smallest_on_the_cpu_picks_the_lexicographically_smallest_set(seed: int) -> None:
    """The CPU path of :func:`storage.cache.policy.smallest` (numpy's partition) picks the
    same set as a full lexicographic sort: ties in the leading keys (LFU counts, the
    protected slots' +inf) broken by the next key, the last key distinct."""
    from storage.cache.policy import smallest

    rng = np.random.default_rng(seed)
    size = 2000
    counts = torch.from_numpy(rng.integers(0, 4, size).astype(np.float64))
    counts[rng.choice(size, 50, replace=False)] = torch.inf  # protected
    recency = torch.from_numpy(rng.permutation(size).astype(np.int64) * 7 - 900)
    for count in (1, 17, 600, size - 50):
        order = sorted(range(size), key=lambda i: (counts[i].item(), recency[i].item()))
        assert set(smallest([counts, recency], count).tolist()) == set(order[:count])
        by_recency = sorted(range(size), key=lambda i: recency[i].item())
        assert set(smallest([recency], count).tolist()) == set(by_recency[:count])


@pytest.mark.parametrize("seed", range(4))
def test_lru_pool_of_oldest_slots_picks_the_same_victims_as_a_full_search(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """LRU on the CPU keeps a pool of its oldest slots between batches; through many
    batches of uses, evictions (with and without the slots being re-used) and protected
    slots its victims are exactly the smallest keys among every unprotected slot."""
    from storage.cache import policy as policies
    from storage.cache.policy import LRU, SlotView, smallest

    monkeypatch.setattr(policies, "POOL_FACTOR", 3)
    monkeypatch.setattr(policies, "POOL_MIN_SLOTS", 0)
    rng = np.random.default_rng(seed)
    num_rows, slots = 1_000_000, 600
    policy = LRU(num_rows, slots, torch.device("cpu"))
    slot_row = torch.arange(slots + 1) * 7
    next_row = 7 * (slots + 1)
    reused = 0
    policy.on_access(torch.arange(slots), slot_row[:slots], 0)
    for batch in range(1, 80):
        protected = torch.zeros(slots + 1, dtype=torch.bool)
        protected[torch.from_numpy(rng.choice(slots, rng.integers(0, 200), replace=False))] = True
        view = SlotView(slots, protected, slot_row, lambda rows: rows)
        count = int(rng.integers(1, 80))
        got = policy.victims(count, view)
        reused += policy._pool is not None and policy._pool[0].size != min(slots, 3 * count)
        want = smallest(LRU._order_keys(policy, view), count)
        assert set(got.tolist()) == set(want.tolist())
        if batch % 7:  # most batches use their victims (new rows) and protected slots
            used = torch.cat([got, torch.nonzero(protected[:slots]).squeeze(1)])
            slot_row[got] = torch.arange(next_row, next_row + got.numel())
            next_row += got.numel()
            policy.on_access(used, slot_row[used], batch)
    assert reused > 20  # an older pool (some entries used up) served most batches


@pytest.mark.parametrize("seed", range(4))
def test_lfu_pool_picks_the_same_victims_as_a_full_search(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """LFU on the CPU keeps a pool of candidates between batches; through many batches
    of uses (counts and keys rising), evictions whose slots get new rows of any count
    and protected slots its victims are exactly the smallest (count, key) among every
    unprotected slot."""
    from storage.cache import policy as policies
    from storage.cache.policy import LFU, SlotView, smallest

    monkeypatch.setattr(policies, "POOL_FACTOR", 3)
    monkeypatch.setattr(policies, "POOL_MIN_SLOTS", 0)
    rng = np.random.default_rng(seed)
    num_rows, slots = 20_000, 600
    counts = rng.integers(0, 5, num_rows).astype(np.float64)
    policy = LFU(num_rows, slots, torch.device("cpu"), counts, np.zeros(0, np.int64))
    slot_row = torch.from_numpy(rng.choice(num_rows, slots + 1, replace=False))
    policy.on_access(torch.arange(slots), slot_row[:slots], 0)
    kept = 0
    for batch in range(1, 80):
        protected = torch.zeros(slots + 1, dtype=torch.bool)
        protected[torch.from_numpy(rng.choice(slots, rng.integers(0, 200), replace=False))] = True
        view = SlotView(slots, protected, slot_row, lambda rows: rows)
        count = int(rng.integers(1, 80))
        before = policy._low
        got = policy.victims(count, view)
        kept += before is not None and policy._low is not None \
            and policy._low.key == before.key
        want = smallest(LFU._order_keys(policy, view), count)
        assert set(got.tolist()) == set(want.tolist())
        resident = set(slot_row.tolist())
        fresh = [r for r in rng.permutation(num_rows)[:4 * count].tolist()
                 if r not in resident][:got.numel()]
        slot_row[got] = torch.tensor(fresh)  # new rows, with counts low and high
        used = torch.cat([got, torch.nonzero(protected[:slots]).squeeze(1)])
        policy.on_access(used, slot_row[used], batch)
    assert kept > 20  # a pool drawn earlier served most batches
