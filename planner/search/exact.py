"""The device-indexed ILP over options and devices together, for small instances.

Tables whose candidate options are equal on every figure (shapes, tiers, costs) are
interchangeable, so they form one class of ``m`` tables: the integer ``y[c,o]`` counts
the class's tables that take option ``o`` (``sum_o y[c,o] = m``); for options whose
shards go anywhere, the integer ``n[c,o,d]`` counts their shards on device ``d``
(their shards are identical); for one-host options, ``h[c,o,k]`` counts those on host
``k``; options with one shard per device add their fixed load to every device, once
per table. Minimise ``z >= load of every device`` under HBM per device and DRAM per
host. Any solution decomposes into one option and placement per table, and a plan's
tables can be permuted within a class without changing any device's load or memory,
so the classes lose no plan and remove the solver's symmetric copies of each. Solved
exactly (or with the solver's bound when stopped early), warm-started from the
heuristic plan.
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
MEMORY_UNIT = GB
"""HBM and DRAM enter the ILP in GB: raw bytes (up to 1e11) beside milliseconds (1e-3)
put coefficients 14 orders apart, beyond what the solvers' tolerances are made for."""


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
    solver: str
    """The backend that solved it (``PULP_CBC_CMD`` or ``HiGHS``)."""


def table_classes(options: Sequence[Sequence[TableOption]]) -> list[list[int]]:
    """Tables grouped by equal candidate options (every figure but the table's name),
    in order of their first member."""
    groups: dict[tuple, list[int]] = {}
    for t, opts in enumerate(options):
        key = tuple((o.sharding, o.tier, o.cache_fraction, o.placement, o.row_ranges,
                     o.col_ranges, o.priced) for o in opts)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def useful_options(options: Sequence[Sequence[TableOption]], topology: Topology,
                   best_ms: float, keep: Sequence[int] | None = None) -> list[list[int]]:
    """Per table, the indices of the options that a plan faster than ``best_ms`` may
    use (plus ``keep[t]``, a warm start's): a plan holding an option has a device at
    least as slow as the option's largest shard, and an average load at least the
    option's work plus every other table's least work over the devices. Plans with
    any other option are no faster than ``best_ms``, so an ILP over the rest loses
    none that beat it, and its bound, capped at ``best_ms``, still holds."""
    least = [min(o.total_ms for o in opts) for opts in options]
    spare = topology.world_size * best_ms - sum(least)
    return [[i for i, o in enumerate(opts)
             if (o.max_shard_ms <= best_ms and o.total_ms - least[t] <= spare)
             or (keep is not None and keep[t] == i)]
            for t, opts in enumerate(options)]


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
    solver: str = "cbc",
) -> ExactSolution | None:
    """Solve with ``solver`` (``cbc`` or ``highs``); ``None`` when no solution was found
    in time. ``memory=False``
    drops the memory constraints: a relaxation whose bound holds for every plan over
    these options and any slower variants of them (cached tiers). ``watch`` sees the
    incumbent (the slowest device's time) and the solver's bound while it runs and
    may stop it early (see :func:`planner.search.solvers.solve`)."""
    world, per_host = topology.world_size, topology.devices_per_host
    classes = table_classes(options)
    prob = pulp.LpProblem("exact_placement", pulp.LpMinimize)
    pairs = [(c, o) for c, members in enumerate(classes) for o in range(len(options[members[0]]))]
    y = {(c, o): prob.add_variable(f"choose_{c}_{o}", lowBound=0, upBound=len(classes[c]),
                                   cat=pulp.LpInteger) for c, o in pairs}
    z = prob.add_variable("max_load_ms", lowBound=0)
    prob += z
    load: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in range(world)]
    hbm: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in range(world)]
    dram: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in range(topology.hosts)]
    count: dict[tuple[int, int, int], pulp.LpVariable] = {}
    host_of_option: dict[tuple[int, int, int], pulp.LpVariable] = {}

    def charge(var: pulp.LpVariable, device: int, cost) -> None:
        load[device].append((var, cost.total_ms))
        hbm[device].append((var, cost.hbm_bytes / MEMORY_UNIT))
        if cost.dram_bytes:
            dram[topology.host_of(device)].append((var, cost.dram_bytes / MEMORY_UNIT))

    for c, members in enumerate(classes):
        opts, m = options[members[0]], len(members)
        prob += (pulp.lpSum(y[c, o] for o in range(len(opts))) == m, f"one_option_{c}")
        for o, option in enumerate(opts):
            shards = option.shards
            if option.placement is Placement.EVERY_DEVICE:
                for device, slot in enumerate(shards):
                    charge(y[c, o], device, slot.cost)
            elif option.placement is Placement.ONE_HOST:
                hosts = [prob.add_variable(f"host_{c}_{o}_{k}", lowBound=0, upBound=m,
                                           cat=pulp.LpInteger)
                         for k in range(topology.hosts)]
                prob += (pulp.lpSum(hosts) == y[c, o], f"one_host_{c}_{o}")
                for k, var in enumerate(hosts):
                    host_of_option[c, o, k] = var
                    for i, slot in enumerate(shards):
                        charge(var, k * per_host + i, slot.cost)
            else:
                k = len(shards)
                for device in range(world):
                    var = prob.add_variable(f"shards_{c}_{o}_{device}", lowBound=0,
                                            upBound=k * m, cat=pulp.LpInteger)
                    count[c, o, device] = var
                    charge(var, device, shards[0].cost)
                prob += (pulp.lpSum(count[c, o, d] for d in range(world)) == k * y[c, o],
                         f"place_all_{c}_{o}")
    capacity = topology.usable_hbm_bytes
    dram_capacity = int(topology.host.dram_gb * GB)
    for c, members in enumerate(classes if solver == "highs" else ()):
        # Some device holds the largest shard of each chosen option: the mean over the
        # class's tables of their largest shards is at most z. Implied by the integer
        # model, this lifts the relaxation, where shard counts spread over devices.
        # HiGHS closes the gap sooner with it (Criteo Terabyte on 4 x 4 GB, TorchRec's
        # estimators: 4-5 s against 5-8 s); CBC's search finds worse plans with it
        # (13.2 against 11.1 ms), so CBC goes without.
        opts, m = options[members[0]], len(members)
        prob += (pulp.LpAffineExpression([(y[c, o], option.max_shard_ms / m)
                                          for o, option in enumerate(opts)]) - z <= 0,
                 f"largest_shard_{c}")
    for d in range(world):
        prob += (pulp.LpAffineExpression(load[d]) - z <= 0, f"load_dev_{d}")
        if memory:
            prob += (pulp.LpAffineExpression(hbm[d]) <= capacity / MEMORY_UNIT,
                     f"hbm_cap_dev_{d}")
    for k, terms in enumerate(dram):
        if terms and memory:
            prob += (pulp.LpAffineExpression(terms) <= dram_capacity / MEMORY_UNIT,
                     f"dram_cap_host_{k}")

    if warm_choice is not None:
        _warm_start(options, classes, warm_choice, warm_placed, y, count, host_of_option, z,
                    topology)

    outcome = solve(prob, solver=solver, time_limit_s=time_limit_s, threads=threads,
                    warm_start=warm_choice is not None, watch=watch)
    if not outcome.has_solution:
        return None

    choice, placed = _decompose(options, classes, y, count, host_of_option, topology)
    loads, used = [0.0] * world, [0] * world
    dram_used = [0] * topology.hosts
    for p in placed:
        loads[p.device] += p.slot.cost.total_ms
        used[p.device] += p.slot.cost.hbm_bytes
        dram_used[topology.host_of(p.device)] += p.slot.cost.dram_bytes
    makespan = max(loads)
    fits = max(used) <= capacity and max(dram_used) <= dram_capacity
    if outcome.proven_optimal and not outcome.stopped_early:
        bound = makespan
    else:
        bound = outcome.reported_bound or 0.0
    return ExactSolution(choice, tuple(placed), makespan, min(bound, makespan), outcome.status,
                         outcome.sol_status, fits, outcome.solver)


def _count(var: pulp.LpVariable) -> int:
    return round(var.value() or 0)


def _decompose(options, classes, y, count, host_of_option, topology
               ) -> tuple[tuple[int, ...], list[PlacedShard]]:
    """One option and placement per table from the class counts: each class's tables
    take the chosen options in turn, a free option's tables its devices' shards ``k``
    at a time, a one-host option's tables its hosts in turn."""
    world, per_host = topology.world_size, topology.devices_per_host
    choice = [0] * len(options)
    placed: list[PlacedShard] = []
    for c, members in enumerate(classes):
        queue = iter(members)
        for o, option in enumerate(options[members[0]]):
            taking = [next(queue) for _ in range(_count(y[c, o]))]
            shards = option.shards
            if option.placement is Placement.EVERY_DEVICE:
                for t in taking:
                    placed.extend(PlacedShard(t, slot, d) for d, slot in enumerate(shards))
            elif option.placement is Placement.ONE_HOST:
                hosts = [k for k in range(topology.hosts)
                         for _ in range(_count(host_of_option[c, o, k]))]
                for t, host in zip(taking, hosts):
                    placed.extend(PlacedShard(t, slot, host * per_host + i)
                                  for i, slot in enumerate(shards))
            else:
                devices = [d for d in range(world) for _ in range(_count(count[c, o, d]))]
                k = len(shards)
                for n, t in enumerate(taking):
                    placed.extend(PlacedShard(t, slot, d)
                                  for slot, d in zip(shards, devices[n * k:(n + 1) * k]))
            for t in taking:
                choice[t] = o
    return tuple(choice), placed


def _warm_start(options, classes, choice, placed, y, count, host_of_option, z, topology) -> None:
    class_of = {t: c for c, members in enumerate(classes) for t in members}
    for var in (*y.values(), *count.values(), *host_of_option.values()):
        var.setInitialValue(0)
    for t, o in enumerate(choice):
        var = y[class_of[t], o]
        var.setInitialValue(var.value() + 1)
    loads = [0.0] * topology.world_size
    for p in placed:
        loads[p.device] += p.slot.cost.total_ms
        c, o = class_of[p.table], choice[p.table]
        option = options[p.table][o]
        if option.placement is Placement.FREE:
            var = count[c, o, p.device]
            var.setInitialValue(var.value() + 1)
    for t, o in enumerate(choice):
        option = options[t][o]
        if option.placement is Placement.ONE_HOST:
            device = next(p.device for p in placed if p.table == t)
            var = host_of_option[class_of[t], o, topology.host_of(device)]
            var.setInitialValue(var.value() + 1)
    z.setInitialValue(max(loads))
