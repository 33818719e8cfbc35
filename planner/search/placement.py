"""Place the shards of chosen options on devices.

Shards bound to devices (row-wise over all devices, data-parallel) go first; each
table-row-wise option takes the host that keeps the largest load smallest; free
shards follow longest-first onto the least-loaded device with room (HBM per device,
DRAM per host). Pairs of devices then re-split their shards (``planner.search.balance``:
strong when each device holds few shards), a local search moves or swaps shards off
the slowest device while that lowers it, and tables on the slowest device may switch
to options with more shards. Small instances are finished by the exact packing ILP.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from planner.inputs.specs import GB, Topology
from planner.search.balance import BalanceProblem, balance_pairs
from planner.search.options import Placement, ShardSlot, TableOption
from planner.search.packing import PackingProblem, solve_packing_ilp
from planner.search.solvers import Watch

EXACT_PACKING_MAX_BINARIES = 4000
"""Free shards x devices up to which the exact packing ILP refines the heuristic."""
TARGET_SPLIT_MAX_PAIRS = 4000
"""Free shards x devices up to which placement also tries splitting tables only as
far as balance needs (:func:`_split_to_target`) and keeps the better result."""


@dataclass(frozen=True, slots=True)
class PlacedShard:
    table: int
    """Index of the table in the spec."""
    slot: ShardSlot
    device: int


@dataclass(frozen=True, slots=True)
class PlacementResult:
    options: tuple[TableOption, ...]
    """Each table's option: the given one, or one with smaller shards that the split
    step or the memory repair chose."""
    shards: tuple[PlacedShard, ...]
    loads_ms: tuple[float, ...]
    hbm_bytes: tuple[int, ...]
    dram_bytes: tuple[int, ...]
    """Per host."""
    exact: bool
    """True when the exact packing ILP proved the free shards' placement optimal."""

    @property
    def makespan_ms(self) -> float:
        return max(self.loads_ms, default=0.0)


@dataclass(frozen=True, slots=True)
class PlacementRules:
    """User constraints resolved to table indices (see ``planner.inputs.constraints``)."""

    device: tuple[int | None, ...]
    host: tuple[int | None, ...]
    group: tuple[int | None, ...]
    """Co-location group of each table."""
    apart: tuple[frozenset[int], ...]
    """Tables each table must not share a device with."""

    @property
    def active(self) -> bool:
        return any(x is not None for x in (*self.device, *self.host, *self.group)) or any(self.apart)

    def pinned(self, table: int) -> bool:
        return (self.device[table] is not None or self.host[table] is not None
                or self.group[table] is not None)


class _State:
    def __init__(self, topology: Topology, options: Sequence[TableOption],
                 rules: PlacementRules | None) -> None:
        self.topology = topology
        self.options = list(options)
        self.rules = rules
        self.loads = [0.0] * topology.world_size
        self.hbm = [0] * topology.world_size
        self.dram = [0] * topology.hosts
        self.hbm_cap = topology.usable_hbm_bytes
        self.dram_cap = int(topology.host.dram_gb * GB)
        self.placed: list[PlacedShard] = []
        self.where: list[dict[int, int]] = [{} for _ in options]
        """Shard count per device of each table."""

    def allowed(self, table: int, device: int, ignore: int = -1) -> bool:
        """The user's pins, co-location and separation permit ``table`` on ``device``
        (``ignore``: a table about to leave the device)."""
        rules = self.rules
        if rules is None:
            return True
        if rules.device[table] is not None and device != rules.device[table]:
            return False
        if rules.host[table] is not None and self.topology.host_of(device) != rules.host[table]:
            return False
        if any(self.where[other].get(device) for other in rules.apart[table] if other != ignore):
            return False
        group = rules.group[table]
        if group is not None:
            for other, other_group in enumerate(rules.group):
                if other_group == group and other != table and other != ignore:
                    if any(d != device for d in self.where[other]):
                        return False
        return True

    def fits(self, table: int, slot: ShardSlot, device: int) -> bool:
        host = self.topology.host_of(device)
        return (self.hbm[device] + slot.cost.hbm_bytes <= self.hbm_cap
                and self.dram[host] + slot.cost.dram_bytes <= self.dram_cap
                and self.allowed(table, device))

    def copy(self) -> "_State":
        other = _State(self.topology, self.options, self.rules)
        other.loads, other.hbm, other.dram = list(self.loads), list(self.hbm), list(self.dram)
        other.placed = list(self.placed)
        other.where = [dict(w) for w in self.where]
        return other

    def add(self, table: int, slot: ShardSlot, device: int, sign: int = 1) -> None:
        self.loads[device] += sign * slot.cost.total_ms
        self.hbm[device] += sign * slot.cost.hbm_bytes
        self.dram[self.topology.host_of(device)] += sign * slot.cost.dram_bytes
        count = self.where[table].get(device, 0) + sign
        if count:
            self.where[table][device] = count
        else:
            self.where[table].pop(device, None)


def place(
    options: Sequence[TableOption],
    topology: Topology,
    *,
    time_limit_s: float = 10.0,
    solver: str = "cbc",
    threads: int = 1,
    alternatives: Sequence[Sequence[TableOption]] | None = None,
    rules: PlacementRules | None = None,
    watch: Watch | None = None,
) -> PlacementResult | None:
    """Place every shard of ``options`` (one per table); ``None`` when some shard fits
    nowhere. With ``alternatives`` (every table's candidate options), tables on the
    slowest device may switch to an option with more shards when that lowers it, and
    under tight memory a table whose shard fits nowhere may switch to one whose shards
    fit. ``watch`` may stop the exact packing ILP early (see
    :func:`planner.search.solvers.solve`); its incumbents are complete placements."""
    start = time.perf_counter()
    state = _State(topology, options, rules)
    per_host = topology.devices_per_host
    free: list[tuple[int, ShardSlot]] = []
    for table, option in enumerate(options):
        if option.placement is Placement.EVERY_DEVICE:
            for device, slot in enumerate(option.shards):
                if not state.fits(table, slot, device):
                    return None
                state.add(table, slot, device)
                state.placed.append(PlacedShard(table, slot, device))
        elif option.placement is Placement.FREE:
            free.extend((table, slot) for slot in option.shards)
    grouped = [(t, o) for t, o in enumerate(options) if o.placement is Placement.ONE_HOST]
    for table, option in sorted(grouped, key=lambda item: -item[1].total_ms):
        shards = option.shards
        best_host, best_peak = -1, float("inf")
        for host in range(topology.hosts):
            devices = range(host * per_host, (host + 1) * per_host)
            if all(state.fits(table, s, d) for s, d in zip(shards, devices)):
                peak = max(state.loads[d] + s.cost.total_ms for s, d in zip(shards, devices))
                if peak < best_peak:
                    best_host, best_peak = host, peak
        if best_host < 0:
            return None
        for slot, device in zip(shards, range(best_host * per_host, (best_host + 1) * per_host)):
            state.add(table, slot, device)
            state.placed.append(PlacedShard(table, slot, device))

    fixed = len(state.placed)
    split_first = (state.copy() if alternatives is not None and (rules is None or not rules.active)
                   and 0 < len(free) * topology.world_size <= TARGET_SPLIT_MAX_PAIRS else None)
    free.sort(key=lambda item: (-item[1].cost.total_ms, -item[1].cost.hbm_bytes, item[0]))
    if not _longest_first(state, free):
        free.sort(key=lambda item: (-item[1].cost.hbm_bytes, item[0]))
        result = _memory_first(state, fixed, free, alternatives, start + time_limit_s / 2)
        split = _split_placement(split_first, fixed, free, alternatives, start + time_limit_s)
        if split is not None and (result is None or max(split.loads) < result.makespan_ms - 1e-12):
            return _result(split, False)
        return result
    refine = 0 < len(free) * topology.world_size <= EXACT_PACKING_MAX_BINARIES
    # The heuristics take the whole budget, or half when the exact ILP refines them.
    deadline = start + (time_limit_s / 2 if refine else time_limit_s)
    _balance(state, fixed, start + (deadline - start) / 2)
    _local_search(state, fixed, deadline)
    if alternatives is not None:
        before = list(state.options)
        _split_heavy(state, fixed, alternatives, deadline)
        if state.options != before:
            _local_search(state, fixed, deadline)
            _balance(state, fixed, deadline)
    split = _split_placement(split_first, fixed, free, alternatives, deadline)
    if split is not None and max(split.loads) < max(state.loads) - 1e-12:
        state = split
    exact = False
    if refine:
        exact = _refine_exactly(state, fixed, time_limit_s / 2, solver, threads, watch)
    return _result(state, exact)


def _split_placement(state: _State | None, fixed: int, free: Sequence[tuple[int, ShardSlot]],
                     alternatives: Sequence[Sequence[TableOption]] | None,
                     deadline: float) -> _State | None:
    """The free tables placed by :func:`_split_to_target` on ``state`` (the fixed
    shards only), then moves, swaps and pairwise re-splitting; None when not tried or
    some table fits nowhere."""
    if state is None or alternatives is None or time.perf_counter() >= deadline:
        return None
    if not _split_to_target(state, fixed, sorted({table for table, _ in free}), alternatives,
                            deadline):
        return None
    _local_search(state, fixed, deadline)
    _balance(state, fixed, deadline)
    return state


def _split_to_target(state: _State, fixed: int, tables: Sequence[int],
                     alternatives: Sequence[Sequence[TableOption]], deadline: float) -> bool:
    """Place ``tables`` (their free shards not yet placed) largest first (in load or in
    HBM), each in the
    fewest shards whose placement on the least-loaded devices keeps every device
    within the average load (else in the option that keeps the slowest device
    lowest): tables are split only as far as balance needs, not more. False when
    some table fits nowhere or time ran out."""
    total = sum(state.loads) + sum(state.options[t].total_ms for t in tables)
    target = total / len(state.loads) * (1 + 1e-9)

    def size(table: int) -> float:
        """The larger of the table's shares of the target load and of a device's HBM."""
        option = state.options[table]
        return max(option.total_ms / target if target > 0 else 0.0,
                   option.max_shard_hbm_bytes / state.hbm_cap if state.hbm_cap > 0 else 0.0)

    for table in sorted(tables, key=lambda t: (-size(t), t)):
        if time.perf_counter() >= deadline:
            return False
        choices = sorted((o for o in alternatives[table] if o.placement is Placement.FREE),
                         key=lambda o: (o.num_shards, o.total_ms))
        best: tuple[float, TableOption] | None = None
        for option in choices:
            new = _put(state, table, option, lambda s: -s.cost.total_ms, _least_loaded_fitting)
            if new is None:
                continue
            top = max(state.loads)
            if top <= target:
                state.placed.extend(new)
                state.options[table] = option
                best = None
                break
            for p in new:
                state.add(table, p.slot, p.device, sign=-1)
            if best is None or top < best[0]:
                best = (top, option)
        else:
            if best is None:
                return False
            option = best[1]
            new = _put(state, table, option, lambda s: -s.cost.total_ms, _least_loaded_fitting)
            if new is None:
                return False
            state.placed.extend(new)
            state.options[table] = option
    return True


def _longest_first(state: _State, free: Sequence[tuple[int, ShardSlot]]) -> bool:
    """Each free shard, in the given order, onto the least-loaded device with room
    (ties: the lowest index); ``False`` when one fits nowhere."""
    heap = [(load, device) for device, load in enumerate(state.loads)]
    heapq.heapify(heap)
    for table, slot in free:
        skipped = []
        while heap and not state.fits(table, slot, heap[0][1]):
            skipped.append(heapq.heappop(heap))
        if not heap:
            return False
        _, device = heapq.heappop(heap)
        state.add(table, slot, device)
        state.placed.append(PlacedShard(table, slot, device))
        heapq.heappush(heap, (state.loads[device], device))
        for item in skipped:
            heapq.heappush(heap, item)
    return True


def _balance(state: _State, fixed: int, deadline: float) -> None:
    """Pairwise re-splitting (``planner.search.balance``) of the free shards of tables that
    no user rule ties to a device, host, group or away from other tables."""
    rules = state.rules
    movable = [i for i in range(fixed, len(state.placed))
               if rules is None or not (rules.pinned(state.placed[i].table)
                                        or rules.apart[state.placed[i].table])]
    if not movable or time.perf_counter() >= deadline:
        return
    topology = state.topology
    shards = [state.placed[i] for i in movable]
    base_load, base_hbm, base_dram = list(state.loads), list(state.hbm), list(state.dram)
    for p in shards:
        base_load[p.device] -= p.slot.cost.total_ms
        base_hbm[p.device] -= p.slot.cost.hbm_bytes
        base_dram[topology.host_of(p.device)] -= p.slot.cost.dram_bytes
    problem = BalanceProblem(
        tuple(p.slot.cost.total_ms for p in shards), tuple(p.slot.cost.hbm_bytes for p in shards),
        tuple(p.slot.cost.dram_bytes for p in shards), tuple(base_load), tuple(base_hbm),
        tuple(base_dram), state.hbm_cap, state.dram_cap, topology.devices_per_host)
    result = balance_pairs(problem, tuple(p.device for p in shards), deadline=deadline)
    for index, shard, device in zip(movable, shards, result):
        if device != shard.device:
            _move(state, index, device)


def _least_loaded_fitting(state: _State, table: int, slot: ShardSlot) -> int | None:
    best = None
    for device in range(len(state.loads)):
        if state.fits(table, slot, device) and (best is None or state.loads[device] < state.loads[best]):
            best = device
    return best


def _memory_first(state: _State, fixed: int, free: list[tuple[int, ShardSlot]],
                  alternatives: Sequence[Sequence[TableOption]] | None,
                  deadline: float) -> PlacementResult | None:
    """Retry the free shards largest-memory-first (best fit), for tight memory. A table
    with a shard that fits nowhere switches, when ``alternatives`` are given, to its
    fastest free option whose shards all fit (smaller shards fill the gaps)."""
    for shard in state.placed[fixed:]:
        state.add(shard.table, shard.slot, shard.device, sign=-1)
    del state.placed[fixed:]
    switched: set[int] = set()
    for table, slot in free:
        if table in switched:
            continue
        device = _best_fit(state, table, slot)
        if device is None:
            if alternatives is None or not _refit(state, fixed, table, alternatives[table]):
                return None
            switched.add(table)
            continue
        state.add(table, slot, device)
        state.placed.append(PlacedShard(table, slot, device))
    _balance(state, fixed, time.perf_counter() + (deadline - time.perf_counter()) / 2)
    _local_search(state, fixed, deadline)
    if alternatives is not None:
        _split_heavy(state, fixed, alternatives, deadline)
        _local_search(state, fixed, deadline)
    return _result(state, False)


def _best_fit(state: _State, table: int, slot: ShardSlot) -> int | None:
    """The device with room whose free HBM is least (ties: least loaded)."""
    fitting = [d for d in range(len(state.loads)) if state.fits(table, slot, d)]
    if not fitting:
        return None
    return min(fitting, key=lambda d: (state.hbm_cap - state.hbm[d], state.loads[d]))


def _lift(state: _State, fixed: int, table: int) -> list[PlacedShard]:
    """Take ``table``'s free shards off their devices (still listed in ``placed``)."""
    old = [p for p in state.placed[fixed:] if p.table == table]
    for p in old:
        state.add(table, p.slot, p.device, sign=-1)
    return old


def _put(state: _State, table: int, option: TableOption, order: Callable[[ShardSlot], float],
         choose: Callable[[_State, int, ShardSlot], int | None]) -> list[PlacedShard] | None:
    """Place every shard of ``option`` (in ``order``) on the device ``choose`` picks;
    None, with nothing left placed, when some shard fits nowhere."""
    new: list[PlacedShard] = []
    for slot in sorted(option.shards, key=order):
        device = choose(state, table, slot)
        if device is None:
            for p in new:
                state.add(table, p.slot, p.device, sign=-1)
            return None
        state.add(table, slot, device)
        new.append(PlacedShard(table, slot, device))
    return new


def _refit(state: _State, fixed: int, table: int, alternatives: Sequence[TableOption]) -> bool:
    """Replace ``table``'s placed shards by those of its fastest other free option
    whose shards all fit, best fit; ``False`` (nothing changed) when none does."""
    current = state.options[table]
    old = _lift(state, fixed, table)
    for option in sorted((o for o in alternatives
                          if o.placement is Placement.FREE and o is not current),
                         key=lambda o: (o.total_ms, o.max_shard_hbm_bytes)):
        new = _put(state, table, option, lambda s: -s.cost.hbm_bytes, _best_fit)
        if new is not None:
            state.placed[fixed:] = [p for p in state.placed[fixed:] if p.table != table] + new
            state.options[table] = option
            return True
    for p in old:
        state.add(table, p.slot, p.device)
    return False


def _local_search(state: _State, fixed: int, deadline: float) -> None:
    """Move or swap free shards off the slowest device while that lowers it."""
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        worst = max(range(len(state.loads)), key=state.loads.__getitem__)
        peak = state.loads[worst]
        mine = [i for i in range(fixed, len(state.placed)) if state.placed[i].device == worst]
        mine.sort(key=lambda i: -state.placed[i].slot.cost.total_ms)
        order = sorted(range(len(state.loads)), key=state.loads.__getitem__)
        for i in mine:
            shard = state.placed[i]
            if state.rules is not None and state.rules.group[shard.table] is not None:
                continue  # a co-located table moves only with its group
            load = shard.slot.cost.total_ms
            for target in order:
                if target == worst or state.loads[target] + load >= peak - 1e-12:
                    continue
                if state.fits(shard.table, shard.slot, target):
                    _move(state, i, target)
                    improved = True
                    break
            if improved:
                break
        if improved:
            continue
        # swaps: a shard of the worst device for a lighter shard elsewhere
        for i in mine:
            a = state.placed[i]
            for j in range(fixed, len(state.placed)):
                b = state.placed[j]
                if b.device == worst:
                    continue
                delta = a.slot.cost.total_ms - b.slot.cost.total_ms
                if delta <= 1e-12 or state.loads[b.device] + delta >= peak - 1e-12:
                    continue
                if _swap_fits(state, a, b):
                    target = b.device
                    _move(state, j, worst)
                    _move(state, i, target)
                    improved = True
                    break
            if improved:
                break


def _swap_fits(state: _State, a: PlacedShard, b: PlacedShard) -> bool:
    da, db = a.device, b.device
    if state.rules is not None:
        if state.rules.group[a.table] is not None or state.rules.group[b.table] is not None:
            return False
        if a.table == b.table or not (state.allowed(a.table, db, ignore=b.table)
                                      and state.allowed(b.table, da, ignore=a.table)):
            return False
    ha, hb = state.topology.host_of(da), state.topology.host_of(db)
    if state.hbm[da] - a.slot.cost.hbm_bytes + b.slot.cost.hbm_bytes > state.hbm_cap:
        return False
    if state.hbm[db] - b.slot.cost.hbm_bytes + a.slot.cost.hbm_bytes > state.hbm_cap:
        return False
    if ha != hb:
        if state.dram[ha] - a.slot.cost.dram_bytes + b.slot.cost.dram_bytes > state.dram_cap:
            return False
        if state.dram[hb] - b.slot.cost.dram_bytes + a.slot.cost.dram_bytes > state.dram_cap:
            return False
    return True


def _move(state: _State, index: int, device: int) -> None:
    shard = state.placed[index]
    state.add(shard.table, shard.slot, shard.device, sign=-1)
    state.add(shard.table, shard.slot, device)
    state.placed[index] = PlacedShard(shard.table, shard.slot, device)


def _refine_exactly(state: _State, fixed: int, time_limit_s: float, solver: str, threads: int,
                    watch: Watch | None = None) -> bool:
    """Re-place the free shards with the exact packing ILP when all devices start
    empty of fixed shards (so devices are interchangeable) and DRAM does not bind."""
    if fixed or any(s.slot.cost.dram_bytes for s in state.placed) or (
            state.rules is not None and state.rules.active):
        return False
    free = state.placed[fixed:]
    problem = PackingProblem(tuple(s.slot.cost.total_ms for s in free),
                             tuple(s.slot.cost.hbm_bytes for s in free),
                             state.topology.world_size, state.hbm_cap)
    result = solve_packing_ilp(problem, time_limit_s=max(time_limit_s, 1.0), threads=threads,
                               solver=solver, warm_start=tuple(s.device for s in free),
                               watch=watch)
    if not result.device_of or result.makespan_ms > max(state.loads) + 1e-12:
        return False
    for offset, device in enumerate(result.device_of):
        _move(state, fixed + offset, device)
    return result.proven_optimal


def _peak(loads: Sequence[float]) -> tuple[float, int]:
    """The slowest device's load and how many devices share it: lowering either
    (the first, or the second at an equal first) is progress on a plateau of equally
    loaded devices."""
    top = max(loads)
    return top, sum(1 for load in loads if load >= top - 1e-12)


def _split_heavy(state: _State, fixed: int, alternatives: Sequence[Sequence[TableOption]],
                 deadline: float) -> None:
    """While it lowers the slowest device (or the number of devices that share its
    load): move a table found there to an option with more (hence smaller) free
    shards, placed least-loaded first."""
    while time.perf_counter() < deadline:
        worst = max(range(len(state.loads)), key=state.loads.__getitem__)
        peak = _peak(state.loads)
        here: dict[int, float] = {}
        for p in state.placed[fixed:]:
            if p.device == worst:
                here[p.table] = here.get(p.table, 0.0) + p.slot.cost.total_ms
        improved = False
        for table in sorted(here, key=lambda t: -here[t]):
            if state.rules is not None and state.rules.pinned(table):
                continue
            current = state.options[table]
            finer = sorted((o for o in alternatives[table]
                            if o.placement is Placement.FREE and o.num_shards > current.num_shards),
                           key=lambda o: o.total_ms)
            for option in finer:
                if _try_option(state, fixed, table, option, peak):
                    improved = True
                    break
            if improved:
                break
        if not improved:
            return


def _try_option(state: _State, fixed: int, table: int, option: TableOption,
                peak: tuple[float, int]) -> bool:
    """Swap ``table`` to ``option`` if the slowest device gets faster, or as fast with
    fewer devices at its load (see :func:`_peak`); else undo."""
    old = _lift(state, fixed, table)
    new = _put(state, table, option, lambda s: -s.cost.total_ms, _least_loaded_fitting)
    top, count = _peak(state.loads) if new is not None else (math.inf, 0)
    if new is not None and (top < peak[0] - 1e-12 or (top <= peak[0] + 1e-12 and count < peak[1])):
        state.placed[fixed:] = [p for p in state.placed[fixed:] if p.table != table] + new
        state.options[table] = option
        return True
    for p in new or []:
        state.add(table, p.slot, p.device, sign=-1)
    for p in old:
        state.add(table, p.slot, p.device)
    return False


def _result(state: _State, exact: bool) -> PlacementResult:
    return PlacementResult(tuple(state.options), tuple(state.placed), tuple(state.loads),
                           tuple(state.hbm), tuple(state.dram), exact)
