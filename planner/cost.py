"""The public cost model: what one shard of a table costs on one device per step.

A cost model is any object with a ``cost(shard, topology) -> ShardCost`` method
(:class:`CostModel`). The planner asks it about every candidate shard and never looks
inside. :class:`AnalyticCostModel` is the default: bytes moved over each tier's
bandwidth. All devices of a :class:`~planner.specs.Topology` are identical, so a
shard's cost does not depend on which device holds it.
"""

from __future__ import annotations

import enum
import importlib
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from planner.errors import PlannerError
from planner.specs import (
    GB,
    DeviceSpec,
    HostSpec,
    NetworkSpec,
    StoreSpec,
    TableSpec,
    Topology,
)

ACTIVATION_BYTES = 4
"""Pooled embeddings and their gradients travel as fp32."""


class Sharding(enum.Enum):
    """How a table is split over devices."""

    TABLE_WISE = "table_wise"
    ROW_WISE = "row_wise"
    COLUMN_WISE = "column_wise"
    TABLE_ROW_WISE = "table_row_wise"
    DATA_PARALLEL = "data_parallel"


class Tier(enum.Enum):
    """Where a shard's rows live."""

    HBM = "hbm"
    """All rows in device memory."""
    DRAM_CACHE = "dram_cache"
    """A device row cache over host DRAM."""
    STORE_CACHE = "store_cache"
    """A device row cache over the zarr store."""


@dataclass(frozen=True, slots=True)
class ShardOption:
    """One shard of a table as the planner proposes it."""

    table: TableSpec
    sharding: Sharding
    rows: int
    """Rows held by this shard."""
    cols: int
    """Columns held by this shard."""
    batch_share: float = 1.0
    """Share of the global batch's lookups of this table that this shard serves."""
    tier: Tier = Tier.HBM
    cache_rows: int = 0
    """Device cache slots (0 for ``Tier.HBM``)."""


@dataclass(frozen=True, slots=True)
class ShardCost:
    """Per-step time of one shard, split as the runtime measures it, and its memory."""

    lookup_ms: float
    communication_ms: float
    backward_ms: float
    optimizer_ms: float
    hbm_bytes: int
    dram_bytes: int = 0

    @property
    def total_ms(self) -> float:
        return self.lookup_ms + self.communication_ms + self.backward_ms + self.optimizer_ms

    def __add__(self, other: "ShardCost") -> "ShardCost":
        return ShardCost(
            self.lookup_ms + other.lookup_ms,
            self.communication_ms + other.communication_ms,
            self.backward_ms + other.backward_ms,
            self.optimizer_ms + other.optimizer_ms,
            self.hbm_bytes + other.hbm_bytes,
            self.dram_bytes + other.dram_bytes,
        )


ZERO_COST = ShardCost(0.0, 0.0, 0.0, 0.0, 0, 0)


@runtime_checkable
class CostModel(Protocol):
    """Prices a shard option. Implement this one method to plug in your own model."""

    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        """Time per training step (ms, split in four parts) and bytes per memory tier."""
        ...


def _ms(num_bytes: float, gbps: float) -> float:
    return num_bytes / (gbps * GB) * 1e3


class AnalyticCostModel:
    """Bytes moved over each tier's bandwidth, from the topology's (datasheet or
    calibrated) numbers.

    - lookup: the shard's share of the global batch's ids, each reading one row slice
      from HBM;
    - communication: the pooled outputs (fp32) sent by all-to-all in the forward pass
      and their gradients in the backward pass; the share leaving the host goes over
      the inter-host network;
    - backward: the row-slice gradients read and written back (sparse scatter-add);
    - optimizer: per-row optimizer state read and written for every looked-up row.
    """

    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        table = shard.table
        lookups = topology.global_batch_size * table.pooling_factor * shard.batch_share
        row_bytes = shard.cols * table.dtype.bytes
        hbm = topology.device.hbm_gbps

        lookup_ms = _ms(lookups * row_bytes, hbm)
        pooled_bytes = topology.global_batch_size * shard.batch_share * shard.cols * ACTIVATION_BYTES
        communication_ms = 2 * self._all_to_all_ms(pooled_bytes, topology)
        backward_ms = _ms(2 * lookups * row_bytes, hbm)
        state_per_row = table.optimizer.state_bytes_per_row(shard.cols)
        optimizer_ms = _ms(2 * lookups * state_per_row, hbm)

        weights = shard.rows * row_bytes
        state = shard.rows * state_per_row
        return ShardCost(
            lookup_ms=lookup_ms,
            communication_ms=communication_ms,
            backward_ms=backward_ms,
            optimizer_ms=optimizer_ms,
            hbm_bytes=weights + state,
        )

    @staticmethod
    def _all_to_all_ms(num_bytes: float, topology: Topology) -> float:
        """Time to send ``num_bytes`` spread evenly over all devices from one device."""
        world = topology.world_size
        same_host = (topology.devices_per_host - 1) / world
        other_hosts = (world - topology.devices_per_host) / world
        return _ms(num_bytes * same_host, topology.network.intra_host_gbps) + _ms(
            num_bytes * other_hosts, topology.network.inter_host_gbps
        )


class CostModelError(PlannerError, TypeError):
    """A user cost model cannot be loaded or gives impossible answers."""


def check_cost_model(model: object) -> CostModel:
    """Call ``model`` on a small fixture and check its answers: a ``ShardCost``, finite
    non-negative times, non-negative integer bytes, more rows costing no less memory.
    Returns the model; raises :class:`CostModelError` naming what is wrong."""
    name = type(model).__name__
    if not callable(getattr(model, "cost", None)):
        raise CostModelError(f"cost model {name} has no method cost(shard, topology)")
    topology = Topology(1, 2, DeviceSpec(1.0, 100.0), HostSpec(8.0, 20.0, 10.0),
                        StoreSpec(1.0, 0.5), NetworkSpec(50.0, 10.0), 128)
    table = TableSpec("fixture", 1000, 8, 2.0)
    small = ShardOption(table, Sharding.TABLE_WISE, 500, 8)
    large = ShardOption(table, Sharding.TABLE_WISE, 1000, 8)
    answers = []
    for shard in (small, large):
        try:
            answer = model.cost(shard, topology)
        except Exception as exc:  # noqa: BLE001 - report any failure of user code
            raise CostModelError(f"cost model {name} failed on a fixture shard: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(answer, ShardCost):
            raise CostModelError(f"cost model {name}.cost must return planner.ShardCost, "
                                 f"got {type(answer).__name__}")
        for part in ("lookup_ms", "communication_ms", "backward_ms", "optimizer_ms"):
            value = getattr(answer, part)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise CostModelError(f"cost model {name}: {part} must be a finite number >= 0 "
                                     f"(milliseconds), got {value!r}")
        for part in ("hbm_bytes", "dram_bytes"):
            value = getattr(answer, part)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CostModelError(f"cost model {name}: {part} must be an integer >= 0 "
                                     f"(bytes), got {value!r}")
        answers.append(answer)
    if answers[1].hbm_bytes + answers[1].dram_bytes < answers[0].hbm_bytes + answers[0].dram_bytes:
        raise CostModelError(f"cost model {name}: a shard of 1000 rows needs less memory than "
                             f"one of 500 rows; check the units")
    return model  # type: ignore[return-value]


def load_cost_model(spec: str) -> CostModel:
    """Import ``module:Class``, instantiate it without arguments and check it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CostModelError(f"cost model {spec!r} must look like module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CostModelError(f"cannot import module {module_name!r} for the cost model: {exc}") from exc
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise CostModelError(f"module {module_name!r} has no attribute {attr!r}") from None
    try:
        model = cls()
    except Exception as exc:  # noqa: BLE001 - report any failure of user code
        raise CostModelError(f"cannot create cost model {spec}: {type(exc).__name__}: {exc}") from exc
    return check_cost_model(model)
