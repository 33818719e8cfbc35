"""Greedy baselines: whole tables onto devices by a sort key and a device rule.

Their tier rule is the common convention: a table goes to HBM if it fits on the
chosen device, else to a device cache over host DRAM holding 20 % of its rows.
They write the same plan file as the ILP, costed by the same model, and warm-start it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from planner.inputs.cost import CostModel, ShardOption, Sharding, Tier
from planner.inputs.specs import GB, TablesSpec, TableSpec, Topology
from planner.search.options import Placement, TableOption

BASELINES = ("random", "size", "lookup", "size-lookup", "greedy")
CACHE_FRACTION = 0.2


@dataclass(frozen=True, slots=True)
class BaselineMiss:
    """A baseline that found no device for a table: the table, the memory that binds
    and how many bytes more the emptiest device would need to take it."""

    table: str
    placed: int
    """Tables placed before it."""
    hbm: bool
    """Whether HBM binds (else host DRAM)."""
    shortfall_bytes: int


@dataclass(frozen=True, slots=True)
class BaselineResult:
    name: str
    options: tuple[TableOption, ...]
    devices: tuple[int, ...]
    """Device of each table's single shard."""


def _whole_table(table: TableSpec, topology: Topology, model: CostModel, tier: Tier) -> TableOption:
    rows, dim = table.num_embeddings, table.embedding_dim
    cache = 0 if tier is Tier.HBM else max(1, math.ceil(rows * CACHE_FRACTION))
    shard = ShardOption(table, Sharding.TABLE_WISE, rows, dim, tier=tier, cache_rows=cache)
    return TableOption(table, Sharding.TABLE_WISE, tier,
                       1.0 if tier is Tier.HBM else CACHE_FRACTION, Placement.FREE,
                       ((0, rows),), ((0, dim),), (((rows, dim), 1, cache, model.cost(shard, topology)),))


def run_baseline(name: str, tables: TablesSpec, topology: Topology, model: CostModel,
                 seed: int = 0) -> BaselineResult | BaselineMiss:
    """Place every table whole by baseline ``name``; a :class:`BaselineMiss` when some
    table fits on no device in either tier."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    hbm_opts = [_whole_table(t, topology, model, Tier.HBM) for t in tables.tables]
    cache_opts = [_whole_table(t, topology, model, Tier.DRAM_CACHE) for t in tables.tables]
    world = topology.world_size
    hbm_cap = topology.usable_hbm_bytes
    dram_cap = int(topology.host.dram_gb * GB)
    host_of = np.arange(world) // topology.devices_per_host
    hbm = np.zeros(world, dtype=np.int64)
    dram = np.zeros(topology.hosts, dtype=np.int64)
    score = np.zeros(world)  # what the device rule balances
    rng = random.Random(seed)

    keys: dict[str, Callable[[int], float]] = {
        "random": lambda i: 0.0,
        "size": lambda i: tables.tables[i].weight_bytes,
        "lookup": lambda i: tables.tables[i].embedding_dim * tables.tables[i].pooling_factor,
        "size-lookup": lambda i: (tables.tables[i].embedding_dim * tables.tables[i].pooling_factor
                                  * math.log10(max(tables.tables[i].num_embeddings, 2))),
        "greedy": lambda i: hbm_opts[i].total_ms,
    }
    key = keys[name]
    order = list(range(len(tables.tables)))
    if name == "random":
        rng.shuffle(order)
    else:
        order.sort(key=lambda i: (-key(i), i))

    chosen: list[TableOption | None] = [None] * len(order)
    devices = [-1] * len(order)
    for placed, i in enumerate(order):
        for option in (hbm_opts[i], cache_opts[i]):
            cost = option.shards[0].cost
            fits = (hbm + cost.hbm_bytes <= hbm_cap) & (dram[host_of] + cost.dram_bytes <= dram_cap)
            if fits.any():
                break
        else:
            return _miss(tables.tables[i].name, placed, (hbm_opts[i], cache_opts[i]),
                         hbm_cap - hbm, dram_cap - dram[host_of])
        candidates = np.flatnonzero(fits)
        if name == "random":
            device = int(rng.choice(candidates.tolist()))
        elif name == "size":
            device = int(candidates[np.argmin(hbm[candidates])])  # most free HBM
        else:
            device = int(candidates[np.argmin(score[candidates])])
        hbm[device] += cost.hbm_bytes
        dram[host_of[device]] += cost.dram_bytes
        score[device] += cost.total_ms if name == "greedy" else key(i)
        chosen[i], devices[i] = option, device
    return BaselineResult(name, tuple(o for o in chosen if o is not None), tuple(devices))


def _miss(table: str, placed: int, options: tuple[TableOption, ...], free_hbm: np.ndarray,
          free_dram: np.ndarray) -> BaselineMiss:
    """The smallest shortfall over the table's options (HBM, then cache) and devices."""
    misses = []
    for option in options:
        cost = option.shards[0].cost
        hbm_short = np.maximum(cost.hbm_bytes - free_hbm, 0)
        dram_short = np.maximum(cost.dram_bytes - free_dram, 0)
        device = int(np.argmin(hbm_short + dram_short))
        misses.append((int(hbm_short[device] + dram_short[device]),
                       bool(hbm_short[device] >= dram_short[device])))
    short, binds_hbm = min(misses, key=lambda m: m[0])
    return BaselineMiss(table, placed, binds_hbm, max(1, short))
