"""Crash trials of training with cached tables (helpers; not collected): runs of
:mod:`tests.dlrm_runtime.tiered_worker` in forked processes (torch is imported once,
so a launch costs the training only), one per rank with torchrun's environment
variables for two ranks (gloo on loopback), killed with SIGKILL at a named point of
the checkpoint protocol (``DLRM_CRASH_AT``) or at a random instant, then relaunched
with ``--resume`` until the run completes; the end state (runtime checkpoint and
every store array) must equal an uninterrupted run's bit for bit.

Used by ``tests/dlrm_runtime/test_tiered.py`` (a few trials) and
``bench/crash_trials.py`` (many).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dlrm_runtime.checkpoint import FAULT_ENV, load_checkpoint, read_decision
from dlrm_runtime.distributed import free_port
from storage import TableStore
from tests.dlrm_runtime import tiered_worker

LAUNCH_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Kill:
    """How a launch ends: ``point`` (``saved``, ``prepared``, ``decided``,
    ``committed``: the process kills itself there, at checkpoint ``step``, on rank
    ``rank`` or every rank when None), or ``after_s`` seconds after training started
    (SIGKILL of rank ``rank``, or of every rank at once when None). In a
    :func:`chain`, ``step`` None (a point) or -1 (a random instant) places the kill in
    what is left of the run."""

    point: str | None = None
    step: int | None = None
    rank: int | None = None
    after_s: float = 0.0

    def describe(self) -> str:
        who = "every rank" if self.rank is None else f"rank {self.rank}"
        if self.point is not None:
            return f"{who} at {self.point!r} of the checkpoint of step {self.step}"
        return f"{who} {self.after_s:.3f} s after training started"


@dataclass(slots=True)
class Launch:
    kill: Kill | None
    committed_before: int | None
    """The decision record's step before the launch (what it must resume from)."""
    resumed: list[int | None] = field(default_factory=list)
    """Per rank that finished: the step it resumed from."""
    killed: bool = False
    first_step: int | None = None
    """The first step this launch trained (rank 0's metrics log), None if none."""



def _child(out: str, steps: int, every: int, rank: int, world: int, port: int,
           fault: str | None) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    if world > 1:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank),
                           "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
    if fault:
        os.environ[FAULT_ENV] = fault
    result = tiered_worker.run(Path(out), steps, every=every, resume=True)
    # written whole or not at all: a kill may land while the result is written
    partial = Path(out, f"result-{rank}.json.tmp")
    partial.write_text(json.dumps({"resumed_from": result.resumed_from, "notice": result.notice}))
    os.replace(partial, Path(out, f"result-{rank}.json"))


def launch(out: Path, steps: int, every: int, world: int, kill: Kill | None,
           rng: random.Random) -> Launch:
    """One launch of every rank (with ``--resume``); returns how it went."""
    record = Launch(kill, read_decision(out / "ck") if (out / "ck").is_dir() else None)
    for rank in range(world):
        Path(out, f"result-{rank}.json").unlink(missing_ok=True)
    fault = None
    if kill is not None and kill.point is not None:
        fault = f"{kill.point}:{kill.step}" + ("" if kill.rank is None else f"@{kill.rank}")
    metrics = out / "metrics.jsonl"
    start_lines = _lines(metrics)
    context = multiprocessing.get_context("fork")
    port = free_port()
    procs = [context.Process(target=_child, args=(str(out), steps, every, r, world, port, fault))
             for r in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        if kill is not None and kill.point is None:
            while _lines(metrics) == start_lines and any(p.is_alive() for p in procs):
                if time.monotonic() > deadline:
                    raise TimeoutError("training did not start")
                time.sleep(0.002)
            time.sleep(kill.after_s)
            victims = procs if kill.rank is None else [procs[kill.rank]]
            for proc in victims:
                if proc.pid is not None:
                    _sigkill(proc.pid)
        # a rank that died leaves its peers waiting in a collective: stop them as
        # torchrun does, a moment later (each at its own instant)
        while any(p.is_alive() for p in procs):
            if any(p.exitcode is not None and p.exitcode != 0 for p in procs):
                time.sleep(rng.uniform(0.0, 0.05))
                for proc in procs:
                    if proc.is_alive() and proc.pid is not None:
                        _sigkill(proc.pid)
            if time.monotonic() > deadline:
                raise TimeoutError(f"launch did not end within {LAUNCH_TIMEOUT_S} s")
            time.sleep(0.002)
    finally:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                _sigkill(proc.pid)
            proc.join()
    record.killed = any(p.exitcode == -signal.SIGKILL for p in procs)
    record.first_step = _first_step(metrics, start_lines)
    # a peer of a killed rank may also stop on its own: gloo reports the lost connection
    bad = [p.exitcode for p in procs if p.exitcode not in (0, -signal.SIGKILL)]
    if bad and not record.killed:
        raise RuntimeError(f"a rank failed with exit code {bad[0]} (not killed)")
    for rank in range(world):
        path = Path(out, f"result-{rank}.json")
        if path.exists():
            record.resumed.append(json.loads(path.read_text())["resumed_from"])
    return record


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _first_step(path: Path, skip: int) -> int | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[skip:]
    except FileNotFoundError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by the kill
            continue
        if record.get("event") == "train":
            return int(record["step"])
    return None


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def warm_imports() -> None:
    """Import here what the children would import on their first use (torch's
    deterministic mode pulls in torch._inductor, seconds), so that forked children
    start training at once."""
    torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled())


def reference(out: Path, steps: int, every: int, world: int) -> float:
    """An uninterrupted run into ``out``; returns the seconds from its first step to
    its end (the span in which random kills are placed)."""
    warm_imports()
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    context = multiprocessing.get_context("fork")
    port = free_port()
    procs = [context.Process(target=_child, args=(str(out), steps, every, r, world, port, None))
             for r in range(world)]
    for proc in procs:
        proc.start()
    began = None
    while any(p.is_alive() for p in procs):
        if began is None and _lines(metrics) > 0:
            began = time.monotonic()
        time.sleep(0.002)
    for proc in procs:
        proc.join()
    if any(p.exitcode != 0 for p in procs) or began is None:
        raise RuntimeError("the reference run did not complete")
    return time.monotonic() - began


def final_state(out: Path) -> tuple[int | None, dict, dict[str, np.ndarray]]:
    """The committed step, the runtime checkpoint of that step, and every store array
    (``device-D/table/weight|state``)."""
    step = read_decision(out / "ck")
    state = load_checkpoint(out / "ck" / f"ckpt-{step:010d}") if step is not None else {}
    arrays: dict[str, np.ndarray] = {}
    for device in sorted((out / "store").iterdir()):
        if not device.name.startswith("device-"):
            continue
        with TableStore.open(device, mode="r") as store:
            for table in store.tables():
                arrays[f"{device.name}/{table}/weight"] = store.read_table(table)
                if store.describe(table).optimizer_state is not None:
                    arrays[f"{device.name}/{table}/state"] = store.read_table(table, state=True)
    return step, state, arrays


def differences(a: Path, b: Path) -> list[str]:
    """What differs between the end states of two runs (bitwise); empty when equal."""
    step_a, state_a, arrays_a = final_state(a)
    step_b, state_b, arrays_b = final_state(b)
    out = [] if step_a == step_b else [f"committed step {step_a} vs {step_b}"]
    tensors_a, tensors_b = dict(_tensors(state_a)), dict(_tensors(state_b))
    if tensors_a.keys() != tensors_b.keys():
        out.append("runtime checkpoints hold different entries")
    out += [f"runtime {key}" for key in tensors_a
            if key in tensors_b and not torch.equal(tensors_a[key], tensors_b[key])]
    if state_a.get("recent_losses") != state_b.get("recent_losses"):
        out.append("recent losses")
    if arrays_a.keys() != arrays_b.keys():
        out.append(f"store arrays {sorted(arrays_a)} vs {sorted(arrays_b)}")
    out += [f"store {key}" for key in arrays_a
            if key in arrays_b and arrays_a[key].tobytes() != arrays_b[key].tobytes()]
    return out


def _tensors(value: object, prefix: str = ""):
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{i}]")


def _ahead(kill: Kill, committed: int | None, steps: int, every: int,
           rng: random.Random) -> Kill:
    """``kill`` placed in what is left of the run: a named point without a step gets
    one of the checkpoints still ahead; a random instant with ``step`` -1 is scaled to
    the share of the steps still ahead."""
    start = committed or 0
    if kill.point is not None and kill.step is None:
        ahead = [s for s in range(start + 1, steps + 1) if s % every == 0 or s == steps]
        return Kill(point=kill.point, step=rng.choice(ahead), rank=kill.rank)
    if kill.point is None and kill.step == -1:
        return Kill(after_s=kill.after_s * (steps - start) / steps, rank=kill.rank)
    return kill


def chain(out: Path, kills: list[Kill], steps: int, every: int, world: int,
          rng: random.Random, max_extra: int = 20) -> list[Launch]:
    """Launch with each of ``kills`` in turn (each relaunch resumes; kills left when
    the run has completed are not used), then launch without a kill until the run
    completes. Checks after every launch that every
    launch resumed from the step committed before it (the first step it trained, and
    the ``resumed_from`` of every rank that finished)."""
    warm_imports()
    out.mkdir(parents=True, exist_ok=True)
    launches = []
    for kill in [*kills, *[None] * max_extra]:
        committed = read_decision(out / "ck") if (out / "ck").is_dir() else None
        if committed == steps:
            if not launches or not launches[-1].killed:
                return launches  # complete: the kills left have nothing to hit
            kill = None  # killed after the last decision: the relaunch settles the stores
        if kill is not None:
            kill = _ahead(kill, committed, steps, every, rng)
        done = launch(out, steps, every, world, kill, rng)
        launches.append(done)
        start = (done.committed_before or 0) + 1
        if done.first_step is not None and done.first_step != start:
            raise AssertionError(f"launch {len(launches)} trained from step {done.first_step}, "
                                 f"the run had committed {done.committed_before} ({kill})")
        for resumed in done.resumed:
            if resumed != done.committed_before:
                raise AssertionError(f"a rank resumed from {resumed}, the run had committed "
                                     f"{done.committed_before} ({kill})")
        if kill is None and not done.killed:
            return launches
    raise AssertionError("the run did not complete")
