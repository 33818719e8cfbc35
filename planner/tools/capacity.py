"""Capacity planning: the fewest hosts whose plan runs a step of a global batch within a
target time, with a proof that one host fewer cannot.

For ``h`` hosts of the topology's kind the per-device batch is ``ceil(N / devices)``
(with a fixed per-device batch more devices would only add communication, so the
global batch ``N`` is the input). Host counts are scanned upwards from one:

1. A lower bound on every plan at ``h`` hosts (:func:`lower_bound`), from the aggregate
   option-choice ILP (``planner.search.aggregate``): first without memory constraints over the
   HBM twin of every option (a cached shard is never faster than the same shard in HBM,
   which :func:`planner.check_cost_model` checks, so this is a relaxation); when that is
   not above the target and its choice does not fit memory, over every option with the
   memory and packing constraints. An infeasible aggregate problem, or a table with no
   option that fits a device, proves that no plan exists at ``h``.
2. Where the bound is not above the target, the planner (:func:`planner.plan`) plans;
   the first plan within the target is the answer.

The bound says nothing about host counts it was not computed for, and the plan's time
need not fall as hosts are added (more hosts move more of the all-to-all over the
slower inter-host network). So the answer is proven minimal only where every smaller
host count's bound exceeds the target or is infeasible, which the scan computes; when
the planner found no plan within the target at a host count whose bound did not
exclude it, the result says ``proven = False``. Bounds are relative to the planner's
option space (its sharding types, tiers and cache sizes, :class:`OptionSettings`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from planner.errors import InfeasibleError, PlannerError
from planner.inputs.constraints import NO_CONSTRAINTS
from planner.inputs.cost import AnalyticCostModel, CostModel, Tier, check_cost_model
from planner.inputs.specs import GB, TablesSpec, Topology
from planner.plan_file import Plan
from planner.search.aggregate import PACKING_DFF_ORDERS, dff_u, solve_aggregate
from planner.search.api import PlanOptions, plan
from planner.search.options import OptionSettings, TableOption, table_options

UNBOUNDED_BYTES = 2**62
"""Device capacity for the memory-free relaxation: every HBM twin is generated."""
BOUND_SHARE = 0.25
"""Share of ``PlanOptions.time_limit_s`` that one host count's bound may take."""


class TargetUnreachableError(PlannerError, ValueError):
    """No host count up to ``max_hosts`` has a plan within the target."""

    def __init__(self, target_ms: float, max_hosts: int, best: "HostTrial | None",
                 detail: str) -> None:
        self.target_ms = target_ms
        self.max_hosts = max_hosts
        self.best = best
        super().__init__(detail)


@dataclass(frozen=True, slots=True)
class HostBound:
    """What one host count's lower bound proves."""

    hosts: int
    devices: int
    batch_size_per_device: int
    lower_bound_ms: float | None
    """A lower bound on the slowest device of every plan; None when infeasible."""
    method: str
    """``relaxed`` (no memory constraints, HBM twins), ``aggregate`` (every option,
    memory and packing constraints) or ``infeasible``."""
    detail: str = ""
    """For ``infeasible``: why no plan exists."""

    @property
    def infeasible(self) -> bool:
        return self.lower_bound_ms is None

    def excludes(self, target_ms: float) -> bool:
        """True when no plan at this host count runs within ``target_ms``."""
        return self.lower_bound_ms is None or self.lower_bound_ms > target_ms

    def to_json(self) -> dict[str, Any]:
        return {"hosts": self.hosts, "devices": self.devices,
                "batch_size_per_device": self.batch_size_per_device,
                "lower_bound_ms": self.lower_bound_ms, "infeasible": self.infeasible,
                "method": self.method, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class HostTrial:
    """One host count planned: its plan's slowest device, or why there is none."""

    hosts: int
    devices: int
    global_batch: int
    batch_size_per_device: int
    objective_ms: float | None
    plan_lower_bound_ms: float | None
    error: str = ""

    @property
    def samples_per_s(self) -> float | None:
        """The global batch over the slowest device's step time."""
        if self.objective_ms is None or self.objective_ms <= 0:
            return None
        return self.global_batch / (self.objective_ms / 1e3)

    def to_json(self) -> dict[str, Any]:
        return {"hosts": self.hosts, "devices": self.devices, "global_batch": self.global_batch,
                "batch_size_per_device": self.batch_size_per_device,
                "objective_ms": self.objective_ms, "plan_lower_bound_ms": self.plan_lower_bound_ms,
                "samples_per_s": self.samples_per_s, "error": self.error}


@dataclass(frozen=True, slots=True)
class CapacityResult:
    """The fewest hosts found, their plan, and what proves that fewer cannot do."""

    hosts: int
    devices_per_host: int
    global_batch: int
    target_ms: float
    plan: Plan
    """The plan at ``hosts`` hosts (its topology carries the per-device batch)."""
    bounds: tuple[HostBound, ...]
    """Every bound computed, by host count."""
    trials: tuple[HostTrial, ...]
    """Every host count planned."""
    seconds: float

    @property
    def fewer(self) -> HostBound | None:
        """The bound at ``hosts - 1`` (None when ``hosts`` is 1 or it was not computed)."""
        return next((b for b in self.bounds if b.hosts == self.hosts - 1), None)

    @property
    def proven(self) -> bool:
        """True when ``hosts`` is 1 or one host fewer is excluded (its bound is above the
        target, or no plan fits there)."""
        fewer = self.fewer
        return self.hosts == 1 or (fewer is not None and fewer.excludes(self.target_ms))

    @property
    def all_fewer_excluded(self) -> bool:
        """True when every smaller host count is excluded, not only ``hosts - 1``."""
        excluded = {b.hosts for b in self.bounds if b.excludes(self.target_ms)}
        return all(h in excluded for h in range(1, self.hosts))

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host

    @property
    def batch_size_per_device(self) -> int:
        return self.plan.topology.batch_size_per_device

    @property
    def objective_ms(self) -> float:
        return self.plan.solve.objective_ms

    @property
    def lower_bound_ms_with_fewer(self) -> float | None:
        return None if self.fewer is None else self.fewer.lower_bound_ms

    def to_json(self, plan_path: str | None = None) -> dict[str, Any]:
        """The capacity report (no Infinity or NaN: absent figures are null)."""
        fewer = self.fewer
        if fewer is None:
            why = "one host is the fewest possible"
        elif fewer.infeasible:
            why = f"{fewer.hosts} host(s) cannot hold the tables: {fewer.detail}"
        elif fewer.excludes(self.target_ms):
            why = (f"every plan on {fewer.hosts} host(s) takes at least "
                   f"{fewer.lower_bound_ms:.6g} ms > target {self.target_ms:g} ms "
                   f"({fewer.method} bound)")
        else:
            why = (f"not proven: the bound on {fewer.hosts} host(s) is "
                   f"{fewer.lower_bound_ms:.6g} ms <= target {self.target_ms:g} ms, though the "
                   f"planner found no plan within the target there")
        return {
            "status": "proven" if self.proven else "unproven",
            "hosts": self.hosts,
            "devices_per_host": self.devices_per_host,
            "devices": self.devices,
            "global_batch": self.global_batch,
            "batch_size_per_device": self.batch_size_per_device,
            "target_ms": self.target_ms,
            "objective_ms": self.objective_ms,
            "plan_lower_bound_ms": self.plan.solve.lower_bound_ms,
            "samples_per_s": self.global_batch / (self.objective_ms / 1e3)
            if self.objective_ms > 0 else None,
            "lower_bound_ms_with_fewer": self.lower_bound_ms_with_fewer,
            "infeasible_with_fewer": fewer is not None and fewer.infeasible,
            "proof": why,
            "all_fewer_excluded": self.all_fewer_excluded,
            "plan": plan_path,
            "cost_model": self.plan.cost_model,
            "bounds": [b.to_json() for b in self.bounds],
            "trials": [t.to_json() for t in self.trials],
            "seconds": self.seconds,
        }


def topology_for(topology: Topology, hosts: int, global_batch: int) -> Topology:
    """``hosts`` hosts of ``topology``'s kind, each device taking its share of the
    global batch, rounded up."""
    devices = hosts * topology.devices_per_host
    return replace(topology, hosts=hosts, batch_size_per_device=math.ceil(global_batch / devices))


def _memory_free(topology: Topology) -> Topology:
    """The same devices with memory that never binds (for the aggregate ILP only: the
    options are priced on the real topology)."""
    huge = UNBOUNDED_BYTES / GB
    return replace(topology, device=replace(topology.device, hbm_gb=huge),
                   host=replace(topology.host, dram_gb=huge), reserved_hbm_gb=0.0)


def lower_bound(
    tables: TablesSpec,
    topology: Topology,
    model: CostModel,
    *,
    settings: OptionSettings = OptionSettings(),
    enough_ms: float = math.inf,
    time_limit_s: float = 15.0,
    solver: str = "cbc",
    threads: int = 1,
) -> HostBound:
    """A lower bound on the slowest device of every plan of ``tables`` on ``topology``
    whose options ``settings`` allows, or a proof that none exists. The memory-free
    relaxation is returned as soon as it exceeds ``enough_ms``; otherwise, when its
    choice does not fit memory, the aggregate ILP with memory sharpens it."""
    hosts, devices = topology.hosts, topology.world_size
    batch = topology.batch_size_per_device
    relaxed_settings = replace(settings, tiers=frozenset({Tier.HBM}))
    twins = [table_options(t, topology, model, relaxed_settings, capacity_bytes=UNBOUNDED_BYTES)
             for t in tables.tables]
    bound = 0.0
    if all(twins):
        relaxed = solve_aggregate(twins, _memory_free(topology), time_limit_s=time_limit_s / 2,
                                  threads=threads, solver=solver)
        if relaxed.choice:
            bound = relaxed.lower_bound_ms
            chosen = [opts[i] for opts, i in zip(twins, relaxed.choice)]
            if bound > enough_ms or _fits_memory(chosen, topology):
                return HostBound(hosts, devices, batch, bound, "relaxed")
    candidates = [table_options(t, topology, model, settings) for t in tables.tables]
    for table, opts in zip(tables.tables, candidates):
        if not opts:
            return HostBound(hosts, devices, batch, None, "infeasible",
                             f"no allowed option of table {table.name!r} fits a device's "
                             f"{topology.usable_hbm_bytes} bytes of usable HBM")
    least_hbm = sum(min(o.hbm_bytes for o in opts) for opts in candidates)
    if least_hbm > topology.usable_hbm_bytes * devices:
        return HostBound(hosts, devices, batch, None, "infeasible",
                         f"the smallest options need {least_hbm} bytes of HBM, "
                         f"{devices} devices offer {topology.usable_hbm_bytes * devices}")
    full = solve_aggregate(candidates, topology, time_limit_s=time_limit_s / 2, threads=threads,
                           solver=solver)
    if not full.choice:
        return HostBound(hosts, devices, batch, None, "infeasible",
                         f"the aggregate ILP has no choice of options within HBM per device, "
                         f"DRAM per host and packing ({full.status})")
    return HostBound(hosts, devices, batch, max(bound, full.lower_bound_ms), "aggregate")


def _fits_memory(chosen: Sequence[TableOption], topology: Topology) -> bool:
    """The relaxed choice meets every memory constraint of the aggregate ILP (each shard
    fits a device; HBM, DRAM and packing totals), so that ILP's optimum equals the
    relaxed one."""
    capacity = topology.usable_hbm_bytes
    dram = int(topology.host.dram_gb * GB) * topology.hosts
    if capacity <= 0:
        return False
    return (all(o.max_shard_hbm_bytes <= capacity for o in chosen)
            and sum(o.hbm_bytes for o in chosen) <= capacity * topology.world_size
            and sum(o.dram_bytes for o in chosen) <= dram
            and all(sum(count * dff_u(cost.hbm_bytes, capacity, k)
                        for o in chosen for _, count, _, cost in o.priced)
                    <= topology.world_size + 1e-9 for k in PACKING_DFF_ORDERS))


def capacity(
    tables: TablesSpec,
    topology: Topology,
    global_batch: int,
    target_ms: float,
    *,
    max_hosts: int = 64,
    cost_model: CostModel | None = None,
    options: PlanOptions = PlanOptions(),
    progress: Callable[[str], None] | None = None,
) -> CapacityResult:
    """The fewest hosts of ``topology``'s kind (its ``hosts`` and
    ``batch_size_per_device`` are ignored) whose plan runs a step of ``global_batch``
    samples within ``target_ms``, with the bound at one host fewer.

    Raises :class:`TargetUnreachableError` when no host count up to ``max_hosts`` has
    a plan within the target, :class:`PlannerError` for bad arguments.
    """
    _check_arguments(global_batch, target_ms, max_hosts, options)
    start = time.perf_counter()
    model = AnalyticCostModel() if cost_model is None else check_cost_model(cost_model)
    say = progress or (lambda _line: None)
    bounds: dict[int, HostBound] = {}
    trials: list[HostTrial] = []
    bound_limit = max(1.0, BOUND_SHARE * options.time_limit_s)
    for hosts in range(1, max_hosts + 1):
        topo = topology_for(topology, hosts, global_batch)
        bound = lower_bound(tables, topo, model, settings=options.candidates, enough_ms=target_ms,
                            time_limit_s=bound_limit, solver=options.solver,
                            threads=options.threads)
        bounds[hosts] = bound
        if bound.excludes(target_ms):
            say(f"{hosts:>4} host(s): excluded, "
                + ("infeasible" if bound.infeasible else f"bound {bound.lower_bound_ms:.4g} ms"))
            continue
        trial, planned = _try_plan(tables, topo, global_batch, model, options)
        trials.append(trial)
        if planned is None or planned.solve.objective_ms > target_ms:
            say(f"{hosts:>4} host(s): bound {bound.lower_bound_ms:.4g} ms, "
                + (f"plan {trial.objective_ms:.4g} ms > target" if planned else trial.error))
            continue
        say(f"{hosts:>4} host(s): plan {planned.solve.objective_ms:.4g} ms <= target")
        return CapacityResult(
            hosts=hosts, devices_per_host=topology.devices_per_host, global_batch=global_batch,
            target_ms=target_ms, plan=planned, bounds=tuple(bounds[h] for h in sorted(bounds)),
            trials=tuple(trials), seconds=time.perf_counter() - start)
    feasible = [t for t in trials if t.objective_ms is not None]
    best = min(feasible, key=lambda t: t.objective_ms or 0.0) if feasible else None
    if best is not None:
        detail = (f"no plan on 1 to {max_hosts} host(s) of {topology.devices_per_host} device(s) "
                  f"runs a step of {global_batch} samples within {target_ms:g} ms; the fastest, "
                  f"on {best.hosts} host(s), takes {best.objective_ms:.4g} ms. Raise --max-hosts "
                  f"or the target, or allow more options")
    else:
        lowest = min((b for b in bounds.values() if not b.infeasible),
                     key=lambda b: b.lower_bound_ms or 0.0, default=None)
        detail = (f"no host count from 1 to {max_hosts} can run a step of {global_batch} samples "
                  f"within {target_ms:g} ms: "
                  + (f"every bound exceeds it or the tables do not fit (lowest bound "
                     f"{lowest.lower_bound_ms:.4g} ms on {lowest.hosts} host(s))" if lowest
                     else "the tables fit on none of them")
                  + ". Raise --max-hosts or the target")
    raise TargetUnreachableError(target_ms, max_hosts, best, detail)


def sweep(
    tables: TablesSpec,
    topology: Topology,
    global_batch: int,
    hosts: Sequence[int],
    *,
    cost_model: CostModel | None = None,
    options: PlanOptions = PlanOptions(),
    progress: Callable[[str], None] | None = None,
) -> tuple[HostTrial, ...]:
    """Plan the global batch on each host count: ms/step (and samples/s) against hosts."""
    _check_arguments(global_batch, 1.0, max(hosts, default=1), options)
    model = AnalyticCostModel() if cost_model is None else check_cost_model(cost_model)
    out = []
    for h in hosts:
        if h < 1:
            raise PlannerError(f"host counts must be >= 1, got {h}")
        trial, _ = _try_plan(tables, topology_for(topology, h, global_batch), global_batch, model,
                             options)
        if progress is not None:
            progress(f"{h:>4} host(s): " + (f"{trial.objective_ms:.4g} ms/step"
                                            if trial.objective_ms is not None else trial.error))
        out.append(trial)
    return tuple(out)


def _try_plan(tables: TablesSpec, topology: Topology, global_batch: int, model: CostModel,
              options: PlanOptions) -> tuple[HostTrial, Plan | None]:
    devices, batch = topology.world_size, topology.batch_size_per_device
    try:
        planned = plan(tables, topology, cost_model=model, options=options)
    except InfeasibleError as exc:
        return HostTrial(topology.hosts, devices, global_batch, batch, None, None,
                         f"no plan: {exc}"), None
    return HostTrial(topology.hosts, devices, global_batch, batch, planned.solve.objective_ms,
                     planned.solve.lower_bound_ms), planned


def _check_arguments(global_batch: int, target_ms: float, max_hosts: int,
                     options: PlanOptions) -> None:
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise PlannerError(f"the global batch must be an integer >= 1, got {global_batch!r}")
    if not (isinstance(target_ms, (int, float)) and math.isfinite(target_ms) and target_ms > 0):
        raise PlannerError(f"the target must be a finite time > 0 ms, got {target_ms!r}")
    if isinstance(max_hosts, bool) or not isinstance(max_hosts, int) or max_hosts < 1:
        raise PlannerError(f"the host count limit must be an integer >= 1, got {max_hosts!r}")
    if options.baseline is not None:
        raise PlannerError("capacity planning uses the ILP planner; drop the baseline")
    if options.constraints != NO_CONSTRAINTS:
        raise PlannerError("capacity planning does not take user constraints (their pins name "
                           "devices of one host count)")


__all__ = ["CapacityResult", "HostBound", "HostTrial", "TargetUnreachableError", "capacity",
           "lower_bound", "sweep", "topology_for"]
