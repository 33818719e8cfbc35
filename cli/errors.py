"""One place that maps typed errors to exit codes and one-line messages."""

from __future__ import annotations

import enum
import sys
import traceback
from collections.abc import Callable

from dlrm_runtime.criteo import CriteoCacheError, CriteoFormatError
from dlrm_runtime.errors import (
    CheckpointError,
    ConfigError,
    PlanMismatchError,
    TrainingDivergedError,
)
from dlrm_runtime.profile import ProfileError
from planner.capacity import TargetUnreachableError
from planner.cost import CostModelError
from planner.errors import InfeasibleError, PlanFileError, PlannerError, SolverError, SpecError


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    """A bug: please report it with the --verbose traceback."""
    BAD_INPUT = 2
    """Malformed spec, plan or flag; nothing was written."""
    INFEASIBLE = 3
    """The tables do not fit the topology."""
    SOLVER = 4
    """The MIP solver failed or found nothing in time."""
    DIVERGED = 5
    """Training produced a NaN or infinite loss."""
    INTERRUPTED = 130


EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (SpecError, ExitCode.BAD_INPUT),
    (PlanFileError, ExitCode.BAD_INPUT),
    (CostModelError, ExitCode.BAD_INPUT),
    (CriteoFormatError, ExitCode.BAD_INPUT),
    (CriteoCacheError, ExitCode.BAD_INPUT),
    (ProfileError, ExitCode.BAD_INPUT),
    (ConfigError, ExitCode.BAD_INPUT),
    (PlanMismatchError, ExitCode.BAD_INPUT),
    (CheckpointError, ExitCode.BAD_INPUT),
    (InfeasibleError, ExitCode.INFEASIBLE),
    (TargetUnreachableError, ExitCode.INFEASIBLE),
    (SolverError, ExitCode.SOLVER),
    (TrainingDivergedError, ExitCode.DIVERGED),
    (PlannerError, ExitCode.BAD_INPUT),
)

EXIT_CODES_HELP = "exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode)


def run_guarded(prog: str, verbose: bool, body: Callable[[], int]) -> int:
    """Run ``body``; turn a known error into one line on stderr and its exit code."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        for kind, code in EXIT_CODES:
            if isinstance(exc, kind):
                if verbose:
                    traceback.print_exc()
                print(f"{prog}: error: {exc}", file=sys.stderr)
                return code
        if verbose:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} "
              f"(re-run with --verbose for the traceback)", file=sys.stderr)
        return ExitCode.INTERNAL
