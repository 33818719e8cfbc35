"""One place that maps typed errors to exit codes and one-line messages.

The error types are named by module and class, not imported: a type can only be
raised once its module is loaded, so the table is matched against ``sys.modules``
and ``dlrm-plan`` never imports the runtime (and torch) just to map its errors.
"""

from __future__ import annotations

import argparse
import enum
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    """A bug: please report it with the --verbose traceback."""
    BAD_INPUT = 2
    """Malformed spec, plan, file or flag; nothing was written."""
    INFEASIBLE = 3
    """The tables do not fit the topology."""
    SOLVER = 4
    """The MIP solver failed or found nothing in time."""
    DIVERGED = 5
    """Training produced a NaN or infinite loss."""
    CAPACITY = 6
    """A given plan overflows a device's HBM or a host's DRAM."""
    INTERRUPTED = 130


class UsageError(Exception):
    """A flag's value or a path given on the command line cannot be used; the message
    names the flag as the user typed it."""


EXIT_CODES: tuple[tuple[str, str, ExitCode], ...] = (
    ("cli.errors", "UsageError", ExitCode.BAD_INPUT),
    ("planner", "SpecError", ExitCode.BAD_INPUT),
    ("planner", "PlanFileError", ExitCode.BAD_INPUT),
    ("planner", "CostModelError", ExitCode.BAD_INPUT),
    ("planner", "InfeasibleError", ExitCode.INFEASIBLE),
    ("planner", "TargetUnreachableError", ExitCode.INFEASIBLE),
    ("planner", "SolverError", ExitCode.SOLVER),
    ("planner", "CapacityError", ExitCode.CAPACITY),
    ("planner", "PlannerError", ExitCode.BAD_INPUT),
    ("dlrm_runtime.errors", "TrainingDivergedError", ExitCode.DIVERGED),
    ("dlrm_runtime.distributed.launch", "WorkersFailed", ExitCode.INTERNAL),
    ("dlrm_runtime.errors", "RuntimeErrorBase", ExitCode.BAD_INPUT),
    ("storage.errors", "StoreError", ExitCode.BAD_INPUT),
)
"""(module, class, exit code), first match wins. Every runtime error (``ConfigError``,
``PlanMismatchError``, ``CheckpointError``, the Criteo and profile errors) derives
from ``dlrm_runtime.errors.RuntimeErrorBase``. ``WorkersFailed`` takes the exit code of
the first failing worker's record (see :func:`run_guarded`); without one (a worker
killed by a signal) it is internal."""

EXIT_CODES_HELP = "exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode)


def exit_code_of(exc: BaseException) -> ExitCode | None:
    """The exit code of a known error type, None for anything else (a bug)."""
    for module_name, class_name, code in EXIT_CODES:
        module = sys.modules.get(module_name)
        kind = getattr(module, class_name, None) if module is not None else None
        if isinstance(kind, type) and isinstance(exc, kind):
            return code
    if isinstance(exc, OSError) and exc.filename is not None:
        return ExitCode.BAD_INPUT  # a file the user named: missing, a directory, no access
    return None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (an OSError names its file)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror.lower()}"
        if exc.filename2 is not None:
            text = f"{exc.filename} -> {exc.filename2}: {exc.strerror.lower()}"
    else:
        text = str(exc)
    return " ".join(text.split())


def one_line_parse_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report a bad flag as one line (``PROG: error: ...``, exit 2)
    instead of argparse's usage block followed by the error."""
    def error(message: str) -> NoReturn:
        parser.exit(ExitCode.BAD_INPUT,
                    f"{parser.prog}: error: {one_line(Exception(message))} (see --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _print_line(code: int, line: str) -> None:
    del code
    print(line, file=sys.stderr)


def _worker_failure(exc: BaseException) -> object | None:
    """The record of the first failing worker carried by a launcher's error
    (``dlrm_runtime.WorkersFailed`` / ``WorkersInterrupted``), else None."""
    module = sys.modules.get("dlrm_runtime.distributed.launch")
    kinds = tuple(getattr(module, name) for name in ("WorkersFailed", "WorkersInterrupted")
                  ) if module is not None else ()
    return getattr(exc, "failure", None) if kinds and isinstance(exc, kinds) else None


def run_guarded(prog: str, verbose: bool, body: Callable[[], int],
                on_interrupt: Callable[[KeyboardInterrupt], str] | None = None,
                report: Callable[[int, str], None] = _print_line) -> int:
    """Run ``body``; turn a known error into one line and its exit code, given to
    ``report(code, line)`` (default: the line on stderr; a worker of ``dlrm-run
    --nproc-per-node`` records it for the launcher instead, which prints the first
    failing rank's line once, with that rank's exit code). ``on_interrupt`` words
    Ctrl-C (e.g. where to resume from)."""
    try:
        code = body()
        broken = False
    except BrokenPipeError:  # stdout closed early (``| head``): not an error
        code, broken = ExitCode.OK, True
    except KeyboardInterrupt as exc:
        failure = _worker_failure(exc)
        if failure is not None:
            report(ExitCode.INTERRUPTED, failure.message)  # type: ignore[attr-defined]
            return ExitCode.INTERRUPTED
        detail = on_interrupt(exc) if on_interrupt is not None else ""
        report(ExitCode.INTERRUPTED, f"{prog}: interrupted{' ' + detail if detail else ''}")
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        if verbose:
            traceback.print_exc()
        failure = _worker_failure(exc)
        if failure is not None:
            report(failure.exit_code, failure.message)  # type: ignore[attr-defined]
            return failure.exit_code  # type: ignore[attr-defined]
        known = exit_code_of(exc)
        if known is not None:
            report(known, f"{prog}: error: {one_line(exc)}")
            return known
        report(ExitCode.INTERNAL, f"{prog}: internal error: {type(exc).__name__}: "
                                  f"{one_line(exc)} (re-run with --verbose for the traceback)")
        return ExitCode.INTERNAL
    if broken:
        _silence_stdout()
    else:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
    return code


def _silence_stdout() -> None:
    """After ``| head`` closed the pipe: send what is still buffered nowhere, so that
    Python's exit does not report the broken pipe again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
