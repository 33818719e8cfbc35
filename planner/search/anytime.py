"""The planner's stopping rule: the best plan and lower bound found so far, when
either last improved, and why to stop.

The search stops when the best plan is within the target gap of the bound (or
proven optimal), when neither improved for the stall window, or at the time limit.
Stages ask :meth:`SearchProgress.stop` between steps; MIP solves get :meth:`SearchProgress.watch`,
which sees their incumbents and bounds while they run.

The time limit is wall-clock time. The stall window counts search work instead: CPU
seconds of this process and its solver processes (:func:`work_seconds`), so that a
busy machine, which slows the search, does not also cut it short.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field

from planner.plan_file import OPTIMAL_GAP, StopReason
from planner.search.solvers import Watch

IMPROVEMENT = 1e-7
"""Relative change below which a plan or bound does not count as an improvement
(solver logs print about eight digits)."""


def work_seconds() -> float:
    """CPU seconds of this process, its finished child processes and (where Linux's
    ``/proc`` shows them) its running ones, such as a CBC solver."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    return total + _running_children_cpu()


def _running_children_cpu() -> float:
    me = Path("/proc") / str(os.getpid()) / "task"
    try:
        tasks = list(me.iterdir())
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                fields = (Path("/proc") / child / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / ticks
            except (OSError, IndexError, ValueError):
                continue
    return total


@dataclass(slots=True)
class SearchProgress:
    """Best plan and bound so far, and the stopping rule."""

    time_limit_s: float
    gap: float
    """Target relative gap, (plan - bound) / bound."""
    stall_s: float
    """Search work (CPU seconds, see ``work``) without improvement that ends the search."""
    clock: Callable[[], float] = time.perf_counter
    """Wall clock, for the time limit."""
    work: Callable[[], float] = work_seconds
    """Work clock, for the stall window."""
    started: float = field(default=-1.0)
    best_ms: float = math.inf
    bound_ms: float = 0.0
    changed: float = field(default=-1.0)
    """Work clock when the plan or the bound last improved."""

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()
        self.changed = self.work()

    def found(self, objective_ms: float) -> bool:
        """A complete plan of this slowest-device time exists; True if it is better."""
        if objective_ms < self.best_ms * (1 - IMPROVEMENT):
            self.best_ms = objective_ms
            self.changed = self.work()
            return True
        self.best_ms = min(self.best_ms, objective_ms)
        return False

    def bounded(self, bound_ms: float) -> bool:
        """No plan is faster than ``bound_ms``; True if that raises the bound."""
        if bound_ms > self.bound_ms * (1 + IMPROVEMENT) and bound_ms > 0:
            self.bound_ms = bound_ms
            self.changed = self.work()
            return True
        self.bound_ms = max(self.bound_ms, bound_ms)
        return False

    @property
    def current_gap(self) -> float | None:
        """(best - bound) / bound, or None while either is unknown."""
        if not math.isfinite(self.best_ms) or self.bound_ms <= 0:
            return None
        return max(0.0, (self.best_ms - self.bound_ms) / self.bound_ms)

    def left_s(self) -> float:
        """Seconds to the time limit (never negative)."""
        return max(0.0, self.started + self.time_limit_s - self.clock())

    def stop(self) -> StopReason | None:
        """Why to stop now, or None to go on."""
        gap = self.current_gap
        if gap is not None and self.best_ms <= self.bound_ms * (1 + OPTIMAL_GAP):
            return StopReason.OPTIMAL
        if gap is not None and gap <= self.gap:
            return StopReason.GAP_REACHED
        if self.clock() >= self.started + self.time_limit_s:
            return StopReason.TIME_LIMIT
        if self.work() - self.changed >= self.stall_s:
            return StopReason.STALLED
        return None

    def outcome(self) -> StopReason:
        """Why the search ended: a stop reason, or, when it ran out of stages first,
        ``STALLED`` (nothing left that could improve the plan or the bound)."""
        return self.stop() or StopReason.STALLED

    def watch(self, plans: bool) -> Watch:
        """A watch for a MIP whose objective is the slowest device's time: its
        incumbents count as plans when ``plans`` (it places every shard under every
        constraint), its dual bound counts as a bound."""
        def check(incumbent: float | None, bound: float | None) -> bool:
            if plans and incumbent is not None:
                self.found(incumbent)
            if bound is not None:
                self.bounded(bound)
            return self.stop() is not None
        return check
