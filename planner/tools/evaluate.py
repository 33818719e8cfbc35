"""Re-cost a plan (hand-written ones too) under any cost model and topology, and say
why each table is where it is."""

from __future__ import annotations

from dataclasses import replace

from planner.errors import CapacityError, PlanFileError, Resource
from planner.inputs.cost import CostModel, ShardCost, ShardOption, Sharding, Tier
from planner.inputs.specs import GB, TablesSpec, TableSpec, Topology
from planner.plan_file import DeviceLoad, Plan, Shard, SolveReport, TablePlan, check_plan


def shard_option(table: TableSpec, sharding: Sharding, shards: tuple[Shard, ...], shard: Shard,
                 world_size: int) -> ShardOption:
    """The cost-model question for one shard of a plan: row-wise shards serve the
    share of lookups of their rows, data-parallel replicas the local batch."""
    rows = shard.row_end - shard.row_start
    lookup_share = rows / table.num_embeddings
    output_share = 1.0
    if sharding is Sharding.DATA_PARALLEL:
        lookup_share = output_share = 1.0 / world_size
    return ShardOption(table, sharding, rows, shard.col_end - shard.col_start, len(shards),
                       lookup_share, output_share, shard.tier, shard.cache_rows)


def evaluate_plan(plan: Plan, model: CostModel, model_name: str, topology: Topology | None = None,
                  tables: TablesSpec | None = None) -> Plan:
    """The same shards on the same devices, costed by ``model`` on ``topology``
    (default: the plan's) for ``tables`` (default: the plan's; same names and sizes,
    e.g. with measured access profiles). The result's objective is the re-costed
    slowest device; its bound is unknown (0) since the plan was not made under this
    model. Capacity is not checked here: see :func:`check_plan_fits`."""
    topology = topology or plan.topology
    if tables is not None:
        plan = replace(plan, tables_spec=tables)
    if topology.world_size < plan.topology.world_size:
        raise PlanFileError("<plan>", f"the plan uses {plan.topology.world_size} devices, the "
                                      f"topology has {topology.world_size}")
    replicated = [t.name for t in plan.tables if t.sharding is Sharding.DATA_PARALLEL]
    if topology.world_size != plan.topology.world_size and replicated:
        raise PlanFileError("<plan>", f"the plan replicates data-parallel table "
                                      f"{replicated[0]!r} on its {plan.topology.world_size} "
                                      f"devices, the topology has {topology.world_size}: a "
                                      f"data-parallel table needs a replica on every device; "
                                      f"evaluate on a topology of {plan.topology.world_size} "
                                      f"devices or re-plan for {topology.world_size}")
    world = topology.world_size
    loads, hbm = [0.0] * world, [0] * world
    tables = []
    for planned in plan.tables:
        try:
            spec = plan.tables_spec.by_name(planned.name)
        except KeyError:
            raise PlanFileError("<plan>", f"table {planned.name!r} is not in the tables "
                                          f"spec") from None
        total = ShardCost(0.0, 0.0, 0.0, 0.0, 0, 0)
        for shard in planned.shards:
            cost = model.cost(shard_option(spec, planned.sharding, planned.shards, shard, world),
                              topology)
            loads[shard.device] += cost.total_ms
            hbm[shard.device] += cost.hbm_bytes
            total = total + cost
        tables.append(replace(planned, cost=total))
    devices = tuple(DeviceLoad(d, topology.host_of(d), loads[d], hbm[d], topology.usable_hbm_bytes)
                    for d in range(world))
    report = SolveReport("evaluate", "none", "Evaluated", "Not Solved", max(loads), 0.0, 0.0, 0.0, 1)
    out = Plan(plan.tables_spec, topology, model_name, tuple(tables), devices, report)
    check_plan(out)
    return out


def capacity_overflows(plan: Plan, model: CostModel) -> tuple[tuple[Resource, str, int, int], ...]:
    """Every device whose HBM and every host whose DRAM the plan's shards, sized by
    ``model``, overflow: ``(resource, "device D" | "host H", used_bytes, capacity_bytes)``."""
    topology = plan.topology
    world = topology.world_size
    hbm, dram = [0] * world, [0] * topology.hosts
    for planned in plan.tables:
        spec = plan.tables_spec.by_name(planned.name)
        for shard in planned.shards:
            cost = model.cost(shard_option(spec, planned.sharding, planned.shards, shard, world),
                              topology)
            hbm[shard.device] += cost.hbm_bytes
            dram[topology.host_of(shard.device)] += cost.dram_bytes
    out = [(Resource.HBM, f"device {d}", used, topology.usable_hbm_bytes)
           for d, used in enumerate(hbm) if used > topology.usable_hbm_bytes]
    capacity = int(topology.host.dram_gb * GB)
    out.extend((Resource.DRAM, f"host {h}", used, capacity)
               for h, used in enumerate(dram) if used > capacity)
    return tuple(out)


def check_plan_fits(plan: Plan, model: CostModel) -> None:
    """Raise :class:`CapacityError` naming each overflowing device or host."""
    overflows = capacity_overflows(plan, model)
    if overflows:
        raise CapacityError(overflows)


def explain(plan: Plan, table: TablePlan) -> str:
    """One line on why a table is sharded and stored as it is, led by what narrowed
    its options when it was planned (its constraints, ``--tiers``, ``--sharding``)."""
    why = _explain(plan, table)
    return why if table.limited_by is None else f"limited by {table.limited_by}; {why}"


def _explain(plan: Plan, table: TablePlan) -> str:
    spec = plan.tables_spec.by_name(table.name)
    tiers = {s.tier for s in table.shards}
    peak = plan.solve.objective_ms
    capacity = plan.topology.usable_hbm_bytes
    if tiers == {Tier.HOST}:
        free = sum(d.hbm_capacity_bytes - d.hbm_bytes for d in plan.devices)
        why = (f"HBM binds: whole it needs {spec.weight_bytes} bytes, the devices have "
               f"{free} left" if spec.weight_bytes > free else
               f"in host DRAM although HBM has room (whole it needs {spec.weight_bytes} "
               f"bytes, the devices have {free} left): "
               + ("the limits" if table.limited_by else "the cost model") + " chose it")
        return (f"{why}; all {spec.num_embeddings} rows in host DRAM, read over the host "
                f"link every step (no device cache)")
    if tiers != {Tier.HBM}:
        whole = spec.weight_bytes
        free = sum(d.hbm_capacity_bytes - d.hbm_bytes for d in plan.devices)
        why = (f"HBM binds: whole it needs {whole} bytes, the devices have {free} left"
               if whole > free else
               f"cached although HBM has room (whole it needs {whole} bytes, the devices "
               f"have {free} left): "
               + ("the limits" if table.limited_by else "the cost model") + " chose it")
        return f"{why}; {_cache_summary(spec, table)}"
    if table.sharding is Sharding.TABLE_WISE:
        return "fastest option: whole in HBM on one device"
    if table.sharding is Sharding.DATA_PARALLEL:
        return "replicated: small, and lookups stay local (no all-to-all of ids and outputs)"
    if spec.weight_bytes > capacity:
        return f"HBM binds: whole it needs {spec.weight_bytes} bytes, a device holds {capacity}"
    return (f"load balance: split into {len(table.shards)} shards so no device exceeds "
            f"{peak:.4f} ms/step")


def _cache_summary(spec: TableSpec, table: TablePlan) -> str:
    """How much of the table the device caches hold. Shards over the same rows
    (column-wise shards, data-parallel replicas) each cache the same rows, so their
    caches are reported per shard, not summed."""
    by_rows: dict[tuple[int, int], list[int]] = {}
    for s in table.shards:
        by_rows.setdefault((s.row_start, s.row_end), []).append(s.cache_rows)
    rows = spec.num_embeddings
    if len(by_rows) == 1 and len(table.shards) > 1:
        (cached_rows,) = by_rows.values()
        per_shard = max(cached_rows)
        return (f"each of its {len(table.shards)} shards caches {per_shard} of its "
                f"{rows} rows ({per_shard / rows:.0%}), hit rate "
                f"{spec.access.hit_rate(rows, per_shard):.0%} by its access profile")
    cache = sum(max(c) for c in by_rows.values())
    return (f"cached {cache} of {rows} rows ({cache / rows:.0%}), hit rate "
            f"{spec.access.hit_rate(rows, cache):.0%} by its access profile")
