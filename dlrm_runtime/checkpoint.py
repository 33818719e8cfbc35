"""Training checkpoints: written atomically, refused when they come from another run.

Layout: ``<dir>/ckpt-<step, 10 digits>/`` holding ``state.pt`` (``torch.save``) and
``meta.json`` (step, fingerprint, time; for people). A checkpoint directory appears
only by an atomic rename of a complete, fsynced temporary directory
(``<dir>/.tmp-*``), and older checkpoints are removed only after the new one is in
place, so a process killed at any instant leaves the previous complete checkpoint or
the new one, never a torn one; leftovers of a killed writer are removed by the next.

Tables in a cached tier (:mod:`dlrm_runtime.embeddings.cached`) are not saved here: their
weights and optimizer state live in the table stores (one per plan device), which
the runtime checkpoint must commit together with. A checkpoint of a run with cached
tables is therefore one transaction over every rank's stores and the runtime
checkpoint (two-phase commit, rank 0 the coordinator):

1. rank 0 writes ``ckpt-<S>`` (the previous one stays); every rank *prepares* its
   stores at S (dirty cached rows written back and fsynced, undo records kept:
   :meth:`storage.TableStore.prepare`);
2. all ranks agree that every part is prepared (a collective);
3. rank 0 writes the decision record ``committed.json`` ``{"step": S}`` (temporary
   file, fsync, atomic rename, fsync of the directory): the commit point;
4. after a second collective every rank commits its stores, and rank 0 removes the
   other checkpoints.

On start (:func:`committed_step`, then ``CachedTables.recover``) the decision record
names the step the run committed, D: a store prepared at D rolls forward, one
prepared at another step rolls back, and ``ckpt-<D>`` is resumed; checkpoints other
than D are removed. A crash at any instant (of one rank or all) therefore resumes
every rank at the same step; with no decision record nothing was committed and the
run starts from step 0. Runs without cached tables have one part only: their newest
complete ``ckpt-*`` is their committed step.

:func:`fault_point` kills the process at a named point of this protocol when the
environment variable ``DLRM_CRASH_AT`` asks for it (crash tests and
``bench/crash_trials.py``).

Embedding tables are saved independently of their placement: per table the whole
weight and the whole per-row (Adagrad) or per-element (Adam) optimizer state,
assembled from the blocks that hold them. The rest is the dense (MLP) weights and
optimizer state, the step (batches are a pure function of ``(seed, index)``, so the
step is the data position), the row optimizer's step count, the recent losses, the
torch RNG state, and the run's fingerprint.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dlrm_runtime.config import ModelConfig, TrainConfig
from dlrm_runtime.embeddings import TORCH_DTYPE, CachedTables, RowOptimizer, Segment
from dlrm_runtime.errors import CheckpointError
from dlrm_runtime.files import fsync_dir, write_atomic
from planner import Plan, TablesSpec

FORMAT_VERSION = 1
DECISION_FILE = "committed.json"
FAULT_ENV = "DLRM_CRASH_AT"
"""``POINT[:STEP][@RANK]``: :func:`fault_point` SIGKILLs the process at POINT (of the
checkpoint of STEP; on rank RANK) when set."""
FAULT_POINTS = ("saved", "prepared", "decided", "committed")
"""In protocol order: rank 0's runtime checkpoint written; this rank's stores
prepared; the decision record written (rank 0); this rank's stores committed."""
PREFIX = "ckpt-"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


def fingerprint(plan: Plan, model: ModelConfig, config: TrainConfig) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run: the plan's inputs (tables,
    topology, cost model), the model config, and what decides the data stream and the
    shape of the optimizer state (seed, batch size, dense optimizer). Learning rates
    and step counts may change on resume."""
    model_doc = asdict(model)
    model_doc["interaction"] = model.interaction.value
    model_doc["bottom_mlp"] = list(model.bottom_mlp)
    model_doc["top_mlp"] = list(model.top_mlp)
    return {
        "plan_inputs_sha256": plan.inputs_sha256,
        "model": model_doc,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "dense_optimizer": config.dense_optimizer,
    }


def check_fingerprint(saved: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    differ = [key for key in sorted(set(saved) | set(expected)) if saved.get(key) != expected.get(key)]
    if differ:
        detail = "; ".join(f"{key}: {_short(saved.get(key))} there, {_short(expected.get(key))} here"
                           for key in differ)
        raise CheckpointError(f"checkpoint {path} comes from another run ({detail}); use its "
                              f"settings, or another --checkpoint-dir to start afresh")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:12] + "..."


# ---------------------------------------------------------------- directory


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        if entry.name.startswith(PREFIX) and entry.is_dir():
            try:
                found.append((int(entry.name[len(PREFIX):]), entry))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _discard(path: Path) -> None:
    """Rename out of sight first (atomic), then delete: a kill mid-delete leaves only
    a ``.trash-*`` leftover, never a partial ``ckpt-*``."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.name.startswith((".tmp-", ".trash-")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def checkpoint_of_step(directory: str | Path, step: int) -> Path | None:
    """The complete checkpoint of ``step`` in ``directory``, if there is one."""
    for found, path in list_checkpoints(directory):
        if found == step:
            return path
    return None


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any],
                    keep: int | None = 1) -> Path:
    """Write ``state`` as the checkpoint of ``step``; then drop older checkpoints but
    the newest ``keep`` (this one included; None: drop none)."""
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(directory)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    with open(tmp / STATE_FILE, "wb") as out:
        torch.save(state, out)
        out.flush()
        os.fsync(out.fileno())
    meta = {"format": FORMAT_VERSION, "step": step, "fingerprint": state["fingerprint"],
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(tmp / META_FILE, "w", encoding="utf-8") as out:
        out.write(json.dumps(meta, indent=1) + "\n")
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(tmp)
    final = directory / f"{PREFIX}{step:010d}"
    if final.exists():  # the same step written again (a rerun); replace it
        _discard(final)
    os.replace(tmp, final)
    fsync_dir(directory)
    others = [path for _, path in list_checkpoints(directory) if path != final]
    for older in [] if keep is None else others[:max(0, len(others) - (keep - 1))]:
        _discard(older)
    return final


def prune_checkpoints(directory: str | Path, keep_step: int | None) -> None:
    """Remove every checkpoint but the one of ``keep_step`` (all when None), and
    leftovers of killed writers."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    _remove_leftovers(directory)
    for step, path in list_checkpoints(directory):
        if step != keep_step:
            _discard(path)


# ---------------------------------------------------------------- the decision record


def read_decision(directory: str | Path) -> int | None:
    """The step of the decision record in ``directory`` (None: none, nothing was
    committed)."""
    path = Path(directory) / DECISION_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return int(doc["step"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"decision record {path} is unreadable ({exc}); the run's "
                              f"committed step is unknown: restore it from a backup") from None


def write_decision(directory: str | Path, step: int) -> None:
    """Commit the checkpoint of ``step``: atomically replace the decision record."""
    record = {"format": FORMAT_VERSION, "step": step,
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(Path(directory) / DECISION_FILE, (json.dumps(record) + "\n").encode())


def committed_step(directory: str | Path, *, two_phase: bool) -> int | None:
    """The newest step the run in ``directory`` committed: the decision record's for
    a run with cached tables (``two_phase``), else the newest complete checkpoint's."""
    if two_phase:
        return read_decision(directory)
    found = list_checkpoints(directory)
    return found[-1][0] if found else None


def check_continues(directory: str | Path, step: int, expected: dict[str, Any],
                    steps: int) -> None:
    """Read-only, before any work: the checkpoint of ``step`` in ``directory`` belongs
    to the run of fingerprint ``expected`` (:func:`fingerprint`) and is not past
    ``steps``, from its ``meta.json``; :class:`CheckpointError` otherwise. A checkpoint
    without a readable ``meta.json`` is left to :func:`load_checkpoint`."""
    path = Path(directory) / f"{PREFIX}{step:010d}"
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(meta, dict) and isinstance(meta.get("fingerprint"), dict):
        check_fingerprint(meta["fingerprint"], expected, path)
    check_not_past(path, step, steps)


def check_not_past(path: Path, step: int, steps: int) -> None:
    if step > steps:
        raise CheckpointError(f"checkpoint {path} is at step {step}, past the {steps} steps "
                              f"asked for; ask for more steps")


def fault_point(name: str, step: int, rank: int) -> None:
    """SIGKILL this process here when :data:`FAULT_ENV` names this point (and step,
    and rank); a testing aid for the crash trials, a no-op otherwise."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    where, _, who = wanted.partition("@")
    point, _, at = where.partition(":")
    if point == name and (not at or int(at) == step) and (not who or int(who) == rank):
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format "
                              f"{state.get('format') if isinstance(state, dict) else '?'}; "
                              f"this version reads {FORMAT_VERSION}")
    return state


# ---------------------------------------------------------------- embedding tables


TablePiece = tuple[Segment, torch.Tensor, dict[str, torch.Tensor]]
"""One segment of a block: its rows of the weight and of each optimizer state tensor."""


def table_pieces(row_opt: RowOptimizer, skip: set[int] = frozenset()) -> list[TablePiece]:
    """Every segment of the row optimizer's blocks with its rows (copies on the CPU),
    except blocks whose weight's ``id`` is in ``skip``."""
    pieces = []
    for block, state in zip(row_opt.blocks, row_opt.state):
        if id(block.weight) in skip:
            continue
        weight = block.weight.detach()
        for seg in block.segments:
            rows = slice(seg.block_row, seg.block_row + seg.rows)
            pieces.append((seg, weight[rows].cpu().clone(),
                           {key: tensor[rows].cpu().clone() for key, tensor in state.items()}))
    return pieces


def assemble_tables(tables: TablesSpec, pieces: Iterable[TablePiece]
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """Per table: the whole ``weight`` and optimizer state, put together from its pieces."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    specs = {spec.name: spec for spec in tables.tables}
    for seg, weight, state in pieces:
        spec = specs[seg.table]
        entry = out.get(seg.table)
        if entry is None:
            shape = (spec.num_embeddings, spec.embedding_dim)
            entry = {"weight": torch.empty(shape, dtype=TORCH_DTYPE[spec.dtype])}
            for key, tensor in state.items():
                entry[key] = torch.empty(shape[:tensor.dim()], dtype=tensor.dtype)
            out[seg.table] = entry
        rows = slice(seg.row_start, seg.row_start + seg.rows)
        cols = slice(seg.col_start, seg.col_start + seg.cols)
        entry["weight"][rows, cols] = weight
        for key, tensor in state.items():
            if tensor.dim() == 1:  # per row; column shards hold identical copies
                entry[key][rows] = tensor
            else:
                entry[key][rows, cols] = tensor
    return out


def export_tables(tables: TablesSpec, row_opt: RowOptimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Per table: the whole ``weight`` and optimizer state, on the CPU, assembled from
    the blocks (whole tables, batched tables, shards) that hold them."""
    return assemble_tables(tables, table_pieces(row_opt))


def import_tables(saved: dict[str, dict[str, torch.Tensor]], row_opt: RowOptimizer,
                  path: Path) -> None:
    """Write saved tables into the blocks, whatever their placement."""
    with torch.no_grad():
        for block, state in zip(row_opt.blocks, row_opt.state):
            for seg in block.segments:
                entry = saved.get(seg.table)
                if entry is None or set(entry) != {"weight", *state}:
                    raise CheckpointError(f"checkpoint {path}: table {seg.table!r} is missing "
                                          f"or has other optimizer state")
                rows_b = slice(seg.block_row, seg.block_row + seg.rows)
                rows_t = slice(seg.row_start, seg.row_start + seg.rows)
                cols_t = slice(seg.col_start, seg.col_start + seg.cols)
                block.weight[rows_b] = entry["weight"][rows_t, cols_t]
                for key, tensor in state.items():
                    if tensor.dim() == 1:
                        tensor[rows_b] = entry[key][rows_t]
                    else:
                        tensor[rows_b] = entry[key][rows_t, cols_t]


# ---------------------------------------------------------------- the run's protocol


@dataclass(frozen=True, slots=True)
class Peers:
    """The processes that train together (just this one by default). Rank 0 decides
    which checkpoint to resume, writes the metrics log, the progress bar and the
    checkpoints; the others follow."""

    rank: int = 0
    world: int = 1

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a collective: also a barrier)."""
        if self.world == 1:
            return ok
        flags = [None] * self.world
        torch.distributed.all_gather_object(flags, bool(ok))
        return all(flags)

    def gather(self, value: object) -> list[object] | None:
        """Every rank's ``value`` in rank order on rank 0; None on the others."""
        if self.world == 1:
            return [value]
        out: list[object] | None = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(value, out, dst=0)
        return out


def write_run_checkpoint(directory: str, step: int, state: dict | None,
                         stores: CachedTables | None, peers: Peers) -> Path | None:
    """The run's checkpoint of ``step``: without table stores one part, committed by the
    checkpoint's atomic rename on rank 0; with them one transaction over rank 0's
    runtime checkpoint and every rank's stores. Returns the path on rank 0."""
    if stores is None:
        return save_checkpoint(directory, step, state) if peers.rank == 0 else None
    return _commit_two_phase(directory, step, state, stores, peers)


def _commit_two_phase(directory: str, step: int, state: dict | None, stores: CachedTables,
                      peers: Peers) -> Path | None:
    """The checkpoint of ``step`` as one transaction over rank 0's runtime checkpoint
    and every rank's table stores (see :mod:`dlrm_runtime.checkpoint`); returns the
    runtime checkpoint's path on rank 0."""
    lead = peers.rank == 0
    path, failure = None, None
    try:
        if lead:
            path = save_checkpoint(directory, step, state, keep=None)  # not yet decided
            fault_point("saved", step, peers.rank)
        stores.prepare(step)
        fault_point("prepared", step, peers.rank)
    except Exception as exc:  # noqa: BLE001 - every rank must reach the vote below
        failure = exc
    if not peers.all_ok(failure is None):  # every part prepared, or the step is abandoned
        raise CheckpointError(f"checkpoint of step {step} abandoned: "
                              f"{failure or 'another rank failed to prepare it'}; the run's "
                              f"last committed checkpoint stays") from failure
    if lead:
        write_decision(directory, step)  # the commit point
        fault_point("decided", step, peers.rank)
    peers.all_ok(True)  # the decision is durable before any store commits
    stores.commit(step)
    fault_point("committed", step, peers.rank)
    if lead:
        prune_checkpoints(directory, step)
    return path


def settle_stores(stores: CachedTables, committed: int | None, peers: Peers) -> None:
    """Every rank settles its table stores on ``committed``, the run's newest committed
    step (see :meth:`~dlrm_runtime.embeddings.CachedTables.recover`); all ranks stop
    alike when one cannot."""
    failure = None
    try:
        stores.recover(committed)
    except CheckpointError as exc:
        failure = exc
    if not peers.all_ok(failure is None):  # every rank stops alike
        raise failure or CheckpointError("another rank's table store does not match the "
                                         "run's committed checkpoint (see its message)")
