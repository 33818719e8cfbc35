"""Candidate sharding options per table, each priced shard by shard by the cost model.

An option fixes a table's sharding type, the tier of its shards (HBM, a device cache
of a given size over DRAM or the store, or host DRAM read over the host link with no
device cache) and how its shards may be placed:
anywhere (table-wise, column-wise), one shard per device (row-wise over all devices,
data-parallel), or one shard per device of a single host (table-row-wise).
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from planner.inputs.cost import CostModel, ShardCost, Sharding, ShardOption, Tier
from planner.inputs.specs import TableSpec, Topology


class Placement(enum.Enum):
    FREE = "free"
    """Each shard may go to any device."""
    EVERY_DEVICE = "every_device"
    """Shard i lives on device i (row-wise over all devices, data-parallel)."""
    ONE_HOST = "one_host"
    """Shard i lives on device i of one host, the host chosen by placement."""


@dataclass(frozen=True, slots=True)
class OptionSettings:
    """Which options to generate."""

    shardings: frozenset[Sharding] = frozenset(Sharding)
    tiers: frozenset[Tier] = frozenset(Tier)
    cache_fractions: tuple[float, ...] = (0.01, 0.05, 0.2, 0.5)
    """Device cache sizes as shares of the shard's rows."""
    column_shards: tuple[int, ...] = (2, 4, 8)
    """Column-wise shard counts to try."""
    min_column_width: int = 16
    """No column shard narrower than this (narrow shards waste the id exchange)."""
    data_parallel_max_bytes: int = 64 * 1024 * 1024
    """Replicate only tables whose weights are at most this large."""
    max_shards: int | None = None
    """No option with more shards than this."""


@dataclass(frozen=True, slots=True)
class ShardSlot:
    """A shard of an option: its row and column range and its predicted cost."""

    row_start: int
    row_end: int
    col_start: int
    col_end: int
    tier: Tier
    cache_rows: int
    cost: ShardCost


@dataclass(frozen=True, slots=True)
class TableOption:
    """One way to shard and store a table.

    Shards are described compactly (row ranges x column ranges, each shape priced
    once) and materialised by :attr:`shards` only for the options a plan uses.
    """

    table: TableSpec
    sharding: Sharding
    tier: Tier
    cache_fraction: float
    """Device cache size as a share of each shard's rows (1 for ``hbm``, 0 for ``host``)."""
    placement: Placement
    row_ranges: tuple[tuple[int, int], ...]
    col_ranges: tuple[tuple[int, int], ...]
    priced: tuple[tuple[tuple[int, int], int, int, ShardCost], ...]
    """Per distinct shard shape (rows, cols): how many shards have it, their cache
    rows and cost."""
    total_ms: float = field(init=False)
    max_shard_ms: float = field(init=False)
    hbm_bytes: int = field(init=False)
    max_shard_hbm_bytes: int = field(init=False)
    dram_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        weighted = [(count, cost) for _, count, _, cost in self.priced]
        set_ = object.__setattr__
        set_(self, "total_ms", sum(n * cost.total_ms for n, cost in weighted))
        set_(self, "max_shard_ms", max(cost.total_ms for _, cost in weighted))
        set_(self, "hbm_bytes", sum(n * cost.hbm_bytes for n, cost in weighted))
        set_(self, "max_shard_hbm_bytes", max(cost.hbm_bytes for _, cost in weighted))
        set_(self, "dram_bytes", sum(n * cost.dram_bytes for n, cost in weighted))

    @property
    def num_shards(self) -> int:
        return len(self.row_ranges) * len(self.col_ranges)

    @property
    def shards(self) -> tuple[ShardSlot, ...]:
        """Every shard, row-major over (row range, column range)."""
        by_shape = {shape: (cache, cost) for shape, _, cache, cost in self.priced}
        out = []
        for r0, r1 in self.row_ranges:
            for c0, c1 in self.col_ranges:
                cache, cost = by_shape[(r1 - r0, c1 - c0)]
                out.append(ShardSlot(r0, r1, c0, c1, self.tier, cache, cost))
        return tuple(out)

    @property
    def label(self) -> str:
        tier = self.tier.value
        if self.tier in CACHED_TIERS:
            tier += f"@{self.cache_fraction:g}"
        return f"{self.sharding.value}x{self.num_shards}/{tier}"

    def dominates(self, other: "TableOption") -> bool:
        """No worse on every figure the planner uses, and placed the same way."""
        return (
            self.total_ms <= other.total_ms
            and self.max_shard_ms <= other.max_shard_ms
            and self.hbm_bytes <= other.hbm_bytes
            and self.max_shard_hbm_bytes <= other.max_shard_hbm_bytes
            and self.dram_bytes <= other.dram_bytes
            and self.placement is other.placement
            and self.num_shards == other.num_shards
        )


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(total)`` into ``parts`` contiguous near-equal ranges."""
    if parts > 64 and total * parts < 2**62:  # numpy for row-wise over many devices
        bounds = (np.arange(parts + 1, dtype=np.int64) * total // parts).tolist()
    else:
        bounds = [total * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _split_lengths(total: int, parts: int) -> Counter[int]:
    """How many ranges of :func:`_split` ``(total, parts)`` have each length: the
    ``total % parts`` longer ones one row longer than the rest."""
    q, r = divmod(total, parts)
    return Counter({n: k for n, k in ((q + 1, r), (q, parts - r)) if k})


CACHED_TIERS = (Tier.DRAM_CACHE, Tier.STORE_CACHE)
"""Tiers whose shards keep a device row cache (sized by ``cache_fractions``)."""


def _tiers(settings: OptionSettings) -> list[tuple[Tier, float]]:
    """Every (tier, cache fraction) to price: ``hbm`` whole, each cached tier at every
    cache size, ``host`` without a cache."""
    out: list[tuple[Tier, float]] = []
    if Tier.HBM in settings.tiers:
        out.append((Tier.HBM, 1.0))
    for tier in CACHED_TIERS:
        if tier in settings.tiers:
            out.extend((tier, f) for f in settings.cache_fractions)
    if Tier.HOST in settings.tiers:
        out.append((Tier.HOST, 0.0))
    return out


def table_options(
    table: TableSpec,
    topology: Topology,
    model: CostModel,
    settings: OptionSettings = OptionSettings(),
    capacity_bytes: int | None = None,
) -> list[TableOption]:
    """Every option of ``table`` whose every shard fits one device's usable HBM,
    with dominated options removed. Empty when nothing fits."""
    capacity = topology.usable_hbm_bytes if capacity_bytes is None else capacity_bytes
    world, per_host = topology.world_size, topology.devices_per_host
    layouts: list[tuple[Sharding, Placement, list[tuple[int, int]], list[tuple[int, int]], float, float]] = []
    rows, dim = table.num_embeddings, table.embedding_dim
    allowed = settings.shardings
    if Sharding.TABLE_WISE in allowed:
        layouts.append((Sharding.TABLE_WISE, Placement.FREE, [(0, rows)], [(0, dim)], 1.0, 1.0))
    if Sharding.ROW_WISE in allowed and world > 1 and rows >= world:
        layouts.append((Sharding.ROW_WISE, Placement.EVERY_DEVICE, _split(rows, world), [(0, dim)],
                        1.0 / world, 1.0))
    if Sharding.TABLE_ROW_WISE in allowed and topology.hosts > 1 and per_host > 1 and rows >= per_host:
        layouts.append((Sharding.TABLE_ROW_WISE, Placement.ONE_HOST, _split(rows, per_host),
                        [(0, dim)], 1.0 / per_host, 1.0))
    if Sharding.COLUMN_WISE in allowed:
        for k in settings.column_shards:
            if k <= world and dim // k >= settings.min_column_width and dim % k == 0:
                layouts.append((Sharding.COLUMN_WISE, Placement.FREE, [(0, rows)], _split(dim, k),
                                1.0, 1.0))
    if (Sharding.DATA_PARALLEL in allowed and world > 1 and Tier.HBM in settings.tiers
            and table.weight_bytes <= settings.data_parallel_max_bytes):
        layouts.append((Sharding.DATA_PARALLEL, Placement.EVERY_DEVICE, [(0, rows)] * world,
                        [(0, dim)], 1.0 / world, 1.0 / world))

    options: list[TableOption] = []
    for sharding, placement, row_ranges, col_ranges, lookup_share, output_share in layouts:
        tiers = [(Tier.HBM, 1.0)] if sharding is Sharding.DATA_PARALLEL else _tiers(settings)
        count = len(row_ranges) * len(col_ranges)
        # Every layout's ranges are _split ones, or (data-parallel) repeats of all rows.
        row_lengths = (Counter({rows: len(row_ranges)}) if sharding is Sharding.DATA_PARALLEL
                       else _split_lengths(rows, len(row_ranges)))
        shapes = sorted(((r, c), nr * nc) for r, nr in row_lengths.items()
                        for c, nc in _split_lengths(dim, len(col_ranges)).items())
        for tier, fraction in tiers:
            priced = []
            for (rows_, cols_), number in shapes:
                cache = max(1, math.ceil(rows_ * fraction)) if tier in CACHED_TIERS else 0
                shard = ShardOption(table, sharding, rows_, cols_, count, lookup_share,
                                    output_share, tier, cache)
                priced.append(((rows_, cols_), number, cache, model.cost(shard, topology)))
            option = TableOption(table, sharding, tier, fraction, placement, tuple(row_ranges),
                                 tuple(col_ranges), tuple(priced))
            if option.max_shard_hbm_bytes <= capacity and (
                    settings.max_shards is None or count <= settings.max_shards):
                options.append(option)
    return prune_dominated(options)


def prune_dominated(options: Sequence[TableOption]) -> list[TableOption]:
    """Drop every option that another one dominates (the first of equals is kept)."""
    kept: list[TableOption] = []
    for option in sorted(options, key=lambda o: (o.total_ms, o.hbm_bytes, o.max_shard_ms)):
        if not any(other.dominates(option) for other in kept):
            kept.append(option)
    return kept
