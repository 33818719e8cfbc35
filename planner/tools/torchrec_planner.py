"""Our planner behind TorchRec's ``ShardingPlanner`` interface.

:class:`TorchRecPlanner` is a drop-in for TorchRec's ``EmbeddingShardingPlanner``::

    planner = TorchRecPlanner(topology=Topology(world_size=2, compute_device="cpu"),
                              constraints={"t0": ParameterConstraints(pooling_factors=[4.0])})
    plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()], pg)
    model = DistributedModelParallel(model, plan=plan, ...)

The tables come from every ``EmbeddingBagCollection`` inside the module (found by
module path; table names must be unique across them), pooling factors from TorchRec's
``ParameterConstraints`` (summed over a table's features; 1.0 without one), or from
``tables`` (the project's tables spec or profile, which also gives access profiles,
dtypes and optimizers), and the topology from TorchRec's ``Topology`` (world size,
local world size, HBM and DDR caps, bandwidths) with the ``batch_size`` per rank.
``sharding_types`` and ``compute_kernels`` of a constraint restrict the table's
options. Only :meth:`plan` and :meth:`collective_plan` import torchrec.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.errors import PlannerError
from planner.inputs.constraints import Constraints, TableRules
from planner.inputs.cost import CostModel, Sharding, Tier
from planner.inputs.specs import (
    GB,
    DeviceSpec,
    DType,
    HostSpec,
    NetworkSpec,
    StoreSpec,
    TablesSpec,
    TableSpec,
    Topology,
)
from planner.plan_file import Plan
from planner.search.api import PlanOptions, plan
from planner.tools.torchrec import to_torchrec, to_torchrec_sharding_plan

TIER_OF_KERNEL = {"fused": Tier.HBM, "dense": Tier.HBM, "fused_uvm_caching": Tier.DRAM_CACHE,
                  "fused_uvm": Tier.HOST}
"""Our tier of each TorchRec compute kernel a constraint may allow."""

DEFAULT_BATCH_SIZE = 512
"""TorchRec's planner's default batch size per rank."""

STORE_GBPS = 1.0
"""Store bandwidth of the topology (TorchRec has no store tier; unused unless a
table's options allow ``store_cache``)."""


def topology_from_torchrec(trec: Any, batch_size: int) -> Topology:
    """Our topology of a TorchRec ``Topology``: hosts of ``local_world_size`` devices
    with rank 0's HBM and DDR caps (DDR summed over a host's ranks; a CPU rank's DDR
    is its device memory), TorchRec's
    bandwidths (bytes per ms turned into GB/s) and ``batch_size`` per rank."""
    per_host = trec.local_world_size
    if trec.world_size % per_host:
        raise PlannerError(f"the TorchRec topology's world_size {trec.world_size} is not a "
                           f"multiple of its local_world_size {per_host}; give a "
                           f"local_world_size that divides it")
    storage = trec.devices[0].storage
    # a CPU rank computes in its DDR: TorchRec gives it no HBM
    device_bytes = storage.ddr if trec.compute_device == "cpu" else storage.hbm
    gbps = 1000 / GB  # bytes/ms -> GB/s
    return Topology(
        hosts=trec.world_size // per_host,
        devices_per_host=per_host,
        device=DeviceSpec(device_bytes / GB, trec.hbm_mem_bw * gbps),
        host=HostSpec(storage.ddr * per_host / GB, trec.ddr_mem_bw * gbps,
                      trec.hbm_to_ddr_mem_bw * gbps),
        store=StoreSpec(STORE_GBPS, STORE_GBPS),
        network=NetworkSpec(trec.intra_host_bw * gbps, trec.inter_host_bw * gbps),
        batch_size_per_device=batch_size,
        description=f"from TorchRec's Topology (world {trec.world_size}, "
                    f"{trec.compute_device})",
    )


def embedding_bag_collections(module: Any) -> dict[str, Any]:
    """Every ``EmbeddingBagCollection`` inside ``module``, by module path (``""``: the
    module itself); collections inside a collection are not searched."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    found: dict[str, Any] = {}
    for path, child in module.named_modules():
        if isinstance(child, EmbeddingBagCollection) and not any(
                path.startswith(f"{p}.") for p in found if p):
            found[path] = child
    return found


def _dtype(config: Any) -> DType:
    name = str(getattr(config.data_type, "name", config.data_type)).lower()
    try:
        return DType(name)
    except ValueError:
        raise PlannerError(f"table {config.name!r}: data type {name} is not planned (planned: "
                           f"{', '.join(d.value for d in DType)})") from None


class TorchRecPlanner:
    """TorchRec's ``ShardingPlanner`` interface over our planner (see the module
    docstring). ``cost_model``: default the analytic model (``TorchRecCostModel()``
    optimises TorchRec's own estimates); ``options``: our :class:`PlanOptions`;
    ``tables``: per-table specs that override what the module and the constraints
    give (same names); ``batch_size``: per rank."""

    def __init__(self, topology: Any = None, batch_size: int | None = None,
                 constraints: dict[str, Any] | None = None, cost_model: CostModel | None = None,
                 options: PlanOptions | None = None, tables: TablesSpec | None = None) -> None:
        self.topology = topology
        self.batch_size = batch_size
        self.constraints = constraints
        self.cost_model = cost_model
        self.options = options
        self.tables = tables
        self.last_plan_: Plan | None = None
        """Our plan behind the last ShardingPlan returned."""

    def _topology(self) -> Any:
        if self.topology is not None:
            return self.topology
        import torch
        from torchrec.distributed.planner import Topology as TorchRecTopology

        device = "cuda" if torch.cuda.is_available() else "cpu"
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return TorchRecTopology(world_size=world, compute_device=device)

    def _tables(self, collections: dict[str, Any]) -> tuple[TablesSpec, dict[str, str]]:
        """The tables of every collection, and each table's module path."""
        given = {t.name: t for t in self.tables.tables} if self.tables else {}
        constraints = self.constraints or {}
        specs: list[TableSpec] = []
        path_of: dict[str, str] = {}
        for path, ebc in collections.items():
            for config in ebc.embedding_bag_configs():
                if config.name in path_of:
                    raise PlannerError(f"table {config.name!r} is in two collections "
                                       f"({path_of[config.name]!r} and {path!r}); give the "
                                       f"tables unique names")
                path_of[config.name] = path
                if config.name in given:
                    specs.append(given[config.name])
                    continue
                pc = constraints.get(config.name)
                factors = getattr(pc, "pooling_factors", None) or [1.0] * len(config.feature_names)
                specs.append(TableSpec(config.name, config.num_embeddings, config.embedding_dim,
                                       float(sum(factors)), dtype=_dtype(config)))
        if not specs:
            raise PlannerError("the module holds no EmbeddingBagCollection with tables; "
                               "TorchRecPlanner plans EmbeddingBagCollection tables")
        return TablesSpec(tuple(specs), "from the module's EmbeddingBagCollections"), path_of

    def _options(self, tables: TablesSpec) -> PlanOptions:
        options = self.options or PlanOptions()
        rules = dict(options.constraints.tables)
        for name, pc in (self.constraints or {}).items():
            if name not in {t.name for t in tables.tables}:
                continue
            shardings = getattr(pc, "sharding_types", None)
            kernels = getattr(pc, "compute_kernels", None)
            base = rules.get(name, TableRules())
            rules[name] = replace(
                base,
                shardings=frozenset(Sharding(s) for s in shardings
                                    if s in {x.value for x in Sharding}) if shardings
                else base.shardings,
                tiers=frozenset(TIER_OF_KERNEL[k] for k in kernels if k in TIER_OF_KERNEL)
                if kernels else base.tiers)
        constraints = Constraints(rules, options.constraints.colocate, options.constraints.separate)
        return replace(options, constraints=constraints)

    def plan(self, module: Any, sharders: list[Any]) -> Any:
        """A TorchRec ``ShardingPlan`` of every EmbeddingBagCollection in ``module``.
        ``sharders`` are accepted for the interface; the plan uses TorchRec's
        embedding-bag sharding types and kernels."""
        from planner.tools.torchrec import import_torchrec

        import_torchrec()
        trec_topology = self._topology()
        topology = topology_from_torchrec(trec_topology, self.batch_size or DEFAULT_BATCH_SIZE)
        tables, path_of = self._tables(embedding_bag_collections(module))
        ours = plan(tables, topology, cost_model=self.cost_model, options=self._options(tables))
        self.last_plan_ = ours
        device = "cpu" if trec_topology.compute_device == "cpu" else "cuda"
        flat = to_torchrec(ours, "", device)
        by_module: dict[str, dict[str, Any]] = {}
        for name, entry in flat["plan"][""].items():
            by_module.setdefault(path_of[name], {})[name] = entry
        return to_torchrec_sharding_plan({**flat, "plan": by_module})

    def collective_plan(self, module: Any, sharders: list[Any] | None = None,
                        pg: Any = None) -> Any:
        """:meth:`plan` on rank 0 of ``pg`` (default: the world), broadcast to every rank."""
        import torch.distributed as dist
        from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result

        if pg is None:
            if not dist.is_initialized():
                raise PlannerError("collective_plan needs torch.distributed initialised "
                                   "(init_process_group) or a process group; call plan() "
                                   "in one process")
            pg = dist.GroupMember.WORLD
        return invoke_on_rank_and_broadcast_result(pg, 0, self.plan, module, sharders or [])
