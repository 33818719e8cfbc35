"""The public cost model: what one shard of a table costs on one device per step.

A cost model is any object with a ``cost(shard, topology) -> ShardCost`` method
(:class:`CostModel`). The planner asks it about every candidate shard and never looks
inside. :class:`AnalyticCostModel` is the default: bytes moved over each tier's
bandwidth. All devices of a :class:`~planner.inputs.specs.Topology` are identical, so a
shard's cost does not depend on which device holds it.
"""

from __future__ import annotations

import enum
import importlib
import math
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from planner.errors import PlannerError
from planner.inputs.specs import (
    GB,
    DeviceSpec,
    HostSpec,
    NetworkSpec,
    Optimizer,
    StoreSpec,
    TableSpec,
    Topology,
)

ACTIVATION_BYTES = 4
"""Pooled embeddings and their gradients travel as fp32."""
ID_BYTES = 8
"""Ids travel as int64."""


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
    HOST = "host"
    """All rows (and their optimizer state) in host DRAM, with no device cache: each
    step's looked-up rows are read from host memory and cross the host-to-device link,
    and their updates go back (TorchRec's ``fused_uvm`` kernel)."""


@dataclass(frozen=True, slots=True)
class ShardOption:
    """One shard of a table as the planner proposes it."""

    table: TableSpec
    sharding: Sharding
    rows: int
    """Rows held by this shard."""
    cols: int
    """Columns held by this shard."""
    num_shards: int = 1
    """Shards of this table in the option (this one included)."""
    lookup_share: float = 1.0
    """Share of the table's lookups in the global batch that this shard serves."""
    output_share: float = 1.0
    """Share of the global batch's samples whose pooled output this shard produces
    (partial sums for row-wise shards)."""
    tier: Tier = Tier.HBM
    cache_rows: int = 0
    """Device cache slots (0 for ``Tier.HBM`` and ``Tier.HOST``)."""

    @property
    def hit_rate(self) -> float:
        """Share of this shard's lookups served from HBM."""
        if self.tier is Tier.HBM:
            return 1.0
        if self.tier is Tier.HOST:
            return 0.0
        return self.table.access.hit_rate(self.rows, self.cache_rows)


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


FULL_ROW_COLS = 128
"""Columns of a row that FBGEMM's lookup and update kernels move at full rate: a warp
reads a row as 32 lanes of 4 elements, so a narrower row leaves lanes idle."""
HALF_ROW_PENALTY = 1.15
"""Time factor of gathering or scattering rows of 64 to 127 columns (TorchRec 1.8's
``HALF_BLOCK_PENALTY``, from its empirical studies of FBGEMM's kernels)."""
QUARTER_ROW_PENALTY = 1.75
"""Time factor for rows of fewer than 64 columns (TorchRec 1.8's ``QUARTER_BLOCK_PENALTY``)."""


def row_penalty(cols: int) -> float:
    """Time factor of moving rows of ``cols`` columns against full-width rows (see
    :data:`FULL_ROW_COLS`)."""
    if cols >= FULL_ROW_COLS:
        return 1.0
    return HALF_ROW_PENALTY if cols >= FULL_ROW_COLS // 2 else QUARTER_ROW_PENALTY


LINK_PAYLOAD_BYTES = 256
"""Most payload one PCIe packet (TLP) carries on common platforms (max payload size)."""
LINK_PACKET_OVERHEAD_BYTES = 24
"""Header, sequence number, CRC and framing of one PCIe packet. A bulk copy fills every
packet (the measured ``h2d_gbps`` includes this overhead once per 256 bytes); a gathered
row is its own packets, so a row shorter than a packet pays a whole packet's overhead."""


def link_ms(rows: float, row_bytes: float, gbps: float) -> float:
    """Time for ``rows`` gathered rows of ``row_bytes`` each to cross the host link whose
    bulk-copy rate is ``gbps``: each row takes whole packets (see
    :data:`LINK_PACKET_OVERHEAD_BYTES`), so rows of 32 bytes cross at 63 % of the bulk
    rate, of 64 bytes at 80 %, of whole packets at the bulk rate."""
    packets = math.ceil(row_bytes / LINK_PAYLOAD_BYTES)
    wire = row_bytes + packets * LINK_PACKET_OVERHEAD_BYTES
    bulk = LINK_PAYLOAD_BYTES / (LINK_PAYLOAD_BYTES + LINK_PACKET_OVERHEAD_BYTES)
    return _ms(rows * wire * bulk, gbps)


DEFAULT_COLLECTIVE_LATENCY_US = 10.0
"""Fixed time of one collective (all-to-all or all-reduce) whatever its size, when the
topology gives none: NCCL's small-message latency between GPUs of one host over NVLink
(about 10 us); ``dlrm-plan calibrate`` measures it on the machine's own backend."""
STEP_ALL_TO_ALLS = 4
"""All-to-alls of a training step of this runtime when any table is sharded: the
lengths, the ids and the pooled outputs forward, their gradients backward."""
STEP_ALL_REDUCES = 1
"""All-reduces of a step: one flat buffer of the MLP and data-parallel gradients."""


def collective_latency_ms(topology: Topology, *, all_to_all: bool = True) -> float:
    """Fixed time per step of the step's collectives on ``topology`` (0 on one device).
    The same on every device of every plan of a topology, so the planner leaves it out
    of its objective; step predictions add it."""
    if topology.world_size == 1:
        return 0.0
    latency = topology.network.collective_latency_us
    if latency is None:
        latency = DEFAULT_COLLECTIVE_LATENCY_US
    count = STEP_ALL_REDUCES + (STEP_ALL_TO_ALLS if all_to_all else 0)
    return count * latency * 1e-3


CACHE_INDEX_BYTES_PER_SLOT = 16
"""Device memory per cache slot besides the row: the slot's row id (``lxu_cache_state``,
int64) and its LRU/LFU stamp (``lxu_state``, int64), as FBGEMM's cached
split-table-batched embedding allocates them."""
CACHE_MAP_BYTES_PER_ROW = 4
"""Device memory per row of a cached shard, cached or not: FBGEMM's
``cache_index_table_map`` (int32 per row of the table on the device; 160 MB for a
40 M-row shard)."""
CACHE_LOCATION_BYTES_PER_ID = 4
"""Device memory per looked-up id of a cached shard: FBGEMM's ``lxu_cache_locations``
(int32 per index of the step's batch, the slot each id was found in)."""
ROW_SPLIT_SHARDINGS = (Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE, Sharding.DATA_PARALLEL)
"""Shardings whose shards each receive 1 / num_shards of the table's ids on average
(row-wise buckets, data-parallel local batches); others receive every id."""


def _pooled_bytes(shard: ShardOption, topology: Topology) -> float:
    """Bytes of the pooled outputs (fp32) a shard produces per step."""
    return topology.global_batch_size * shard.output_share * shard.cols * ACTIVATION_BYTES


def buffer_bytes(shard: ShardOption, topology: Topology) -> int:
    """Device memory of a shard's per-step buffers at the plan's batch, as TorchRec
    reserves them (``calculate_shard_storages``' input and output sizes): the ids it
    receives (int64; a row-wise shard's buffer holds the mean share of the ids, not its
    rows' share, since the ids of a batch are bucketed unevenly) and its pooled outputs
    (fp32, at least TorchRec's size for any table dtype)."""
    table = shard.table
    ids = topology.global_batch_size * table.pooling_factor
    if shard.sharding in ROW_SPLIT_SHARDINGS:
        ids /= shard.num_shards
    return math.ceil(ids * ID_BYTES) + math.ceil(_pooled_bytes(shard, topology))


def cache_state_bytes(shard: ShardOption, lookups: float) -> int:
    """Device memory of a cached shard's bookkeeping besides the cached rows: slot
    state per slot, the index map per row and a slot location per looked-up id."""
    return (shard.cache_rows * CACHE_INDEX_BYTES_PER_SLOT + shard.rows * CACHE_MAP_BYTES_PER_ROW
            + math.ceil(lookups * CACHE_LOCATION_BYTES_PER_ID))


class AnalyticCostModel:
    """Bytes moved over each tier's bandwidth, from the topology's (datasheet or
    calibrated) numbers.

    Memory per shard, per tier, as FBGEMM and TorchRec allocate it (never below
    TorchRec 1.8's ``EmbeddingStorageEstimator`` for the same shard):

    - every tier, HBM: the step's buffers (:func:`buffer_bytes`: the ids received,
      int64, and the pooled outputs, fp32; TorchRec's ``_calculate_shard_io_sizes``);
    - ``hbm``, HBM: the rows and their optimizer state (``weights_dev`` and the
      momentum tensors of FBGEMM's fused kernel);
    - ``dram_cache``/``store_cache``, HBM: the cached rows with their optimizer state
      (``lxu_cache_weights``), 16 bytes of slot state per slot (``lxu_cache_state``,
      ``lxu_state``), 4 bytes per row of the shard (``cache_index_table_map``) and 4
      per looked-up id (``lxu_cache_locations``) (:func:`cache_state_bytes`); DRAM
      (``dram_cache`` only): all rows and their state in host memory
      (``weights_uvm``);
    - ``host``, HBM: a staging row slice per looked-up id (at most the shard's rows);
      DRAM: all rows and their state (``weights_uvm``, TorchRec's ``fused_uvm``).

    Time per shard, each term with its reason:

    - lookup: the shard's looked-up row slices read from HBM (hits) or fetched from
      host DRAM over the host-to-device link or from the store (misses, at the
      table's access-profile hit rate for the cache size); the ids read and the
      pooled outputs written (the kernel reads every index and writes every bag);
    - narrow rows: row slices of fewer than 128 columns move slower per byte (x 1.15
      from 64 columns, x 1.75 below: :func:`row_penalty`, TorchRec's block-usage
      penalty), in the lookup and in backward;
    - the host link: a gathered row crosses in whole PCIe packets (:func:`link_ms`:
      a row shorter than a packet pays a packet's header), for cache misses, their
      write-backs and host-tier rows;
    - communication: the ids (int64) a shard serves and its pooled outputs (fp32)
      sent by all-to-all forward, the output gradients backward, the share leaving the
      host over the inter-host network; data-parallel tables instead all-reduce their
      dense gradient (the whole table, with the runtime's flag column of touched
      rows), within a host over the intra-host links and, across hosts, 1/L of it
      per device over the inter-host links (:meth:`_all_reduce_ms`);
    - backward: the output gradients and ids read, the row-slice gradients read and
      written back (sparse scatter-add), plus the write-back of evicted dirty rows for
      cached shards; a data-parallel replica instead writes and scans its dense
      gradient and applies the global batch's rows (every replica updates every row
      any replica touched);
    - optimizer: per-row optimizer state read and written for every looked-up row
      (for a replica, every row of the global batch);
    - a host-tier shard (:attr:`Tier.HOST`) keeps its rows and optimizer state in host
      DRAM: every looked-up row slice is read from DRAM and crosses the host-to-device
      link (at the slower of ``host.dram_gbps`` and ``host.h2d_gbps``) and is pooled on
      the device; backward its row-slice gradients are formed on the device as for an
      HBM shard and the update reads each row over the link and writes it back (two
      crossings, as FBGEMM's ``fused_uvm`` kernel updates rows in host memory); the
      optimizer's state crosses with its rows (counted no faster than HBM, so that a
      host shard never costs less than its HBM twin: the planner's HBM-first search
      relies on it). Its HBM bytes are the step's staging buffer (one row slice per
      looked-up id, at most the shard's rows); its DRAM bytes are its rows and
      optimizer state, charged to its device's host;
    - per-collective latency (``network.collective_latency_us``, a datasheet default
      that ``dlrm-plan calibrate`` replaces) is the same on every device of a
      topology: step predictions add it (:func:`collective_latency_ms`), shard costs
      do not;
    - fixed costs, when the topology carries measured ones (``dlrm-plan calibrate``):
      ``device.shard_overhead_ms`` per shard; for a cached shard,
      ``device.cache_shard_overhead_ms``, ``device.cache_ns_per_lookup`` per looked-up
      id, ``device.cache_ns_per_miss`` per miss (fetch, install, eviction and
      write-back bookkeeping beyond the bytes) and ``device.cache_ns_per_overflow_row``
      per row of a step that finds no slot (the expected distinct rows of the step's
      lookups, from the access profile, beyond the cache's slots); all charged to the
      lookup; for an in-memory shard whose optimizer keeps state,
      ``device.optimizer_ns_per_id`` per looked-up id (summing the gradients of
      repeated rows), charged to the optimizer.
    """

    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        table = shard.table
        lookups = topology.global_batch_size * table.pooling_factor * shard.lookup_share
        row_bytes = shard.cols * table.dtype.bytes
        state_per_row = table.optimizer.state_bytes_per_row(shard.cols)
        hbm_gbps = topology.device.hbm_gbps
        # rows move at a narrow row's penalty; ids are read and pooled outputs written
        # forward, and both read again backward
        rows_moved = lookups * row_bytes * row_penalty(shard.cols)
        io_ms = _ms(lookups * ID_BYTES + _pooled_bytes(shard, topology), hbm_gbps)

        if shard.tier is Tier.HOST:
            return self._host_cost(shard, topology, lookups, row_bytes, rows_moved, io_ms,
                                   state_per_row)

        hits = lookups * shard.hit_rate
        misses = lookups - hits
        if shard.tier is Tier.DRAM_CACHE:
            link_gbps = min(topology.host.h2d_gbps, topology.host.dram_gbps)
            fetch_ms = link_ms(misses, row_bytes + state_per_row, link_gbps)
            write_back_ms = fetch_ms
        elif shard.tier is Tier.STORE_CACHE:
            miss_bytes = misses * (row_bytes + state_per_row)
            fetch_ms = _ms(miss_bytes, topology.store.read_gbps)
            write_back_ms = _ms(miss_bytes, topology.store.write_gbps)
        else:
            fetch_ms = write_back_ms = 0.0

        device = topology.device
        lookup_ms = _ms(rows_moved, hbm_gbps) + io_ms + fetch_ms + device.shard_overhead_ms
        if shard.tier is not Tier.HBM:
            lookup_ms += (device.cache_shard_overhead_ms + 1e-6 * (
                lookups * device.cache_ns_per_lookup + misses * device.cache_ns_per_miss))
            if device.cache_ns_per_overflow_row:
                distinct = table.access.expected_distinct(shard.rows, lookups)
                overflow = max(0.0, distinct - shard.cache_rows)
                lookup_ms += 1e-6 * overflow * device.cache_ns_per_overflow_row
        if shard.sharding is Sharding.DATA_PARALLEL:
            backward_ms, optimizer_ms = self._replica_update_ms(shard, topology, io_ms,
                                                                row_bytes, state_per_row)
        else:
            backward_ms = _ms(2 * rows_moved, hbm_gbps) + io_ms + write_back_ms
            optimizer_ms = _ms(2 * lookups * state_per_row, hbm_gbps)
            if shard.tier is Tier.HBM and table.optimizer is not Optimizer.SGD:
                optimizer_ms += 1e-6 * lookups * device.optimizer_ns_per_id
        communication_ms = self._communication_ms(shard, topology, lookups)

        resident_rows = shard.rows if shard.tier is Tier.HBM else shard.cache_rows
        hbm_bytes = resident_rows * (row_bytes + state_per_row) + buffer_bytes(shard, topology)
        if shard.tier is not Tier.HBM:
            hbm_bytes += cache_state_bytes(shard, lookups)
        dram_bytes = shard.rows * (row_bytes + state_per_row) if shard.tier is Tier.DRAM_CACHE else 0
        return ShardCost(lookup_ms, communication_ms, backward_ms, optimizer_ms,
                         int(hbm_bytes), int(dram_bytes))

    @staticmethod
    def _replica_update_ms(shard: ShardOption, topology: Topology, io_ms: float,
                           row_bytes: int, state_per_row: int) -> tuple[float, float]:
        """Backward and optimizer of a data-parallel replica: its local gradients go into
        a dense gradient of the whole table (with a flag column of touched rows), written
        zeroed and scanned after the all-reduce, and every replica then updates every row
        the global batch touched, its row and its optimizer state."""
        table = shard.table
        hbm_gbps = topology.device.hbm_gbps
        batch_lookups = topology.global_batch_size * table.pooling_factor
        dense = shard.rows * (shard.cols + 1) * ACTIVATION_BYTES
        backward_ms = (_ms(2 * batch_lookups * row_bytes * row_penalty(shard.cols), hbm_gbps)
                       + _ms(2 * dense, hbm_gbps) + io_ms)
        optimizer_ms = _ms(2 * batch_lookups * state_per_row, hbm_gbps)
        if table.optimizer is not Optimizer.SGD:
            optimizer_ms += 1e-6 * batch_lookups * topology.device.optimizer_ns_per_id
        return backward_ms, optimizer_ms

    def _host_cost(self, shard: ShardOption, topology: Topology, lookups: float,
                   row_bytes: int, rows_moved: float, io_ms: float,
                   state_per_row: int) -> ShardCost:
        """A :attr:`Tier.HOST` shard (see the class docstring)."""
        host, device = topology.host, topology.device
        link_gbps = min(host.h2d_gbps, host.dram_gbps)
        crossing_ms = link_ms(lookups, row_bytes, link_gbps)
        lookup_ms = crossing_ms + _ms(rows_moved, device.hbm_gbps) + io_ms + device.shard_overhead_ms
        # the update reads each row over the link and writes it back
        backward_ms = _ms(2 * rows_moved, device.hbm_gbps) + io_ms + 2 * crossing_ms
        optimizer_ms = _ms(2 * lookups * state_per_row, min(link_gbps, device.hbm_gbps))
        if shard.table.optimizer is not Optimizer.SGD:
            optimizer_ms += 1e-6 * lookups * device.optimizer_ns_per_id
        hbm_bytes = (math.ceil(min(float(shard.rows), lookups)) * row_bytes
                     + buffer_bytes(shard, topology))
        dram_bytes = shard.rows * (row_bytes + state_per_row)
        return ShardCost(lookup_ms, self._communication_ms(shard, topology, lookups), backward_ms,
                         optimizer_ms, int(hbm_bytes), int(dram_bytes))

    def _communication_ms(self, shard: ShardOption, topology: Topology, lookups: float) -> float:
        """All-to-all of ids and pooled outputs, or a data-parallel table's all-reduce."""
        if shard.sharding is Sharding.DATA_PARALLEL:
            return self._all_reduce_ms(shard.rows * (shard.cols + 1) * ACTIVATION_BYTES,
                                       topology)
        pooled = _pooled_bytes(shard, topology)
        return self._all_to_all_ms(2 * pooled + lookups * ID_BYTES, topology)

    @staticmethod
    def _all_to_all_ms(num_bytes: float, topology: Topology) -> float:
        """Time to send ``num_bytes`` spread evenly over all devices from one device."""
        world = topology.world_size
        same_host = (topology.devices_per_host - 1) / world
        other_hosts = (world - topology.devices_per_host) / world
        return _ms(num_bytes * same_host, topology.network.intra_host_gbps) + _ms(
            num_bytes * other_hosts, topology.network.inter_host_gbps
        )

    @staticmethod
    def _all_reduce_ms(num_bytes: float, topology: Topology) -> float:
        """Hierarchical all-reduce, as NCCL's rings with one channel per device's
        network link run it: within a host each device sends and receives 2 (L-1)/L of
        the bytes over the intra-host links; across H hosts each device carries 1/L of
        the bytes, 2 (H-1)/H of that over its inter-host link."""
        per_host, hosts = topology.devices_per_host, topology.hosts
        network = topology.network
        intra = _ms(2 * num_bytes * (per_host - 1) / per_host, network.intra_host_gbps)
        inter = _ms(2 * num_bytes / per_host * (hosts - 1) / hosts, network.inter_host_gbps)
        return intra + inter


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
    # The planner searches HBM options first and relies on these to bound plans.
    cached = model.cost(replace(large, tier=Tier.DRAM_CACHE, cache_rows=100), topology)
    if not isinstance(cached, ShardCost) or cached.total_ms < answers[1].total_ms:
        raise CostModelError(f"cost model {name}: a shard cached over DRAM is faster than the "
                             f"same shard in HBM; the planner assumes caching never speeds up")
    hosted = model.cost(replace(large, tier=Tier.HOST), topology)
    if not isinstance(hosted, ShardCost) or hosted.total_ms < answers[1].total_ms:
        raise CostModelError(f"cost model {name}: a shard in the host tier is faster than the "
                             f"same shard in HBM; the planner assumes host memory never speeds "
                             f"up")
    return model  # type: ignore[return-value]


FORMER_MODULES = {"planner.cost": "planner"}
"""Where the planner's own cost models were named before the planner's sub-packages:
plan files and scripts written then say ``planner.cost:AnalyticCostModel``."""


NAMED_MODELS = {
    "analytic": "planner:AnalyticCostModel",
    "torchrec": "planner:TorchRecCostModel",
}
"""Short names of the planner's own models (``--cost-model torchrec``)."""


def load_cost_model(spec: str) -> CostModel:
    """Import ``module:Class`` (or a name of :data:`NAMED_MODELS`), instantiate it
    without arguments and check it."""
    spec = NAMED_MODELS.get(spec, spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CostModelError(f"cost model {spec!r} must look like module:Class or be one of "
                             f"{', '.join(NAMED_MODELS)}")
    module_name = FORMER_MODULES.get(module_name, module_name)
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
