"""Writer process for the crash tests of the table store (run as a script).

``python crash_writer.py STORE MAX_STEPS [--exit-mid-step]`` opens STORE for writing
(which rolls back whatever a killed predecessor left), then for every step after the
store's checkpoint step applies :func:`apply_step` and checkpoints. It prints
``ready <step>`` once open, the phase it enters (``scatter``, ``flush``,
``checkpoint`` with the step) and ``ckpt <step>`` once a checkpoint has returned.
With ``--exit-mid-step`` it stops dead (``os._exit``) after the scatters of the
first step, before its checkpoint; ``--redo-memory BYTES`` opens the store with that
``redo_memory_bytes`` (0: every scatter spills its rows to the segment files).

The content of every step is a pure function of the step, so the parent can compute
the exact state at any checkpoint with :func:`expected_state`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import numpy.random  # noqa: F401  (imported before 'ready', not during a step)

TABLES = {
    # name: (num_rows, dim, dtype, chunk_rows, optimizer_state)
    "w": (4000, 8, "fp32", 1024, "rowwise_adagrad"),
    "b": (2000, 4, "bf16", 512, None),
}
CALLS_PER_STEP = 2


def step_writes(step: int) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(table, "weight"|"state", ids, rows) of every scatter of ``step``, in order.

    Ids repeat within a call (with equal values) and across calls (later calls win).
    """
    rng = np.random.default_rng([7, step])
    writes = []
    for call in range(CALLS_PER_STEP):
        for name, (num_rows, dim, _, _, state) in TABLES.items():
            ids = rng.integers(0, num_rows, int(rng.integers(20, 300)))
            cols = np.arange(dim, dtype=np.float32)
            base = ((step * 7 + ids * 3 + call) % 200).astype(np.float32) - 100
            rows = base[:, None] + cols[None, :] * np.float32(0.5)
            writes.append((name, "weight", ids, rows.astype(np.float32)))
            if state is not None:
                values = (step + ids.astype(np.float32) / 4096 + call).astype(np.float32)
                writes.append((name, "state", ids, values[:, None]))
    return writes


def apply_step(store: object, step: int) -> None:
    for name, role, ids, rows in step_writes(step):
        if role == "weight":
            store.scatter(name, ids, rows)  # type: ignore[attr-defined]
        else:
            store.scatter_state(name, ids, rows)  # type: ignore[attr-defined]


def expected_state(initial: dict[tuple[str, str], np.ndarray], upto_step: int,
                   start: dict[tuple[str, str], np.ndarray] | None = None,
                   from_step: int = 0) -> dict[tuple[str, str], np.ndarray]:
    """Arrays after steps ``from_step + 1 .. upto_step`` applied to ``start`` (default:
    ``initial`` at step 0). bf16 rows are compared as float32 values."""
    state = {key: value.copy() for key, value in (start or initial).items()}
    for step in range(from_step + 1, upto_step + 1):
        for name, role, ids, rows in step_writes(step):
            state[(name, role)][ids] = rows  # equal values for repeated ids within a call
    return state


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from storage.store import TableStore

    path, max_steps = argv[0], int(argv[1])
    exit_mid_step = "--exit-mid-step" in argv
    memory = ({"redo_memory_bytes": int(argv[argv.index("--redo-memory") + 1])}
              if "--redo-memory" in argv else {})
    store = TableStore.open(path, mode="r+", **memory)
    start = (store.checkpoint_step or 0) + 1
    print(f"ready {start - 1}", flush=True)
    for step in range(start, max_steps + 1):
        print(f"scatter {step}", flush=True)
        apply_step(store, step)
        if exit_mid_step:
            os._exit(3)
        if step % 3 == 0:
            print(f"flush {step}", flush=True)
            store.flush()
        print(f"checkpoint {step}", flush=True)
        store.checkpoint(step)
        print(f"ckpt {step}", flush=True)
    store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
