"""Where a training step's time goes, measured the way the cost model splits it.

A step has four phases on the process's compute device:

- ``lookup``: the embedding forward (ids checked, rows gathered and pooled; for
  cached tables the misses fetched);
- ``communication``: pooled embeddings and their gradients moved between devices or
  processes (all-to-all), and the dense gradients all-reduced; zero in one process
  whose plan devices all map to the same torch device;
- ``dense``: bottom MLP, interaction, top MLP and loss, forward and backward, and the
  dense optimizer;
- ``update``: the embeddings' backward and optimizer, fused (the row gradients are
  expanded and applied in one pass, as FBGEMM's table-batched embeddings do), so
  the cost model's ``backward`` and ``optimizer`` parts are compared with it together.

``data`` (producing the batch) is measured too but is not part of the step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

PHASES = ("lookup", "communication", "dense", "update")


@dataclass(frozen=True, slots=True)
class StepTimes:
    """Mean milliseconds per step of each phase over ``steps`` timed steps, and the
    medians of the timed steps' totals and of each phase (robust to the first, cold
    steps and to the few that another process on the machine slowed down)."""

    lookup_ms: float
    communication_ms: float
    dense_ms: float
    update_ms: float
    data_ms: float
    steps: int
    median_step_ms: float = 0.0
    median_phase_ms: tuple[float, ...] = ()
    """The median step's time of each of :data:`PHASES`, in that order (empty when
    nothing was timed)."""
    steal_share: float | None = None
    """Share of the machine's CPU time that other VMs took during the run (Linux
    ``/proc/stat``; None where unknown): a loud neighbour slows every phase."""

    @property
    def step_ms(self) -> float:
        """The four phases together (data excluded)."""
        return self.lookup_ms + self.communication_ms + self.dense_ms + self.update_ms

    def to_json(self) -> dict[str, float | None]:
        return {"lookup_ms": self.lookup_ms, "communication_ms": self.communication_ms,
                "dense_ms": self.dense_ms, "update_ms": self.update_ms,
                "data_ms": self.data_ms, "step_ms": self.step_ms,
                "median_step_ms": self.median_step_ms,
                "median_phase_ms": dict(zip(PHASES, self.median_phase_ms)), "steps": self.steps,
                "steal_share": self.steal_share}


def cpu_ticks(stat: str | Path = "/proc/stat") -> tuple[int, int] | None:
    """``(steal, total)`` clock ticks of all CPUs since boot (Linux ``/proc/stat``):
    steal is the time a hypervisor gave this VM's CPUs to other VMs. None where the
    file is missing or unreadable."""
    try:
        fields = Path(stat).read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[:1] != ["cpu"] or len(fields) < 9:
        return None
    try:
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except ValueError:
        return None
    return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of CPU time stolen between two :func:`cpu_ticks` readings (None when
    either is missing or no time passed)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


class Stopwatch:
    """Seconds spent in some calls (e.g. every collective of a step), wherever they
    run; a phase that contains them gives them to another with
    :meth:`PhaseTimer.move`."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


class PhaseTimer:
    """Accumulates wall time per phase. On CUDA, ``sync`` (``torch.cuda.synchronize``)
    runs at every phase boundary so that queued kernels count where they ran."""

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        self._sync = sync
        self._seconds = dict.fromkeys((*PHASES, "data"), 0.0)
        self._steps = 0
        self._per_step: list[tuple[float, ...]] = []
        """Seconds of each timed step in each of :data:`PHASES`."""
        self._done = (0.0,) * len(PHASES)
        """The phases' seconds when the last step was done."""

    @staticmethod
    def for_device(device: torch.device) -> PhaseTimer:
        return PhaseTimer(torch.cuda.synchronize if device.type == "cuda" else lambda: None)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._seconds[name] += time.perf_counter() - start

    def move(self, source: str, target: str, seconds: float) -> None:
        """Count ``seconds`` measured inside phase ``source`` to ``target`` instead."""
        self._seconds[source] -= seconds
        self._seconds[target] += seconds

    def step_done(self) -> None:
        self._steps += 1
        now = tuple(self._seconds[name] for name in PHASES)
        self._per_step.append(tuple(a - b for a, b in zip(now, self._done)))
        self._done = now

    def result(self) -> StepTimes:
        n = max(self._steps, 1)
        ms = {k: v * 1e3 / n for k, v in self._seconds.items()}
        steps = self._per_step
        median = statistics.median(map(sum, steps)) * 1e3 if steps else 0.0
        phases = tuple(statistics.median(s[i] for s in steps) * 1e3
                       for i in range(len(PHASES))) if steps else ()
        return StepTimes(ms["lookup"], ms["communication"], ms["dense"], ms["update"], ms["data"],
                         self._steps, median, phases)

    def reset(self) -> None:
        for key in self._seconds:
            self._seconds[key] = 0.0
        self._steps = 0
        self._per_step.clear()
        self._done = (0.0,) * len(PHASES)
