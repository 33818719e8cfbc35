"""Plans built by hand (no solver), so runtime tests do not depend on the planner's ILP."""

from __future__ import annotations

from planner import Plan, Sharding, TablesSpec, Topology, parse_tables, parse_topology
from planner import ShardCost
from planner import DeviceLoad, Shard, SolveReport, TablePlan
from tests.conftest import small_tables_doc, small_topology_doc

NO_COST = ShardCost(0.0, 0.0, 0.0, 0.0, 0, 0)


def tables(num_tables: int = 3, rows: int = 500, dim: int = 8,
           optimizers: tuple[str, ...] = ()) -> TablesSpec:
    doc = small_tables_doc(num_tables=num_tables, rows=rows, dim=dim)
    for table, optimizer in zip(doc["tables"], optimizers):
        table["optimizer"] = optimizer
    return parse_tables(doc)


def topology(hosts: int = 2, devices_per_host: int = 2) -> Topology:
    return parse_topology(small_topology_doc(devices=devices_per_host, hosts=hosts, hbm_gb=1.0))


def table_wise(spec_tables: TablesSpec, topo: Topology,
               overrides: dict[str, TablePlan] | None = None) -> Plan:
    """Every table whole on device ``i % world``, except the ``overrides``."""
    overrides = overrides or {}
    plans = []
    for i, spec in enumerate(spec_tables.tables):
        whole = Shard(i % topo.world_size, 0, spec.num_embeddings, 0, spec.embedding_dim)
        default = TablePlan(spec.name, Sharding.TABLE_WISE, (whole,), NO_COST)
        plans.append(overrides.get(spec.name, default))
    devices = tuple(DeviceLoad(d, topo.host_of(d), 0.0, 0, topo.usable_hbm_bytes)
                    for d in range(topo.world_size))
    solve = SolveReport("manual", "none", "Optimal", "Optimal", 0.0, 0.0, 0.0, 0.0, 1)
    return Plan(spec_tables, topo, "analytic", tuple(plans), devices, solve)


def sharded(name: str, sharding: Sharding, *shards: tuple[int, int, int, int, int],
            tier=None) -> TablePlan:
    """``shards`` as (device, row_start, row_end, col_start, col_end)."""
    built = tuple(Shard(*s) if tier is None else Shard(*s, tier=tier) for s in shards)
    return TablePlan(name, sharding, built, NO_COST)
