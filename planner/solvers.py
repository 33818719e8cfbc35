"""One place that builds PuLP solver backends and reads their proven bounds."""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pulp

from planner.errors import SolverError

SOLVERS = ("cbc", "highs")


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


def solve(prob: pulp.LpProblem, *, solver: str = "cbc", time_limit_s: float, threads: int = 1,
          warm_start: bool = False, mip: bool = True, gap_rel: float | None = None) -> SolveOutcome:
    """Solve ``prob`` in place; raise :class:`SolverError` when the solver fails."""
    with _log_file() as log:
        backend = _backend(solver, time_limit_s, threads, warm_start, mip, gap_rel, log)
        try:
            prob.solve(backend)
        except pulp.PulpSolverError as exc:
            raise SolverError(f"{backend.name} failed on {prob.name}: {exc}") from exc
        log_text = log.read_text() if log.exists() else ""
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
        has_solution=prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible),
        infeasible=prob.status == pulp.LpStatusInfeasible,
        proven_optimal=prob.sol_status == pulp.LpSolutionOptimal,
        reported_bound=bound,
        solver=backend.name,
    )


@contextmanager
def _log_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "solver.log"


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
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, threads=threads, warmStart=warm,
                          mip=mip, gapRel=gap_rel)
    raise SolverError(f"unknown solver {name!r}; choose {' or '.join(SOLVERS)}")
