"""Pairwise rebalancing of placed shards: the local search for many devices holding
few shards each.

With a handful of shards per device, moving or swapping one shard at a time stalls
far above the average load (4,096 tables on 1,024 devices: 10 % above it after
longest-first and single moves). Here two devices at a time pool their movable
shards and split them anew, the best split of all ``2**n`` (``n`` at most
``max_items``; a random subset of that size when they hold more) under HBM per
device and DRAM per host. Each round pairs the most loaded device with the least
loaded, the second with the second, ... (every other round: a random pairing), then
offers the most loaded device every partner, lightest first, while one helps. A
split is taken only when it lowers the pair's larger load, so the largest load never
rises. The search stops after ``PATIENCE_ROUNDS`` rounds without a lower largest
load, or near the average load, or at the deadline; with a fixed seed it is
deterministic unless the deadline cuts it short.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

MAX_ITEMS = 12
"""Shards two devices re-split at once (4,096 splits)."""
PATIENCE_ROUNDS = 6
"""Rounds without a lower largest load after which the search stops."""
GOOD_ENOUGH = 1e-4
"""The search also stops once the largest load is within this share of the average
load (which no placement beats)."""


@dataclass(frozen=True, slots=True)
class BalanceProblem:
    """Movable items on devices that already carry a fixed load and memory."""

    load_ms: tuple[float, ...]
    """Per movable item."""
    hbm_bytes: tuple[int, ...]
    dram_bytes: tuple[int, ...]
    """Host DRAM of each item, charged to the host of its device."""
    base_load_ms: tuple[float, ...]
    """Per device: the load of the shards that stay where they are."""
    base_hbm_bytes: tuple[int, ...]
    base_dram_bytes: tuple[int, ...]
    """Per host."""
    hbm_capacity_bytes: int
    dram_capacity_bytes: int
    devices_per_host: int


def _masks(n: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    if n not in cache:
        cache[n] = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.float64)
    return cache[n]


def balance_pairs(
    problem: BalanceProblem,
    device_of: tuple[int, ...],
    *,
    deadline: float,
    seed: int = 0,
    max_items: int = MAX_ITEMS,
) -> tuple[int, ...]:
    """Re-split pairs of devices until the largest load stops falling (or the
    ``deadline``, a ``time.perf_counter()`` value). ``device_of`` must respect the
    memory capacities; the result does too, and its largest load is no higher."""
    devices = len(problem.base_load_ms)
    if devices < 2 or not device_of:
        return device_of
    per_host = problem.devices_per_host
    # per item: load, HBM, DRAM (columns), so one product prices every split
    figures = np.column_stack([np.asarray(problem.load_ms, dtype=np.float64),
                               np.asarray(problem.hbm_bytes, dtype=np.float64),
                               np.asarray(problem.dram_bytes, dtype=np.float64)])
    where = np.asarray(device_of, dtype=np.intp)
    dev_load = np.asarray(problem.base_load_ms, dtype=np.float64).copy()
    dev_hbm = np.asarray(problem.base_hbm_bytes, dtype=np.float64).copy()
    host_dram = np.asarray(problem.base_dram_bytes, dtype=np.float64).copy()
    np.add.at(dev_load, where, figures[:, 0])
    np.add.at(dev_hbm, where, figures[:, 1])
    np.add.at(host_dram, where // per_host, figures[:, 2])
    items: list[list[int]] = [[] for _ in range(devices)]
    for item, device in enumerate(device_of):
        items[device].append(item)
    hbm_cap, dram_cap = float(problem.hbm_capacity_bytes), float(problem.dram_capacity_bytes)
    rng = np.random.default_rng(seed)
    cache: dict[int, np.ndarray] = {}

    def resplit(a: int, b: int) -> bool:
        before = max(dev_load[a], dev_load[b])
        tolerance = 1e-9 * max(before, 1e-12)
        if before - (dev_load[a] + dev_load[b]) / 2 <= tolerance:
            return False  # already even: no split lowers the larger load
        pool = items[a] + items[b]
        if len(pool) > max_items:
            pool = rng.choice(pool, size=max_items, replace=False).tolist()
        if not pool:
            return False
        idx = np.asarray(pool, dtype=np.intp)
        mine = figures[idx]
        on_a = where[idx] == a
        from_a, total = mine[on_a].sum(axis=0), mine.sum(axis=0)
        masks = _masks(len(pool), cache)
        to_a = masks @ mine  # each split's load, HBM, DRAM on device a
        new_a = dev_load[a] - from_a[0] + to_a[:, 0]
        new_b = dev_load[b] - (total[0] - from_a[0]) + (total[0] - to_a[:, 0])
        peak = np.maximum(new_a, new_b)
        ok = ((dev_hbm[a] - from_a[1] + to_a[:, 1] <= hbm_cap)
              & (dev_hbm[b] - (total[1] - from_a[1]) + (total[1] - to_a[:, 1]) <= hbm_cap))
        ha, hb = a // per_host, b // per_host
        if ha != hb and total[2] > 0:
            ok &= ((host_dram[ha] - from_a[2] + to_a[:, 2] <= dram_cap)
                   & (host_dram[hb] - (total[2] - from_a[2]) + (total[2] - to_a[:, 2]) <= dram_cap))
        peak[~ok] = np.inf
        best = int(np.argmin(peak))
        if peak[best] >= before - tolerance:
            return False
        for i, to_first in zip(pool, masks[best]):
            target = a if to_first else b
            source = int(where[i])
            if source != target:
                items[source].remove(i)
                items[target].append(i)
                dev_load[source] -= figures[i, 0]
                dev_load[target] += figures[i, 0]
                dev_hbm[source] -= figures[i, 1]
                dev_hbm[target] += figures[i, 1]
                host_dram[source // per_host] -= figures[i, 2]
                host_dram[target // per_host] += figures[i, 2]
                where[i] = target
        return True

    best_peak, stale, round_ = float(dev_load.max()), 0, 0
    good_enough = float(dev_load.mean()) * (1 + GOOD_ENOUGH)
    while stale < PATIENCE_ROUNDS and best_peak > good_enough and time.perf_counter() < deadline:
        if round_ % 2 == 0:
            order = np.argsort(dev_load, kind="stable")
            pairs = zip(order[::-1][: devices // 2].tolist(), order[: devices // 2].tolist())
        else:
            perm = rng.permutation(devices)
            pairs = zip(perm[0::2].tolist(), perm[1::2].tolist())
        for a, b in pairs:
            resplit(a, b)
            if time.perf_counter() >= deadline:
                break
        # then the slowest devices, each with every partner (lightest first) in turn
        for _ in range(devices):
            worst = int(np.argmax(dev_load))
            partners = np.argsort(dev_load, kind="stable").tolist()
            if not any(resplit(worst, b) for b in partners if b != worst):
                break
            if time.perf_counter() >= deadline:
                break
        round_ += 1
        peak = float(dev_load.max())
        if peak < best_peak - 1e-9 * best_peak:
            best_peak, stale = peak, 0
        else:
            stale += 1
    return tuple(where.tolist())
