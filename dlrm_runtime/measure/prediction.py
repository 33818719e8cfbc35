"""What a plan predicts for one training step of one process, phase by phase, to set
beside what :mod:`dlrm_runtime.measure.timing` measures.

The plan's cost model prices every shard on its device (lookup, communication,
backward, optimizer; HBM and DRAM bytes). A process executes some of the plan's
devices: one device per rank under torchrun, or all of them in one process, where
they run one after the other on this process's device and their times add up (there
a row-wise table's in-memory shards are one weight and a data-parallel table one copy:
each is priced as the whole table). The dense part (MLPs and interaction, forward and
backward, and the dense optimizer) is not a planning input; it is predicted from its
FLOPs and bytes at the topology's measured ``device.dense_gflops`` and
``device.dense_gbps``, plus the fixed ``device.dense_step_ms`` (all three fitted by
``dlrm-plan calibrate`` to short training runs of several shapes), and left unknown
without a measured ``dense_gflops``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from dlrm_runtime.config import Interaction, ModelConfig
from planner import (
    AnalyticCostModel,
    CostModel,
    CostModelError,
    Plan,
    Sharding,
    ShardOption,
    TablePlan,
    Tier,
    collective_latency_ms,
    load_cost_model,
    shard_option,
)


@dataclass(frozen=True, slots=True)
class StepPrediction:
    """Predicted milliseconds per step of one process, split like
    :class:`dlrm_runtime.measure.timing.StepTimes`, and the embedding bytes it holds."""

    lookup_ms: float
    communication_ms: float
    update_ms: float
    """The cost model's backward and optimizer parts together (the runtime fuses them)."""
    dense_ms: float | None
    """None when the topology has no measured ``dense_gflops``."""
    hbm_bytes: int
    dram_bytes: int
    devices: tuple[int, ...]
    """The plan devices this process executes."""
    cost_model: str
    calibrated: bool = False
    """Whether the plan's topology was measured (``dlrm-plan calibrate``) rather than
    written from datasheets: only then should it match this machine."""

    @property
    def step_ms(self) -> float | None:
        if self.dense_ms is None:
            return None
        return self.lookup_ms + self.communication_ms + self.update_ms + self.dense_ms

    def to_json(self) -> dict[str, object]:
        return {"lookup_ms": self.lookup_ms, "communication_ms": self.communication_ms,
                "update_ms": self.update_ms, "dense_ms": self.dense_ms, "step_ms": self.step_ms,
                "hbm_bytes": self.hbm_bytes, "dram_bytes": self.dram_bytes,
                "devices": list(self.devices), "cost_model": self.cost_model,
                "calibrated": self.calibrated}


def plan_cost_model(plan: Plan) -> tuple[CostModel, str]:
    """The cost model the plan was made with, when it can be imported here; else the
    analytic model (the name returned says which)."""
    try:
        return load_cost_model(plan.cost_model), plan.cost_model
    except CostModelError:
        return AnalyticCostModel(), "planner:AnalyticCostModel (the plan's "\
                                    f"{plan.cost_model} cannot be loaded here)"


def dense_flops(config: ModelConfig, embedding_dims: Sequence[int], batch_size: int) -> float:
    """FLOPs of one step's dense part: every MLP layer's matrix product forward (2 x
    in x out per sample) and backward (twice that: input and weight gradients), and
    the dot interaction's Gram matrix the same way."""
    widths_bottom = (config.dense_features, *config.bottom_mlp)
    features = 1 + len(embedding_dims)
    if config.interaction is Interaction.DOT:
        width = config.bottom_mlp[-1] + features * (features - 1) // 2
        interaction = 2.0 * features * features * config.bottom_mlp[-1]
    else:
        width = config.bottom_mlp[-1] + sum(embedding_dims)
        interaction = 0.0
    widths_top = (width, *config.top_mlp)
    forward = interaction + sum(2.0 * a * b for widths in (widths_bottom, widths_top)
                                for a, b in zip(widths, widths[1:]))
    return 3.0 * forward * batch_size


def dense_bytes(config: ModelConfig, embedding_dims: Sequence[int], batch_size: int) -> float:
    """Bytes of the dense step's tensors, fp32, each counted once: every activation
    (MLP layer outputs, the interaction's features, products and output, the logits)
    and every parameter. The step passes over each several times (forward, ReLU,
    backward, optimizer); the calibrated ``dense_gbps`` is fitted with this same
    count on DLRM-shaped probes, so those passes are priced in it."""
    widths_bottom = (config.dense_features, *config.bottom_mlp)
    features = 1 + len(embedding_dims)
    if config.interaction is Interaction.DOT:
        width = config.bottom_mlp[-1] + features * (features - 1) // 2
        interaction = features * config.bottom_mlp[-1] + features * features + width
    else:
        width = config.bottom_mlp[-1] + sum(embedding_dims)
        interaction = width
    widths_top = (width, *config.top_mlp)
    activations = sum(widths_bottom[1:]) + interaction + sum(widths_top[1:])
    parameters = sum((a + 1) * b for widths in (widths_bottom, widths_top)
                     for a, b in zip(widths, widths[1:]))
    return 4.0 * (activations * batch_size + parameters)


def dense_ms(config: ModelConfig, embedding_dims: Sequence[int], batch_size: int,
             gflops: float, gbps: float | None, step_ms: float | None = None) -> float:
    """Predicted milliseconds of the dense step: its FLOPs at ``gflops`` plus its
    bytes at ``gbps`` plus the fixed ``step_ms`` (each when measured)."""
    seconds = dense_flops(config, embedding_dims, batch_size) / (gflops * 1e9)
    if gbps:
        seconds += dense_bytes(config, embedding_dims, batch_size) / (gbps * 1e9)
    return seconds * 1e3 + (step_ms or 0.0)


def _runs_merged(planned: TablePlan, devices: set[int]) -> Tier | None:
    """Whether a process whose plan ``devices`` share one torch device executes this
    table as one whole table (:class:`~dlrm_runtime.embeddings.InMemoryEmbeddings`),
    and in which tier: a row-wise (or table-row-wise) table with every shard in device
    memory, or every shard in host memory (the ``host`` tier), and on those devices
    keeps its shards in ONE weight, pooled by one lookup over the unrouted ids; a
    data-parallel table keeps one copy, batched with the whole tables. So it costs
    what the whole table costs in that tier. Priced per shard, four row shards of each
    of the demo's tables were predicted 5 % slower than its table-wise plans, which ran
    as fast. Row caches (one per shard) are priced per shard (None)."""
    tiers = {s.tier for s in planned.shards}
    merged = (planned.sharding in (Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE,
                                   Sharding.DATA_PARALLEL)
              and len(planned.shards) > 1 and len(tiers) == 1
              and tiers <= {Tier.HBM, Tier.HOST}
              and all(s.device in devices for s in planned.shards))
    return next(iter(tiers)) if merged else None


def predict_step(plan: Plan, config: ModelConfig, batch_size: int,
                 devices: Sequence[int] | None = None, *, communication: bool = True,
                 cost_model: tuple[CostModel, str] | None = None) -> StepPrediction:
    """The step of a process that executes plan ``devices`` (default: all of them)
    with a global batch of ``batch_size`` samples (the plan is re-costed at this batch
    size: the cost model scales with it). ``communication=False`` when the executed
    devices share one torch device, so that nothing travels between them (else the
    step's collectives add their fixed latency to communication); then an
    in-memory row-wise or data-parallel table is priced as the one whole table the
    runtime makes of it (see :func:`_runs_merged`)."""
    model, name = cost_model or plan_cost_model(plan)
    topology = plan.topology
    world = topology.world_size
    devices = tuple(range(world)) if devices is None else tuple(devices)
    if batch_size != topology.global_batch_size:
        topology = replace(topology, batch_size_per_device=max(1, round(batch_size / world)))
    mine = set(devices)
    lookup = comm = update = 0.0
    hbm = dram = 0
    for planned in plan.tables:
        spec = plan.tables_spec.by_name(planned.name)
        merged = None if communication else _runs_merged(planned, mine)
        if merged is not None:
            options = [ShardOption(spec, Sharding.TABLE_WISE, spec.num_embeddings,
                                   spec.embedding_dim, tier=merged)]
        else:
            options = [shard_option(spec, planned.sharding, planned.shards, shard, world)
                       for shard in planned.shards if shard.device in mine]
        for option in options:
            cost = model.cost(option, topology)
            lookup += cost.lookup_ms
            comm += cost.communication_ms if communication else 0.0
            update += cost.backward_ms + cost.optimizer_ms
            hbm += cost.hbm_bytes
            dram += cost.dram_bytes
    if communication:
        sharded = any(t.sharding is not Sharding.DATA_PARALLEL for t in plan.tables)
        comm += collective_latency_ms(topology, all_to_all=sharded)
    gflops = topology.device.dense_gflops
    dense = None
    if gflops:
        # each executed device's replica of the MLPs runs on its share of the batch
        samples = round(batch_size * len(devices) / world)
        dims = [t.embedding_dim for t in plan.tables_spec.tables]
        device = topology.device
        dense = dense_ms(config, dims, samples, gflops, device.dense_gbps, device.dense_step_ms)
    return StepPrediction(lookup, comm, update, dense, hbm, dram, devices, name,
                          bool(plan.topology.calibration))
