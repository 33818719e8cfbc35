"""Start the workers of a multi-process run from this process, through torch's elastic
launcher API (``torch.distributed.launcher.api.elastic_launch``), so that no separate
``torchrun`` command is needed (:func:`launch`).

Each worker runs ``entry(*args)`` in a process spawned by this one, with torchrun's
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), so :func:`~dlrm_runtime.init_from_env` starts the process group as
under torchrun. Stopping:

* Ctrl-C or SIGTERM of the launcher: the elastic agent stops every worker;
* SIGKILL of the launcher: every worker has asked the kernel for a SIGKILL when its
  parent dies (``prctl(PR_SET_PDEATHSIG)`` on Linux; elsewhere a thread watches the
  parent's pid once a second), so no worker runs on; a run killed anywhere resumes
  (checkpoints are transactions over every rank, see :mod:`dlrm_runtime.checkpoint`);
* a worker that fails: it writes why into its own record (:class:`WorkerFailure`)
  before it exits with its exit code; the agent then stops the others and
  :func:`launch` raises :class:`WorkersFailed` with the record of the first rank that
  failed, so that the caller reports it once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlrm_runtime.errors import ConfigError, RuntimeErrorBase

__all__ = ["LaunchSpec", "WorkerFailure", "WorkersFailed", "WorkersInterrupted", "launch",
           "record_failure", "watch_parent"]

_RECORD_DIR_ENV = "DLRM_RUN_FAILURE_DIR"
"""Where a worker writes its failure record (set by :func:`launch` for its workers)."""

_QUIET_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher",
                  "torch.multiprocessing")
"""The elastic agent's loggers: their warnings ("Sending process ... closing signal",
"failed (exitcode: 2)") would surround the one line the caller prints."""


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """How many workers to start where (torchrun's ``--nproc-per-node``, ``--nnodes``,
    ``--rdzv-endpoint``)."""

    nproc_per_node: int
    """Workers on this host, >= 1."""
    nnodes: int = 1
    """Hosts of the run, >= 1; every host runs the same command."""
    rdzv_endpoint: str | None = None
    """``HOST:PORT`` of the rendezvous (required with several hosts; one host: a free
    local port)."""
    run_id: str = "dlrm-run"
    """The rendezvous id every host of one run shares (several hosts only)."""

    @property
    def world_size(self) -> int:
        """Processes of the whole run."""
        return self.nproc_per_node * self.nnodes

    def check(self) -> None:
        """:class:`ConfigError` naming the flag of a bad field."""
        for flag, value in (("--nproc-per-node", self.nproc_per_node),
                            ("--nnodes", self.nnodes)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, the "
                              f"same on every host (a port free on HOST)")
        if self.rdzv_endpoint is not None:
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--rdzv-endpoint must be HOST:PORT with a port in "
                                  f"1..65535, got {self.rdzv_endpoint!r}")


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """Why one worker failed, as it wrote it before exiting."""

    rank: int
    exit_code: int
    """The exit code the worker's caller maps its error to."""
    message: str
    """One line, ready to print."""
    at: float
    """``time.time()`` when it failed: the earliest failure is the cause, the others'
    (a peer that went away) follow from it."""


class WorkersFailed(RuntimeErrorBase, RuntimeError):
    """A worker of :func:`launch` failed; ``failure`` is the first rank's record, None
    when no worker wrote one (killed by a signal, or a crash of the interpreter)."""

    def __init__(self, failure: WorkerFailure | None, detail: str) -> None:
        self.failure = failure
        super().__init__(failure.message if failure is not None else detail)


class WorkersInterrupted(KeyboardInterrupt):
    """The launcher got SIGINT or SIGTERM (Ctrl-C, ``kill``) and stopped every worker;
    ``failure`` is rank 0's record of where it stood, when it wrote one."""

    def __init__(self, signal_name: str, failure: WorkerFailure | None) -> None:
        self.signal_name = signal_name
        self.failure = failure
        super().__init__(signal_name)


def record_failure(exit_code: int, message: str) -> None:
    """In a worker of :func:`launch`: record why it fails (the launcher reports the
    first rank's record once); does nothing outside such a worker."""
    folder = os.environ.get(_RECORD_DIR_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    doc = {"rank": rank, "exit_code": int(exit_code), "message": message, "at": time.time()}
    path = Path(folder) / f"rank-{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)


def _read_failures(folder: Path) -> list[WorkerFailure]:
    failures = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            failures.append(WorkerFailure(int(doc["rank"]), int(doc["exit_code"]),
                                          str(doc["message"]), float(doc["at"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record cut short by the agent's stop: the others tell
    return sorted(failures, key=lambda f: (f.at, f.rank))


def watch_parent(poll_s: float = 1.0) -> None:
    """Make this process die when its parent does (the launcher killed by SIGKILL
    cannot stop its workers): ``PR_SET_PDEATHSIG`` on Linux, else a daemon thread that
    polls the parent's pid."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # died before the call
                    os._exit(128 + signal.SIGKILL)
                return

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(128 + signal.SIGKILL)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _worker(record_dir: str, entry: Callable[..., Any], args: tuple) -> Any:
    """What every spawned worker runs (module level: the spawn start method pickles it
    by name). The agent stops workers with SIGTERM: it interrupts the worker as Ctrl-C
    does, so that it records where it stood."""
    watch_parent()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.environ[_RECORD_DIR_ENV] = record_dir
    return entry(*args)


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    names = {name for name in logging.root.manager.loggerDict
             if name.startswith(_QUIET_LOGGERS)} | set(_QUIET_LOGGERS)
    loggers = [logging.getLogger(name) for name in sorted(names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def launch(spec: LaunchSpec, entry: Callable[..., Any], args: tuple = ()) -> dict[int, Any]:
    """Run ``entry(*args)`` on ``spec.nproc_per_node`` spawned workers of this host
    (ranks of the whole run, see the module doc) and return each local worker's
    return value by rank. ``entry`` and ``args`` must pickle (a module-level function).
    A worker that exits non-zero stops them all: :class:`WorkersFailed` with the first
    failing rank's record (see :func:`record_failure`). No restarts."""
    spec.check()
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="dlrm-run-") as scratch:
        records = Path(scratch) / "failures"
        records.mkdir()
        config = LaunchConfig(
            min_nodes=spec.nnodes, max_nodes=spec.nnodes, nproc_per_node=spec.nproc_per_node,
            logs_specs=DefaultLogsSpecs(log_dir=str(Path(scratch) / "logs")),
            run_id=spec.run_id if spec.nnodes > 1 else uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint=spec.rdzv_endpoint or "localhost:0",
            rdzv_configs={} if spec.nnodes > 1 else {"rank": 0},
            max_restarts=0, monitor_interval=0.1, start_method="spawn")
        try:
            with _quiet_agent():
                return elastic_launch(config, _worker)(str(records), entry, args)
        except ChildFailedError as exc:
            failures = _read_failures(records)
            codes = sorted({f.exitcode for f in exc.failures.values()})
            detail = (f"worker(s) {sorted(exc.failures)} ended with exit code(s) {codes} "
                      f"and left no message (killed by a signal, or out of memory?)")
            raise WorkersFailed(failures[0] if failures else None, detail) from None
        except (SignalException, KeyboardInterrupt) as exc:
            name = exc.sigval.name if isinstance(exc, SignalException) else "SIGINT"
            lead = [f for f in _read_failures(records) if f.rank == 0]
            raise WorkersInterrupted(name, lead[0] if lead else None) from None
