"""One call prepares a run from a plan (:func:`prepare_run`): the preconditions of the
process count and the batch, every table's placement read and checked once, and the
table stores its cached tables need looked at, read-only, before any work. The one- and
multi-process trainers, the CLI and the Python API all start from its
:class:`RunSetup`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlrm_runtime.checkpoint import check_continues, committed_step, fingerprint
from dlrm_runtime.config import ModelConfig, TrainConfig
from dlrm_runtime.embeddings import (
    StoreTable,
    TablePlacement,
    check_store_tables,
    check_stores_at,
    placements_from_plan,
    store_tables,
)
from dlrm_runtime.errors import (
    CheckpointError,
    ConfigError,
    PeerRefusedError,
    PlanMismatchError,
)
from planner import Plan


@dataclass(frozen=True, slots=True)
class RunSetup:
    """What a run of ``plan`` executes, checked (see :func:`prepare_run`)."""

    plan: Plan
    placements: dict[str, TablePlacement]
    """Every table's shards as the plan places them, on this process's torch devices."""
    store_tables: tuple[StoreTable, ...]
    """The store tables of the cached shards (every plan device), in spec order."""
    world_size: int
    """Processes that train together (1 in one process)."""
    rank: int
    local_batch_size: int
    """Samples each process trains a step (the batch size over the world size)."""


def check_world_size(plan: Plan, world_size: int) -> None:
    """Plan device ``d`` runs on rank ``d``: the counts must agree."""
    devices = plan.topology.world_size
    if devices != world_size:
        raise PlanMismatchError(
            f"the plan has {devices} devices but torchrun started {world_size} processes (the "
            f"world size; plan device d runs on rank d): launch torchrun --nproc_per_node "
            f"{devices}, or re-plan with a --topology of {world_size} devices "
            f"(hosts x devices_per_host = {world_size})")


def check_batch_size(batch_size: int, world_size: int) -> int:
    """The per-rank batch size; :class:`ConfigError` unless ``world_size`` divides
    ``batch_size``."""
    if batch_size < world_size or batch_size % world_size:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the world size "
                          f"{world_size} (each rank takes batch_size / world_size samples); "
                          f"use a multiple of {world_size} (dlrm-run --batch-size)")
    return batch_size // world_size


def check_resume(plan: Plan, config: TrainConfig, needed: tuple[StoreTable, ...],
                 model: ModelConfig | None = None) -> None:
    """Read-only, before anything is written: the checkpoint directory's committed step
    (an unreadable decision record raises here), a directory of another run's
    checkpoints without ``resume``, with ``resume`` and ``model`` the committed
    checkpoint against this run (another run's, or past ``config.steps``), and the table
    stores against that step (see :func:`~dlrm_runtime.embeddings.check_stores_at`): a
    refused run leaves every file as it was and creates none."""
    committed = None
    if config.checkpoint_dir is not None and Path(config.checkpoint_dir).is_dir():
        committed = committed_step(config.checkpoint_dir, two_phase=bool(needed))
        if committed is not None and not config.resume:
            raise CheckpointError(f"{config.checkpoint_dir} already holds checkpoints (newest "
                                  f"committed: step {committed}); pass --resume to continue "
                                  f"that run or choose an empty --checkpoint-dir")
        if committed is not None and model is not None:
            check_continues(config.checkpoint_dir, committed, fingerprint(plan, model, config),
                            config.steps)
    if needed and config.store_dir is not None:
        check_stores_at(config.store_dir, needed, committed, config.checkpoint_dir)


def prepare_run(plan: Plan, config: TrainConfig, *, world_size: int = 1,
                rank: int = 0, model: ModelConfig | None = None) -> RunSetup:
    """Check a run of ``plan`` with ``config`` on ``world_size`` processes before any
    work: the config itself, the plan's device count against the world size (when more
    than one process), the batch against the world size, every table's shards against
    its sharding's conventions and tiers (:class:`PlanMismatchError` naming the table),
    and, for tables in a cached tier, ``config.store_dir``: it must be given, and on
    rank 0 its stores are looked at read-only (a store made for other tables is
    refused; a missing one is created when the model is built), and with a checkpoint
    directory the stores against its committed step and, given the run's ``model``,
    the committed checkpoint against the run (:func:`check_resume`)."""
    config.check()
    if world_size > 1:
        check_world_size(plan, world_size)
    local = check_batch_size(config.batch_size, world_size)
    placements = placements_from_plan(plan)
    needed = tuple(store_tables(plan.tables_spec, placements))
    if needed:
        if config.store_dir is None:
            names = sorted({t.spec.name for t in needed})
            raise ConfigError(f"the plan caches tables {names} over the table store: pass "
                              f"--store-dir DIR (created when new or empty)")
    _lead_checks(plan, config, needed, model, world_size, rank)
    return RunSetup(plan, placements, needed, world_size, rank, local)


def _lead_checks(plan: Plan, config: TrainConfig, needed: tuple[StoreTable, ...],
                 model: ModelConfig | None, world_size: int, rank: int) -> None:
    """Rank 0 looks at the stores and checkpoints (read-only, shared directories);
    with a process group, every rank waits for its verdict, so that no rank writes
    anything when rank 0 refuses the run (the others raise :class:`PeerRefusedError`)."""
    refused: str | None = None
    if rank == 0:
        try:
            if needed and config.store_dir is not None:
                check_store_tables(config.store_dir, needed)
            check_resume(plan, config, needed, model)
        except Exception as exc:  # noqa: BLE001 - re-raised once the others know
            refused = str(exc)
            if world_size == 1 or not _grouped():
                raise
            _share_verdict(refused)
            raise
    if world_size > 1 and _grouped():
        verdict = _share_verdict(refused)
        if verdict is not None:
            raise PeerRefusedError(f"rank 0 refused the run: {verdict}")


def _grouped() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _share_verdict(refused: str | None) -> str | None:
    """Rank 0's refusal (None: none) on every rank."""
    import torch.distributed as dist

    box = [refused]
    dist.broadcast_object_list(box, src=0)
    return box[0]
