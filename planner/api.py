"""Plan tables onto a topology: the Python entry point behind ``dlrm-plan``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from planner.cost import AnalyticCostModel, CostModel, ShardCost, ShardOption, Sharding, Tier
from planner.errors import InfeasibleError, Resource, SolverError
from planner.packing import (
    Packing,
    PackingProblem,
    best_greedy,
    makespan,
    makespan_lower_bound,
    solve_packing_ilp,
)
from planner.plan import DeviceLoad, Plan, Shard, SolveReport, TablePlan
from planner.specs import GB, TablesSpec, Topology


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """How hard to search."""

    time_limit_s: float = 60.0
    """Wall-clock limit of the MIP solver; the best plan found by then is returned."""
    threads: int = 1
    solver: str = "cbc"
    """``cbc`` (bundled with PuLP) or ``highs`` (needs highspy)."""


def cost_model_name(model: CostModel) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def plan(
    tables: TablesSpec,
    topology: Topology,
    *,
    cost_model: CostModel | None = None,
    options: PlanOptions = PlanOptions(),
) -> Plan:
    """Place every table whole on one device (table-wise), minimising the slowest
    device's predicted step time under each device's usable HBM.

    Raises :class:`InfeasibleError` naming the binding resource and the shortfall,
    :class:`SolverError` when the MIP solver fails.
    """
    start = time.perf_counter()
    model = cost_model or AnalyticCostModel()
    costs = [
        model.cost(ShardOption(t, Sharding.TABLE_WISE, t.num_embeddings, t.embedding_dim), topology)
        for t in tables.tables
    ]
    problem = PackingProblem(
        load_ms=tuple(c.total_ms for c in costs),
        hbm_bytes=tuple(c.hbm_bytes for c in costs),
        devices=topology.world_size,
        capacity_bytes=topology.usable_hbm_bytes,
    )
    check_capacity(tables, topology, problem)
    warm = best_greedy(problem)
    packing = solve_packing_ilp(problem, time_limit_s=options.time_limit_s,
                                threads=options.threads, solver=options.solver, warm_start=warm)
    if not packing.device_of:
        if packing.infeasible:
            raise _packing_infeasible(tables, problem)
        if warm is None:
            raise SolverError(f"{packing.solver} found no placement within "
                              f"{options.time_limit_s:g} s ({packing.status}); raise --time-limit")
        packing = Packing(warm, makespan(problem, warm), packing.lower_bound_ms, packing.status,
                          packing.sol_status, False, packing.solver)
    elif warm is not None and makespan(problem, warm) < packing.makespan_ms:
        packing = Packing(warm, makespan(problem, warm), packing.lower_bound_ms, packing.status,
                          packing.sol_status, False, packing.solver)
    report = SolveReport(
        method="ilp",
        solver=packing.solver,
        status=packing.status,
        sol_status=packing.sol_status,
        objective_ms=packing.makespan_ms,
        lower_bound_ms=packing.lower_bound_ms,
        solve_seconds=time.perf_counter() - start,
        time_limit_s=options.time_limit_s,
        threads=options.threads,
    )
    return assemble_plan(tables, topology, cost_model_name(model), costs, packing.device_of, report)


def assemble_plan(
    tables: TablesSpec,
    topology: Topology,
    cost_model: str,
    costs: list[ShardCost],
    device_of: tuple[int, ...],
    report: SolveReport,
) -> Plan:
    """Build a table-wise :class:`Plan` from a placement and per-table costs."""
    loads = [0.0] * topology.world_size
    hbm = [0] * topology.world_size
    planned = []
    for table, cost, device in zip(tables.tables, costs, device_of):
        loads[device] += cost.total_ms
        hbm[device] += cost.hbm_bytes
        shard = Shard(device, 0, table.num_embeddings, 0, table.embedding_dim, Tier.HBM)
        planned.append(TablePlan(table.name, Sharding.TABLE_WISE, (shard,), cost))
    devices = tuple(
        DeviceLoad(d, topology.host_of(d), loads[d], hbm[d], topology.usable_hbm_bytes)
        for d in range(topology.world_size)
    )
    return Plan(tables, topology, cost_model, tuple(planned), devices, report)


def check_capacity(tables: TablesSpec, topology: Topology, problem: PackingProblem) -> None:
    """Fail fast, with numbers and fixes, when HBM cannot hold the tables."""
    capacity = problem.capacity_bytes
    for table, need in zip(tables.tables, problem.hbm_bytes):
        if need > capacity:
            raise InfeasibleError(
                Resource.HBM, need - capacity,
                f"table {table.name!r} needs {need} bytes, a device offers {capacity} "
                f"({topology.device.hbm_gb:g} GB minus {topology.reserved_hbm_gb:g} GB reserved)",
                tables=(table.name,),
                fixes=(f"devices of at least {math.ceil((need / GB + topology.reserved_hbm_gb) * 10) / 10:g} GB HBM",
                       "fp16 or bf16 storage (half the bytes)",
                       "a smaller reserved_hbm_gb"),
            )
    total = sum(problem.hbm_bytes)
    offered = capacity * problem.devices
    if total > offered:
        more = math.ceil((total - offered) / capacity)
        raise InfeasibleError(
            Resource.HBM, total - offered,
            f"the tables need {total} bytes in all, {problem.devices} devices offer {offered}",
            fixes=(f"{more} more device(s)", "fp16 or bf16 storage (half the bytes)"),
        )


def _packing_infeasible(tables: TablesSpec, problem: PackingProblem) -> InfeasibleError:
    """Totals fit but whole tables cannot be packed (fragmentation)."""
    smallest_misfit = min(problem.hbm_bytes)
    total = sum(problem.hbm_bytes)
    offered = problem.capacity_bytes * problem.devices
    largest = max(range(len(problem.hbm_bytes)), key=lambda i: problem.hbm_bytes[i])
    return InfeasibleError(
        Resource.HBM, max(1, smallest_misfit - (offered - total)),
        f"the tables need {total} of {offered} bytes but whole tables cannot be packed "
        f"onto {problem.devices} devices of {problem.capacity_bytes} bytes",
        tables=(tables.tables[largest].name,),
        fixes=("one more device", "fp16 or bf16 storage (half the bytes)"),
    )


__all__ = ["PlanOptions", "assemble_plan", "check_capacity", "cost_model_name", "plan",
           "makespan_lower_bound"]
