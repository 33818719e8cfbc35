"""One place that builds PuLP solver backends, reads their proven bounds, and lets a
caller watch a MIP while it runs and stop it early.

Watching CBC (a child process whose log PuLP redirects to a file) reads the log
through a pseudo-terminal, so that CBC writes it line by line, and stops CBC with
SIGINT, after which it writes its incumbent as on a time limit. This needs a POSIX
pseudo-terminal and Linux's ``/proc``; elsewhere a watched CBC runs to its time
limit. HiGHS runs in-process and is watched through its callbacks.
"""

from __future__ import annotations

import functools
import os
import re
import select
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pulp

from planner.errors import SolverError

SOLVERS = ("cbc", "highs")
AUTO = "auto"
"""For the device-indexed exact ILP: HiGHS where highspy is installed, else CBC."""

Watch = Callable[[float | None, float | None], bool]
"""Called while a MIP runs with its incumbent objective and its dual bound so far
(``None``: not known yet), on every new report and at least every
``WATCH_PERIOD_S``; returning ``True`` stops the solver, which then returns its
incumbent as on a time limit."""
WATCH_PERIOD_S = 0.1

_CBC_INCUMBENT = re.compile(r"Integer solution of ([-+0-9.eE]+)")
_CBC_PROGRESS = re.compile(r"([-+0-9.eE]+) best solution, best possible ([-+0-9.eE]+)")


@dataclass(frozen=True, slots=True)
class SolveOutcome:
    status: str
    """The problem status (``Optimal``, ``Infeasible``, ``Not Solved``...)."""
    sol_status: str
    """The solution status: only ``Optimal Solution Found`` proves optimality."""
    has_solution: bool
    infeasible: bool
    proven_optimal: bool
    reported_bound: float | None
    """The solver's dual bound when it stopped early (None: not reported)."""
    solver: str
    stopped_early: bool = False
    """True when a watch stopped the solver."""


def solve(prob: pulp.LpProblem, *, solver: str = "cbc", time_limit_s: float, threads: int = 1,
          warm_start: bool = False, mip: bool = True, gap_rel: float | None = None,
          watch: Watch | None = None) -> SolveOutcome:
    """Solve ``prob`` in place; raise :class:`SolverError` when the solver fails.
    ``watch`` (MIPs only) may stop the solver early."""
    watcher = _CbcWatcher(watch) if watch is not None and mip and solver == "cbc" else None
    with _log_file() as log:
        if watcher is not None and not watcher.start():
            watcher = None
        backend = _backend(solver, time_limit_s, threads, warm_start, mip, gap_rel,
                           log if watcher is None else Path(watcher.tty_path))
        highs_stop = (_watch_highs(backend, watch)
                      if watch is not None and mip and solver == "highs" else None)
        try:
            prob.solve(backend)
        except pulp.PulpSolverError as exc:
            if watcher is not None and watcher.stopped:
                # Interrupted before CBC could write a solution: as if out of time.
                watcher.finish()
                return SolveOutcome("Not Solved", "No Solution Found", False, False, False,
                                    None, backend.name, stopped_early=True)
            raise SolverError(f"{backend.name} failed on {prob.name}: {exc}") from exc
        finally:
            if watcher is not None:
                watcher.finish()
        if watcher is not None:
            log_text = watcher.text
        else:
            log_text = log.read_text() if log.exists() else ""
    stopped = (watcher is not None and watcher.stopped) or (
        highs_stop is not None and highs_stop.is_set())
    bound: float | None = None
    if backend.name == "HiGHS":
        try:
            bound = float(prob.solverModel.getInfo().mip_dual_bound)
        except AttributeError:
            bound = None
    else:
        match = re.search(r"Lower bound:\s*([-+0-9.eE]+)", log_text)
        bound = float(match.group(1)) if match else None
    return SolveOutcome(
        status=pulp.LpStatus[prob.status],
        sol_status=pulp.LpSolution[prob.sol_status],
        # CBC stopped before any incumbent writes a status that reads as a solution.
        has_solution=prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        and not (watcher is not None and watcher.stopped and watcher.incumbent is None),
        infeasible=prob.status == pulp.LpStatusInfeasible,
        proven_optimal=prob.sol_status == pulp.LpSolutionOptimal,
        reported_bound=bound,
        solver=backend.name,
        stopped_early=stopped,
    )


class _CbcWatcher:
    """Reads CBC's log line by line through a pseudo-terminal, tells ``watch`` the
    incumbent and bound, and interrupts CBC when ``watch`` says so."""

    def __init__(self, watch: Watch) -> None:
        self._watch = watch
        self._chunks: list[str] = []
        self._incumbent: float | None = None
        self._bound: float | None = None
        self._done = threading.Event()
        self._searching = False
        """CBC has begun its search (and handles SIGINT: before that, SIGINT kills it)."""
        self.stopped = False
        self.tty_path = ""

    @property
    def incumbent(self) -> float | None:
        """The best incumbent objective CBC reported."""
        return self._incumbent

    @property
    def text(self) -> str:
        return "".join(self._chunks).replace("\r\n", "\n")

    def start(self) -> bool:
        """Open the terminal and start reading; False where that is impossible."""
        if not Path("/proc/self/fd").is_dir():
            return False
        try:
            self._master, self._slave = os.openpty()
            self.tty_path = os.ttyname(self._slave)
        except OSError:
            return False
        self._thread = threading.Thread(target=self._run, name="cbc-watch", daemon=True)
        self._thread.start()
        return True

    def finish(self) -> None:
        if self._done.is_set():
            return
        self._done.set()
        self._thread.join()
        os.close(self._slave)
        os.close(self._master)

    def _run(self) -> None:
        pending = ""
        while True:
            done = self._done.is_set()
            ready, _, _ = select.select([self._master], [], [], 0 if done else WATCH_PERIOD_S)
            if ready:
                try:
                    data = os.read(self._master, 1 << 16).decode(errors="replace")
                except OSError:
                    data = ""
                self._chunks.append(data)
                pending += data
                *lines, pending = pending.split("\n")
                for line in lines:
                    self._parse(line)
            elif done:
                return
            if (not done and not self.stopped and self._searching
                    and self._watch(self._incumbent, self._bound)):
                self.stopped = self._interrupt()

    def _parse(self, line: str) -> None:
        if line.startswith("Cbc0"):
            self._searching = True
        match = _CBC_INCUMBENT.search(line)
        if match:
            value = float(match.group(1))
            self._incumbent = value if self._incumbent is None else min(self._incumbent, value)
        match = _CBC_PROGRESS.search(line)
        if match:
            self._bound = float(match.group(2))

    def _interrupt(self) -> bool:
        """SIGINT to our CBC child whose output is our terminal: CBC stops and writes
        its incumbent."""
        me = str(os.getpid())
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] != me:
                    continue
                if os.readlink(entry / "fd" / "1") != self.tty_path:
                    continue
                os.kill(int(entry.name), signal.SIGINT)
                return True
            except (OSError, IndexError):
                continue
        return False


def _watch_highs(backend: pulp.LpSolver, watch: Watch) -> threading.Event:
    """Install HiGHS callbacks that ask ``watch`` and interrupt the MIP; the returned
    event is set once it did."""
    import highspy

    stopped = threading.Event()
    last = [0.0]

    def callback(kind, message, data_out, data_in, user_data) -> None:  # noqa: ANN001
        now = time.perf_counter()
        interrupt = kind == highspy.cb.HighsCallbackType.kCallbackMipInterrupt
        if interrupt and now - last[0] < WATCH_PERIOD_S:
            return
        last[0] = now
        incumbent, bound = data_out.mip_primal_bound, data_out.mip_dual_bound
        stop = watch(incumbent if abs(incumbent) < 1e30 else None,
                     bound if abs(bound) < 1e30 else None)
        if stop and interrupt:
            data_in.user_interrupt = True
            stopped.set()

    backend.callbackTuple = (callback, None)
    backend.callbacksToActivate = [highspy.cb.HighsCallbackType.kCallbackMipImprovingSolution,
                                   highspy.cb.HighsCallbackType.kCallbackMipInterrupt]
    return stopped


@contextmanager
def _log_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "solver.log"


def highs_available() -> bool:
    """Whether highspy (PuLP's in-process HiGHS) can be imported."""
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_solver(name: str) -> str:
    """``name``, with :data:`AUTO` turned into ``highs`` or ``cbc``."""
    if name == AUTO:
        return "highs" if highs_available() else "cbc"
    return name


@functools.cache
def _quiet_highs_banner() -> None:
    """HiGHS prints a banner on standard output when the first ``Highs`` object of a
    process is made, whatever its options: make that one with file descriptor 1 on
    /dev/null, so that planning prints nothing (``dlrm-plan ... --json`` writes JSON
    there). Runs once per process."""
    import sys

    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _warm_highs(backend: pulp.LpSolver) -> pulp.LpSolver:
    """``backend`` (PuLP's in-process HiGHS, which ignores ``warmStart``) made to pass
    the variables' initial values to HiGHS as a start solution."""
    import numpy as np

    run = backend.callSolver

    def call_solver(lp: pulp.LpProblem) -> None:
        variables = lp.variables()
        values = [(v.index, v.varValue) for v in variables if v.varValue is not None]
        if values:
            index = np.array([i for i, _ in values], dtype=np.int32)
            value = np.array([x for _, x in values], dtype=np.float64)
            lp.solverModel.setSolution(len(values), index, value)
        run(lp)

    backend.callSolver = call_solver
    return backend


def _backend(name: str, time_limit_s: float, threads: int, warm: bool, mip: bool,
             gap_rel: float | None, log: Path) -> pulp.LpSolver:
    if name == "cbc":
        # PuLP 3.3 marks its bundled CBC deprecated in favour of PuLP 4's packaging;
        # pyproject caps pulp < 4, where the bundled binary is the supported way.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, threads=threads,
                                     warmStart=warm, mip=mip, gapRel=gap_rel, logPath=str(log))
    if name == "highs":
        if not pulp.HiGHS().available():
            raise SolverError("solver 'highs' needs the highspy package: pip install highspy")
        _quiet_highs_banner()
        backend = pulp.HiGHS(msg=False, timeLimit=time_limit_s, threads=threads, mip=mip,
                             gapRel=gap_rel)
        return _warm_highs(backend) if warm else backend
    raise SolverError(f"unknown solver {name!r}; choose {' or '.join(SOLVERS)}")
