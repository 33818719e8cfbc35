"""TorchRec's own cost model behind our :class:`~planner.inputs.cost.CostModel` door.

:class:`TorchRecCostModel` prices a shard with TorchRec 1.8's
``EmbeddingPerfEstimator`` and ``EmbeddingStorageEstimator``: it asks TorchRec's
enumerator once per table for the table's sharding options (on the meta device, so
no memory is allocated), then gives an option the shard layout of ours and lets
TorchRec's estimators fill in its time and storage. Planning with it therefore
optimises the very figures TorchRec's planner minimises, so the two planners can be
compared on TorchRec's own ground (``dlrm-plan plan --cost-model torchrec``).

Only this module's methods import torch and torchrec, on first use: ``import planner``
and planning with the default model stay free of them. TorchRec's figures are kept
as they are: its per-rank batch and pooling factors, its default cache statistics
(it does not read our access profiles) and no optimizer state for tables whose
module carries no fused optimizer (what a meta-device module gives it).

Mapping of TorchRec's ``Perf`` onto :class:`ShardCost`: ``lookup_ms`` = forward
compute + prefetch compute, ``communication_ms`` = forward + backward comms,
``backward_ms`` = backward compute, ``optimizer_ms`` = 0 (TorchRec folds the fused
optimizer into backward); their sum is ``Perf.total``. ``hbm_bytes``/``dram_bytes``
are ``Storage.hbm``/``Storage.ddr``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from planner.inputs.cost import CostModelError, ShardCost, ShardOption, Sharding, Tier
from planner.inputs.specs import GB, AccessProfile, DType, TableSpec, Topology

PRICED_NAME = "table"
"""TorchRec prices a table by its rows, dimension, data type and pooling factor; its
name (a constraint key) and our access profile do not enter. Shards are priced on
the table renamed to this, without a profile, so that tables of one shape share
their estimates."""


def priced_table(table: TableSpec) -> TableSpec:
    """``table`` as far as TorchRec's estimators see it (see :data:`PRICED_NAME`)."""
    return replace(table, name=PRICED_NAME, access=AccessProfile())

FUSED, CACHING, UVM, DENSE = "fused", "fused_uvm_caching", "fused_uvm", "dense"
"""TorchRec compute kernels this toolkit plans."""

KERNEL_OF_TIER = {Tier.HBM: FUSED, Tier.DRAM_CACHE: CACHING, Tier.STORE_CACHE: CACHING,
                  Tier.HOST: UVM}
"""TorchRec compute kernel of each tier (data-parallel tables use ``dense``)."""

SHARDING_TYPES = tuple(s.value for s in Sharding)
"""Our sharding types have TorchRec's names."""


def torchrec_kernel(shard: ShardOption) -> str:
    """The TorchRec compute kernel that runs ``shard``."""
    return DENSE if shard.sharding is Sharding.DATA_PARALLEL else KERNEL_OF_TIER[shard.tier]


def torchrec_topology(topology: Topology) -> Any:
    """A TorchRec ``Topology`` of ``topology``: same world and local world size, our
    usable HBM as its HBM cap, the host's DRAM shared by its devices, our bandwidths
    (GB/s turned into TorchRec's bytes per ms). Needs torchrec."""
    from torchrec.distributed.planner import Topology as TorchRecTopology

    per_ms = GB / 1000
    return TorchRecTopology(
        world_size=topology.world_size,
        compute_device="cuda",
        hbm_cap=topology.usable_hbm_bytes,
        ddr_cap=int(topology.host.dram_gb * GB) // topology.devices_per_host,
        local_world_size=topology.devices_per_host,
        hbm_mem_bw=topology.device.hbm_gbps * per_ms,
        ddr_mem_bw=topology.host.dram_gbps * per_ms,
        hbm_to_ddr_mem_bw=topology.host.h2d_gbps * per_ms,
        intra_host_bw=topology.network.intra_host_gbps * per_ms,
        inter_host_bw=topology.network.inter_host_gbps * per_ms,
    )


def torchrec_data_type(dtype: DType) -> Any:
    """TorchRec's ``DataType`` of a table dtype."""
    from torchrec.modules.embedding_configs import DataType

    return {DType.FP32: DataType.FP32, DType.FP16: DataType.FP16,
            DType.BF16: DataType.BF16}[dtype]


def _import_torchrec() -> None:
    """Import TorchRec's planner, or raise :class:`CostModelError` naming the extra."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchrec.distributed.planner  # noqa: F401
    except ImportError as exc:
        raise CostModelError(f"the torchrec cost model needs torchrec ({exc}); run "
                             f"`make install-torchrec`, or plan with the default model") from exc


@contextmanager
def _memoized_scans(memo: dict) -> Iterator[None]:
    """While TorchRec prices shards, memoize its scans for annotated methods.

    TorchRec 1.8's estimator looks up its hardware config's custom and coefficient
    methods by scanning ``dir(config)`` about 50 times per shard priced: two thirds of
    its time. Which attribute carries an annotation is a property of the config's
    class, so within this block the two scanning functions remember, per class,
    annotation and sharding type, the attribute's name they found, and answer with that
    attribute of the config at hand. The originals are put back on exit."""
    from torchrec.distributed.planner.estimator import annotations

    originals = (annotations._get_annotated_method, annotations._get_coefficient_method)

    def memoized(scan: Callable[..., Any]) -> Callable[..., Any]:
        def lookup(config: Any, attr: str, sharding_type: str | None = None) -> Any:
            key = (scan.__name__, type(config), attr, sharding_type)
            if key not in memo:
                found = scan(config, attr, sharding_type)
                memo[key] = None if found is None else next(
                    n for n in dir(config) if getattr(config, n, None) == found)
            name = memo[key]
            return None if name is None else getattr(config, name)
        return lookup

    annotations._get_annotated_method, annotations._get_coefficient_method = (
        memoized(originals[0]), memoized(originals[1]))
    try:
        yield
    finally:
        annotations._get_annotated_method, annotations._get_coefficient_method = originals


class _TableEstimates:
    """TorchRec's enumerator and sharding options for one table on one topology."""

    __slots__ = ("enumerator", "options")

    def __init__(self, table: TableSpec, topology: Topology, scans: dict) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
            from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
            from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
            from torchrec.distributed.planner.shard_estimators import (
                EmbeddingPerfEstimator,
                EmbeddingStorageEstimator,
            )
            from torchrec.distributed.planner.types import ParameterConstraints

            trec_topology = torchrec_topology(topology)
            constraints = {table.name: ParameterConstraints(
                sharding_types=list(SHARDING_TYPES),
                compute_kernels=[FUSED, CACHING, UVM, DENSE],
                pooling_factors=[table.pooling_factor])}
            self.enumerator = EmbeddingEnumerator(
                topology=trec_topology, batch_size=topology.batch_size_per_device,
                constraints=constraints,
                estimator=[EmbeddingPerfEstimator(trec_topology, constraints),
                           EmbeddingStorageEstimator(trec_topology, constraints)])
            module = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name=table.name, embedding_dim=table.embedding_dim,
                num_embeddings=table.num_embeddings, feature_names=[table.name],
                data_type=torchrec_data_type(table.dtype))], device=torch.device("meta"))
            # The options serve as templates whose shards estimate() replaces and prices
            # one option at a time: TorchRec's estimates of its own shards, which its
            # enumerate() computes for every option, would be thrown away unread.
            self.enumerator.populate_estimates = lambda options: None
            try:
                found = self.enumerator.enumerate(module, [EmbeddingBagCollectionSharder()])
            finally:
                del self.enumerator.populate_estimates
        self.options = {(o.sharding_type, o.compute_kernel): o for o in found}

    def estimate(self, shard: ShardOption, name: str) -> Any:
        """TorchRec's ``Shard`` (with ``perf`` and ``storage``) for ``shard``, in an
        option whose ``num_shards`` shards all have ``shard``'s size; ``name``: the
        table's own name, for errors."""
        from torchrec.distributed.planner.types import Shard
        from torchrec.distributed.types import CacheParams

        key = (shard.sharding.value, torchrec_kernel(shard))
        template = self.options.get(key)
        if template is None:
            raise ValueError(f"TorchRec's enumerator offers no {key[0]}/{key[1]} option for "
                             f"table {name!r} (it offers "
                             f"{sorted('/'.join(k) for k in self.options)})")
        option = copy.copy(template)
        option.shards = [Shard(size=[shard.rows, shard.cols], offset=[0, 0])
                         for _ in range(shard.num_shards)]
        if option.compute_kernel == CACHING:
            option.cache_params = CacheParams(load_factor=shard.cache_rows / shard.rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.enumerator.populate_estimates([option])
        return option.shards[0]


class TorchRecCostModel:
    """TorchRec 1.8's ``EmbeddingPerfEstimator`` and ``EmbeddingStorageEstimator`` as a
    cost model (see the module docstring). Needs torchrec; ``--cost-model torchrec``."""

    def __init__(self) -> None:
        self._tables: dict[tuple[TableSpec, Topology], _TableEstimates] = {}
        self._costs: dict[tuple[ShardOption, Topology], ShardCost] = {}
        self._scans: dict = {}

    def cost(self, shard: ShardOption, topology: Topology) -> ShardCost:
        if shard.tier is Tier.STORE_CACHE:
            # TorchRec runs both cached tiers with one kernel and prices them alike
            shard = replace(shard, tier=Tier.DRAM_CACHE)
        name = shard.table.name
        shard = replace(shard, table=priced_table(shard.table))
        key = (shard, topology)
        known = self._costs.get(key)
        if known is not None:
            return known
        _import_torchrec()
        table_key = (shard.table, topology)
        estimates = self._tables.get(table_key)
        if estimates is None:
            estimates = self._tables[table_key] = _TableEstimates(shard.table, topology,
                                                                     self._scans)
        with _memoized_scans(self._scans):
            trec_shard = estimates.estimate(shard, name)
        perf, storage = trec_shard.perf, trec_shard.storage
        answer = ShardCost(perf.fwd_compute + perf.prefetch_compute,
                           perf.fwd_comms + perf.bwd_comms, perf.bwd_compute, 0.0,
                           int(storage.hbm), int(storage.ddr))
        self._costs[key] = answer
        return answer
