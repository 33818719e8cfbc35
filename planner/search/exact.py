"""The device-indexed ILP over options and devices together, for small instances.

Variables: ``y[t,o]`` picks option ``o`` of table ``t``; for options whose shards go
anywhere, the integer ``n[t,o,d]`` counts its shards on device ``d`` (their shards
are identical); for one-host options, ``h[t,o,k]`` picks host ``k``; options with one
shard per device add their fixed load to every device. Minimise ``z >= load of every
device`` under HBM per device and DRAM per host. Solved exactly (or with the solver's
bound when stopped early), warm-started from the heuristic plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulp

from planner.inputs.specs import GB, Topology
from planner.search.options import Placement, TableOption
from planner.search.placement import PlacedShard
from planner.search.solvers import Watch, solve

EXACT_MAX_TERMS = 12_000
"""Largest number of (option, device) pairs for which the exact ILP is attempted."""


@dataclass(frozen=True, slots=True)
class ExactSolution:
    choice: tuple[int, ...]
    placed: tuple[PlacedShard, ...]
    makespan_ms: float
    lower_bound_ms: float
    status: str
    sol_status: str
    fits_memory: bool
    """Whether the placement respects HBM per device and DRAM per host."""


def exact_size(options: Sequence[Sequence[TableOption]], topology: Topology) -> int:
    return sum(len(opts) for opts in options) * topology.world_size


def solve_exact(
    options: Sequence[Sequence[TableOption]],
    topology: Topology,
    *,
    time_limit_s: float,
    threads: int = 1,
    warm_choice: Sequence[int] | None = None,
    warm_placed: Sequence[PlacedShard] = (),
    memory: bool = True,
    watch: Watch | None = None,
) -> ExactSolution | None:
    """Solve with CBC; ``None`` when no solution was found in time. ``memory=False``
    drops the memory constraints: a relaxation whose bound holds for every plan over
    these options and any slower variants of them (cached tiers). ``watch`` sees the
    incumbent (the slowest device's time) and the solver's bound while it runs and
    may stop it early (see :func:`planner.search.solvers.solve`)."""
    world, per_host = topology.world_size, topology.devices_per_host
    prob = pulp.LpProblem("exact_placement", pulp.LpMinimize)
    pairs = [(t, o) for t, opts in enumerate(options) for o in range(len(opts))]
    y = prob.add_variable_dicts("choose", pairs, cat=pulp.LpBinary)
    z = prob.add_variable("max_load_ms", lowBound=0)
    prob += z
    load: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in range(world)]
    hbm: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in range(world)]
    dram: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in range(topology.hosts)]
    count: dict[tuple[int, int, int], pulp.LpVariable] = {}
    host_of_option: dict[tuple[int, int, int], pulp.LpVariable] = {}

    def charge(var: pulp.LpVariable, device: int, cost) -> None:
        load[device].append((var, cost.total_ms))
        hbm[device].append((var, cost.hbm_bytes))
        if cost.dram_bytes:
            dram[topology.host_of(device)].append((var, cost.dram_bytes))

    for t, opts in enumerate(options):
        prob += (pulp.lpSum(y[t, o] for o in range(len(opts))) == 1, f"one_option_{t}")
        for o, option in enumerate(opts):
            shards = option.shards
            if option.placement is Placement.EVERY_DEVICE:
                for device, slot in enumerate(shards):
                    charge(y[t, o], device, slot.cost)
            elif option.placement is Placement.ONE_HOST:
                hosts = [prob.add_variable(f"host_{t}_{o}_{k}", cat=pulp.LpBinary)
                         for k in range(topology.hosts)]
                prob += (pulp.lpSum(hosts) == y[t, o], f"one_host_{t}_{o}")
                for k, var in enumerate(hosts):
                    host_of_option[t, o, k] = var
                    for i, slot in enumerate(shards):
                        charge(var, k * per_host + i, slot.cost)
            else:
                k = len(shards)
                for device in range(world):
                    var = prob.add_variable(f"shards_{t}_{o}_{device}", lowBound=0, upBound=k,
                                            cat=pulp.LpInteger)
                    count[t, o, device] = var
                    charge(var, device, shards[0].cost)
                prob += (pulp.lpSum(count[t, o, d] for d in range(world)) == k * y[t, o],
                         f"place_all_{t}_{o}")
    capacity = topology.usable_hbm_bytes
    for d in range(world):
        prob += (pulp.LpAffineExpression(load[d]) - z <= 0, f"load_dev_{d}")
        if memory:
            prob += (pulp.LpAffineExpression(hbm[d]) <= capacity, f"hbm_cap_dev_{d}")
    for k, terms in enumerate(dram):
        if terms and memory:
            prob += (pulp.LpAffineExpression(terms) <= int(topology.host.dram_gb * GB),
                     f"dram_cap_host_{k}")

    if warm_choice is not None:
        _warm_start(options, warm_choice, warm_placed, y, count, host_of_option, z, topology)

    outcome = solve(prob, solver="cbc", time_limit_s=time_limit_s, threads=threads,
                    warm_start=warm_choice is not None, watch=watch)
    if not outcome.has_solution:
        return None

    choice = tuple(next(o for o in range(len(opts)) if (y[t, o].value() or 0) > 0.5)
                   for t, opts in enumerate(options))
    placed: list[PlacedShard] = []
    for t, o in enumerate(choice):
        option = options[t][o]
        shards = option.shards
        if option.placement is Placement.EVERY_DEVICE:
            placed.extend(PlacedShard(t, slot, d) for d, slot in enumerate(shards))
        elif option.placement is Placement.ONE_HOST:
            host = next(k for k in range(topology.hosts) if (host_of_option[t, o, k].value() or 0) > 0.5)
            placed.extend(PlacedShard(t, slot, host * per_host + i) for i, slot in enumerate(shards))
        else:
            devices = [d for d in range(world) for _ in range(round(count[t, o, d].value() or 0))]
            placed.extend(PlacedShard(t, slot, d) for slot, d in zip(shards, devices))
    loads, used = [0.0] * world, [0] * world
    dram_used = [0] * topology.hosts
    for p in placed:
        loads[p.device] += p.slot.cost.total_ms
        used[p.device] += p.slot.cost.hbm_bytes
        dram_used[topology.host_of(p.device)] += p.slot.cost.dram_bytes
    makespan = max(loads)
    fits = max(used) <= capacity and max(dram_used) <= int(topology.host.dram_gb * GB)
    if outcome.proven_optimal and not outcome.stopped_early:
        bound = makespan
    else:
        bound = outcome.reported_bound or 0.0
    return ExactSolution(choice, tuple(placed), makespan, min(bound, makespan), outcome.status,
                         outcome.sol_status, fits)


def _warm_start(options, choice, placed, y, count, host_of_option, z, topology) -> None:
    for (t, o), var in y.items():
        var.setInitialValue(1 if choice[t] == o else 0)
    for var in count.values():
        var.setInitialValue(0)
    for var in host_of_option.values():
        var.setInitialValue(0)
    loads = [0.0] * topology.world_size
    for p in placed:
        loads[p.device] += p.slot.cost.total_ms
        option = options[p.table][choice[p.table]]
        if option.placement is Placement.FREE:
            var = count[p.table, choice[p.table], p.device]
            var.setInitialValue((var.value() or 0) + 1)
        elif option.placement is Placement.ONE_HOST:
            host_of_option[p.table, choice[p.table], topology.host_of(p.device)].setInitialValue(1)
    z.setInitialValue(max(loads))
