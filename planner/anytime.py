"""The planner's stopping rule: the best plan and lower bound found so far, when
either last improved, and why to stop.

The search stops when the best plan is within the target gap of the bound (or
proven optimal), when neither improved for the stall window, or at the time limit.
Stages ask :meth:`Progress.stop` between steps; MIP solves get :meth:`Progress.watch`,
which sees their incumbents and bounds while they run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from planner.plan import StopReason
from planner.solvers import Watch

IMPROVEMENT = 1e-7
"""Relative change below which a plan or bound does not count as an improvement
(solver logs print about eight digits)."""
OPTIMAL_TOLERANCE = 1e-9
"""A plan within this relative distance of the bound is proven optimal."""


@dataclass(slots=True)
class Progress:
    """Best plan and bound so far, and the stopping rule."""

    time_limit_s: float
    gap: float
    """Target relative gap, (plan - bound) / bound."""
    stall_s: float
    clock: Callable[[], float] = time.perf_counter
    started: float = field(default=-1.0)
    best_ms: float = math.inf
    bound_ms: float = 0.0
    changed: float = field(default=-1.0)
    """When the plan or the bound last improved."""

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()
        self.changed = self.started

    def found(self, objective_ms: float) -> bool:
        """A complete plan of this slowest-device time exists; True if it is better."""
        if objective_ms < self.best_ms * (1 - IMPROVEMENT):
            self.best_ms = objective_ms
            self.changed = self.clock()
            return True
        self.best_ms = min(self.best_ms, objective_ms)
        return False

    def bounded(self, bound_ms: float) -> bool:
        """No plan is faster than ``bound_ms``; True if that raises the bound."""
        if bound_ms > self.bound_ms * (1 + IMPROVEMENT) and bound_ms > 0:
            self.bound_ms = bound_ms
            self.changed = self.clock()
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
        if gap is not None and self.best_ms <= self.bound_ms * (1 + OPTIMAL_TOLERANCE):
            return StopReason.OPTIMAL
        if gap is not None and gap <= self.gap:
            return StopReason.GAP_REACHED
        now = self.clock()
        if now >= self.started + self.time_limit_s:
            return StopReason.TIME_LIMIT
        if now - self.changed >= self.stall_s:
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
