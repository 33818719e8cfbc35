"""Train DLRM from a plan in one process: the Python entry point behind ``dlrm-run``."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dlrm_runtime.checkpoint import (
    FORMAT_VERSION,
    PREFIX,
    check_fingerprint,
    check_not_past,
    committed_step,
    export_tables,
    fingerprint,
    import_tables,
    load_checkpoint,
    prune_checkpoints,
    Peers,
    settle_stores,
    write_run_checkpoint,
)
from dlrm_runtime.config import ModelConfig, TrainConfig
from dlrm_runtime.data import (
    VALIDATION_OFFSET,
    Batch,
    ClickSource,
    Prefetcher,
    SyntheticClicks,
)
from dlrm_runtime.embeddings import (
    CachedTables,
    CachedTablesOwner,
    RowOptimizer,
    TablePlacement,
    device_for,
    embeddings_from_plan,
    tune_malloc,
)
from dlrm_runtime.errors import (
    CheckpointError,
    ConfigError,
    PlanMismatchError,
    TrainingDivergedError,
)
from dlrm_runtime.measure import (
    PhaseTimer,
    StepPrediction,
    StepTimes,
    Stopwatch,
    accuracy,
    cpu_ticks,
    predict_step,
    roc_auc,
    steal_share,
)
from dlrm_runtime.model import DLRM
from dlrm_runtime.prepare import RunSetup, prepare_run
from planner import Plan, TablesSpec, plan_sha256


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float
    auc: float
    accuracy: float
    teacher_auc: float | None
    """AUC of the hidden teacher's probabilities, the ceiling for any model (synthetic
    data); None for real data."""
    samples: int


@dataclass(frozen=True, slots=True)
class TrainResult:
    steps: int
    batch_size: int
    train_loss: float
    """Mean loss over the last ``log_every`` steps."""
    samples_per_s: float
    """Training samples per second in this process, data generation and checkpoints
    included."""
    seconds: float
    validation: EvalResult | None
    """None when the data has no validation split."""
    resumed_from: int | None = None
    """The step of the checkpoint this run continued from."""
    checkpoint: str | None = None
    """The newest checkpoint of the run (written or resumed from)."""
    times: StepTimes | None = None
    """Measured time per step by phase (see :mod:`dlrm_runtime.measure.timing`)."""
    prediction: StepPrediction | None = None
    """What the plan predicts for the same step (see :mod:`dlrm_runtime.measure.prediction`)."""
    embedding_bytes: int = 0
    """Bytes of the embedding weights and their optimizer state held by this process."""
    notice: str | None = None
    """One line for the user about where the run started, when ``resume`` found
    nothing committed (it then starts from step 0)."""
    rank_timings: tuple[dict[str, Any], ...] = ()
    """On rank 0 of a run of several processes: every rank's measured times and the
    plan's prediction for the devices it executes (``{"measured", "predicted"}``, as in
    the metrics log's ``timing`` records), by rank; empty otherwise."""


ProgressFactory = Callable[[int], "Progress"]


class Progress:
    """What the loop reports to; the CLI passes a tqdm-backed one."""

    def update(self, steps: int, postfix: dict[str, str]) -> None:
        pass

    def close(self) -> None:
        pass


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training, with where the run stands: the step that was
    running (0-based) and the step of the last checkpoint (None: none written or
    resumed from)."""

    def __init__(self, step: int, checkpoint_step: int | None, checkpoint: str | None) -> None:
        self.step = step
        self.checkpoint_step = checkpoint_step
        self.checkpoint = checkpoint
        super().__init__(step, checkpoint_step, checkpoint)


def check_plan_matches(plan: Plan, tables: TablesSpec, plan_file: str = "the plan",
                       tables_file: str = "the tables spec") -> None:
    """The plan must have been made for exactly these tables; the error names both
    files when given."""
    if plan.tables_spec.sha256() != tables.sha256():
        ours = {t.name: t for t in tables.tables}
        theirs = {t.name: t for t in plan.tables_spec.tables}
        if ours.keys() != theirs.keys():
            missing = sorted(ours.keys() - theirs.keys())
            extra = sorted(theirs.keys() - ours.keys())
            detail = (f"tables missing from {plan_file} {missing}, unknown to {tables_file} "
                      f"{extra}")
        else:
            differ = [n for n in ours if ours[n] != theirs[n]]
            detail = (f"table {differ[0]!r} differs: {tables_file} "
                      f"{ours[differ[0]].to_json()}, {plan_file} {theirs[differ[0]].to_json()}"
                      ) if differ else "table order differs"
        raise PlanMismatchError(f"{plan_file} was made for other tables than {tables_file}: "
                                f"{detail}; re-run dlrm-plan with {tables_file}")


def build_model(plan: Plan, config: ModelConfig, seed: int = 0, *, store_dir: str | None = None,
                embedding_lr: float | None = None,
                placements: dict[str, TablePlacement] | None = None) -> DLRM:
    """DLRM with its embeddings placed as ``plan`` says and its MLPs on device 0; tables
    in a cached tier go through row caches over the table store in ``store_dir`` (see
    :func:`~dlrm_runtime.embeddings.embeddings_from_plan`)."""
    dense_device = device_for(0)
    embeddings = embeddings_from_plan(plan, dense_device, seed, store_dir=store_dir,
                                      embedding_lr=embedding_lr, placements=placements)
    dims = [t.embedding_dim for t in plan.tables_spec.tables]
    return DLRM(config, embeddings, dims, seed).dense_to(dense_device)


def dense_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """torch's fused (one kernel for all parameters) implementation."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, fused=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adagrad(params, lr=lr, fused=True)


def timed_step(timer: PhaseTimer, embeddings: CachedTablesOwner, *,
               lookup: Callable[[], list[torch.Tensor]],
               dense: Callable[[list[torch.Tensor]], float], update: Callable[[], None],
               exchanges: Stopwatch | None = None) -> float:
    """One training step split into phases on ``timer``: ``lookup`` (the pooled
    embeddings), ``dense`` (MLPs, loss, backward, dense optimizer; returns the loss) and
    ``update`` (the row optimizer). The cached tables' fused updates run inside the
    backward: their time moves from dense to update. With ``exchanges`` (the time of the
    collectives, added to it as they run), that time moves to communication."""
    updates = Stopwatch()
    with embeddings.timing_updates(updates):
        with timer.phase("lookup"):
            pooled = lookup()
        before = exchanges.seconds if exchanges is not None else 0.0
        if exchanges is not None:
            timer.move("lookup", "communication", before)
        with timer.phase("dense"):
            value = dense(pooled)
        if exchanges is not None:
            timer.move("dense", "communication", exchanges.seconds - before)
        timer.move("dense", "update", updates.seconds)
        with timer.phase("update"):
            update()
    timer.step_done()
    return value


class Trainer:
    """The training step of one model: forward, binary cross-entropy, backward, the
    dense optimizer on the MLPs and the fused row optimizer on the embeddings."""

    def __init__(self, model: DLRM, config: TrainConfig) -> None:
        self.model = model
        self.config = config
        self.device = model.mlp_layers()[0].weight.device
        self.dense_params = model.dense_parameters()
        self.dense_opt = dense_optimizer(config.dense_optimizer, self.dense_params, config.lr)
        self.row_opt = RowOptimizer.for_blocks(model.embeddings.row_blocks(), config.embedding_lr)
        model.embeddings.embedding_lr = config.embedding_lr  # cached tables: their fused update

    def step(self, batch: Batch, timer: PhaseTimer | None = None) -> float:
        """One step on ``batch``; returns its loss (read back: one sync per step).
        With ``timer``, each phase's time is added to it."""
        if timer is None:
            logits = self.model(batch.dense.to(self.device), batch.sparse)
            loss = self._backward(logits, batch)
            self.dense_opt.step()
            self.row_opt.step()
            return float(loss.detach())
        return timed_step(
            timer, self.model.embeddings,
            lookup=lambda: self.model.lookup(batch.sparse),
            dense=lambda pooled: self._dense_step(batch, pooled),
            update=self.row_opt.step)

    def _dense_step(self, batch: Batch, pooled: list[torch.Tensor]) -> float:
        logits = self.model.dense_forward(batch.dense.to(self.device), pooled)
        loss = self._backward(logits, batch)
        self.dense_opt.step()
        return float(loss.detach())

    def _backward(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels.to(self.device))
        for param in self.dense_params:  # zero_grad(set_to_none=True), without its overhead
            param.grad = None
        self.row_opt.zero_grad()
        loss.backward()
        return loss

    def state(self, plan: Plan, step: int, fingerprint: dict, recent: list[float]) -> dict:
        """Everything a checkpoint holds to continue exactly after ``step`` steps."""
        return checkpoint_state(self, export_tables(plan.tables_spec, self.row_opt), step,
                                fingerprint, recent)

    def restore(self, state: dict, path: Path) -> None:
        """Load a checkpoint's state (fingerprint already checked); this config's
        learning rates apply from here on."""
        restore_state(self, state, path)


def checkpoint_state(trainer: Trainer | Stepper, tables: dict, step: int, fingerprint: dict,
                     recent: list[float]) -> dict:
    """A checkpoint of ``trainer`` (:class:`Trainer` or a distributed one) after ``step``
    steps, with its ``tables`` assembled whole (placement-independent)."""
    model = trainer.model
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "fingerprint": fingerprint,
        "dense": {"bottom": model.bottom.state_dict(), "top": model.top.state_dict()},
        "dense_optimizer": trainer.dense_opt.state_dict(),
        "tables": tables,
        "row_optimizer_steps": trainer.row_opt.steps,
        "recent_losses": list(recent),
        "torch_rng": torch.get_rng_state(),
    }


def restore_state(trainer: Trainer | Stepper, state: dict, path: Path) -> None:
    """Load a checkpoint (fingerprint already checked) into ``trainer``'s model and
    optimizers; its config's learning rates apply from here on."""
    model, config = trainer.model, trainer.config
    try:
        model.bottom.load_state_dict(state["dense"]["bottom"])
        model.top.load_state_dict(state["dense"]["top"])
        trainer.dense_opt.load_state_dict(state["dense_optimizer"])
        import_tables(state["tables"], trainer.row_opt, path)
        trainer.row_opt.steps = int(state["row_optimizer_steps"])
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from None
    for group in trainer.dense_opt.param_groups:
        group["lr"] = config.lr
    trainer.row_opt.lr = config.embedding_lr
    model.embeddings.embedding_lr = config.embedding_lr  # cached tables: their fused update


@torch.no_grad()
def evaluate(model: DLRM, data: ClickSource, batches: int, batch_size: int) -> EvalResult:
    """Loss, AUC and accuracy over validation batches ``0..batches-1``; the teacher's
    AUC when the data has a teacher (its ``teacher_prob`` is not NaN)."""
    model.eval()
    labels, probs, teacher, losses = [], [], [], []
    device = model.mlp_layers()[0].weight.device
    for i in range(batches):
        batch = data.batch(VALIDATION_OFFSET + i, batch_size)
        logits = model(batch.dense.to(device), batch.sparse)
        losses.append(float(F.binary_cross_entropy_with_logits(logits, batch.labels.to(device))))
        labels.append(batch.labels.numpy())
        probs.append(torch.sigmoid(logits).cpu().numpy())
        teacher.append(batch.teacher_prob.numpy())
    model.train()
    y, p, q = np.concatenate(labels), np.concatenate(probs), np.concatenate(teacher)
    teacher_auc = None if np.isnan(q).any() else roc_auc(y, q)
    return EvalResult(float(np.mean(losses)), roc_auc(y, p), accuracy(y, p), teacher_auc, y.size)


def train(
    plan: Plan,
    model_config: ModelConfig = ModelConfig(),
    config: TrainConfig = TrainConfig(),
    *,
    data: ClickSource | None = None,
    progress: ProgressFactory | None = None,
    metrics_log: IO[str] | None = None,
    timing_every: int | None = None,
    setup: RunSetup | None = None,
) -> TrainResult:
    """Train for ``config.steps`` steps on ``data`` (default: synthetic clicks for the
    plan's tables and this seed), then evaluate on its validation split (skipped when
    the data has none).

    Every ``timing_every``-th step (default: every step on the CPU, every 10th on CUDA,
    where timing synchronises the device) is timed by phase; the result's ``times``
    holds the means.

    With ``config.checkpoint_dir``, checkpoints are written every
    ``config.checkpoint_every`` steps and at the end; with ``config.resume`` the run
    continues from the newest one and ends with the same weights as an uninterrupted
    run (same thread count).

    Raises :class:`ConfigError` for bad settings, :class:`PlanMismatchError` for a plan
    this runtime cannot execute, :class:`CheckpointError` for a checkpoint that is
    missing, foreign or unreadable (or a directory holding another run's), and
    :class:`TrainingDivergedError` on a NaN/inf loss, naming the step and the last
    checkpoint. ``setup``: the run as :func:`~dlrm_runtime.prepare.prepare_run` checked
    it (prepared here when not given). Tunes glibc's malloc for the process (see
    :func:`dlrm_runtime.embeddings.memory.tune_malloc`); restores torch's thread count and
    deterministic flag on return.
    """
    setup = prepare_run(plan, config, model=model_config) if setup is None else setup
    with torch_settings(config):
        return _train(setup, model_config, config, data, progress, metrics_log, timing_every)


@contextlib.contextmanager
def torch_settings(config: TrainConfig) -> Iterator[None]:
    """Apply the config's thread count and deterministic mode (and tune glibc's malloc,
    see :func:`dlrm_runtime.embeddings.memory.tune_malloc`); restore torch's settings on exit."""
    tune_malloc()
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:  # leave the process as it was
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _train(setup: RunSetup, model_config: ModelConfig, config: TrainConfig,
           data: ClickSource | None, progress: ProgressFactory | None,
           metrics_log: IO[str] | None, timing_every: int | None) -> TrainResult:
    plan = setup.plan
    torch.manual_seed(config.seed)
    data = data_for(plan, model_config, config, data)
    model = build_model(plan, model_config, config.seed, store_dir=config.store_dir,
                        embedding_lr=config.embedding_lr, placements=setup.placements)
    try:
        trainer = Trainer(model, config)
        loop = LoopSetup(
            plan, model_config, config, data, Peers(),
            save_state=lambda step, fp, recent: trainer.state(plan, step, fp, recent),
            validate=lambda: evaluate(model, data, config.eval_batches, config.batch_size),
            devices=tuple(range(plan.topology.world_size)), communication=_spans_devices(plan),
            progress=progress, metrics_log=metrics_log, timing_every=timing_every)
        return run_loop(loop, trainer)
    finally:
        model.embeddings.close()  # cached tables: the store rolls back to its checkpoint


def data_for(plan: Plan, model_config: ModelConfig, config: TrainConfig,
             data: ClickSource | None) -> ClickSource:
    """``data``, checked against the model, or synthetic clicks for the plan's tables."""
    if data is None:
        return SyntheticClicks(plan.tables_spec, model_config.dense_features, config.seed)
    if data.dense_features != model_config.dense_features:
        raise ConfigError(f"the data has {data.dense_features} dense features, the model "
                          f"config {model_config.dense_features}")
    return data


class Stepper(Protocol):
    """What :func:`run_loop` trains: :class:`Trainer`, or one rank's
    :class:`~dlrm_runtime.distributed.DistributedTrainer`."""

    model: DLRM
    config: TrainConfig
    dense_opt: torch.optim.Optimizer
    row_opt: RowOptimizer
    device: torch.device

    def step(self, batch: Batch, timer: PhaseTimer | None = None) -> float: ...

    def restore(self, state: dict, path: Path) -> None: ...


@dataclass(frozen=True, slots=True)
class LoopSetup:
    """What :func:`run_loop` needs besides the trainer."""

    plan: Plan
    model_config: ModelConfig
    config: TrainConfig
    data: ClickSource
    peers: Peers
    save_state: Callable[[int, dict, list[float]], dict | None]
    """``save_state(step, fingerprint, recent_losses)``: what to checkpoint (None on
    ranks that do not write)."""
    validate: Callable[[], EvalResult]
    devices: tuple[int, ...]
    """The plan devices this process executes (their prediction is reported)."""
    communication: bool
    """Whether pooled outputs travel between devices (predicted when true)."""
    progress: ProgressFactory | None = None
    metrics_log: IO[str] | None = None
    timing_every: int | None = None
    """Time every n-th step by phase (default: every step on the CPU, every 10th on
    CUDA, where timing synchronises the device)."""


@dataclass(slots=True)
class _Resumed:
    """Where a run starts: step, recent losses, the checkpoint it resumed from."""

    first_step: int = 0
    recent: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    checkpoint: str | None = None
    notice: str | None = None


def run_loop(loop: LoopSetup, trainer: Stepper) -> TrainResult:
    """The training loop of :func:`train` and of every rank of
    :func:`~dlrm_runtime.distributed.train_distributed`: resume, steps on prefetched
    batches, progress and metrics, checkpoints, timing against the prediction for the
    plan devices this process executes, validation."""
    config, peers = loop.config, loop.peers
    lead = peers.rank == 0
    log = loop.metrics_log if lead else None
    embeddings = trainer.model.embeddings
    store = embeddings.cached  # tables in the table store: two-phase checkpoints
    timer = PhaseTimer.for_device(trainer.device)
    timing_every = loop.timing_every or (10 if trainer.device.type == "cuda" else 1)
    run_fingerprint = fingerprint(loop.plan, loop.model_config, config)
    start_at = _resume(loop, trainer, store, run_fingerprint)
    if start_at.notice is not None and start_at.resumed_from is None:
        _log(log, {"event": "resume", "step": 0, "note": start_at.notice})
    first_step, recent, checkpoint = start_at.first_step, start_at.recent, start_at.checkpoint
    bar = loop.progress(config.steps) if loop.progress and lead else Progress()
    if first_step:
        bar.update(first_step, {"resumed": str(first_step)})

    start = time.perf_counter()
    ticks = cpu_ticks()
    step = first_step
    saved = start_at.resumed_from  # the step of the newest checkpoint
    try:
        with Prefetcher(loop.data, config.batch_size, first_step, config.steps) as batches:
            upcoming: Batch | None = None
            for step in range(first_step, config.steps):
                timed = timer if step % timing_every == 0 else None
                with timed.phase("data") if timed else contextlib.nullcontext():
                    batch = upcoming if upcoming is not None else batches.next()
                    upcoming = None
                    if store is not None and step + 1 < config.steps:
                        # the caches read the next batch's missing rows during this step
                        upcoming = batches.next()
                        embeddings.prefetch(upcoming.sparse)
                value = trainer.step(batch, timed)
                if not np.isfinite(value):  # the global loss: every rank stops here alike
                    raise TrainingDivergedError(  # right after a resume: suspect the checkpoint
                        step, value, checkpoint,
                        resumed_from=start_at.resumed_from
                        if saved == start_at.resumed_from else None)
                recent = (recent + [value])[-config.log_every:]
                done = step + 1
                if done % config.log_every == 0 or done == config.steps:
                    _report_progress(bar, log, embeddings, done, first_step, recent, start,
                                     config.batch_size, peers.world)
                if config.checkpoint_dir is not None and (
                        done == config.steps
                        or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                    state = loop.save_state(done, run_fingerprint, recent)  # may gather to rank 0
                    path = write_run_checkpoint(config.checkpoint_dir, done, state, store, peers)
                    checkpoint = str(peers.broadcast(None if path is None else str(path)))
                    saved = done
                    _log(log, {"event": "checkpoint", "step": done, "path": checkpoint})
    except KeyboardInterrupt as exc:
        if isinstance(exc, TrainingInterrupted):
            raise
        if config.checkpoint_dir is not None:  # interrupted inside a checkpoint: what committed
            with contextlib.suppress(Exception):
                on_disk = committed_step(config.checkpoint_dir, two_phase=store is not None)
                if on_disk is not None and (saved is None or on_disk > saved):
                    saved = on_disk
                    checkpoint = str(Path(config.checkpoint_dir) / f"{PREFIX}{on_disk:010d}")
        raise TrainingInterrupted(step, saved, checkpoint) from exc
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    times = replace(timer.result(), steal_share=steal_share(ticks, cpu_ticks()))
    prediction, held, ranks = _report_timing(loop, trainer, times, log)
    validation = None
    if loop.data.has_validation:
        validation = loop.validate()
        _log(log, {"event": "eval", "step": config.steps, **asdict(validation)})
    trained = config.steps - first_step
    return TrainResult(config.steps, config.batch_size,
                       float(np.mean(recent)) if recent else float("nan"),
                       trained * config.batch_size / seconds if trained else 0.0, seconds,
                       validation, start_at.resumed_from, checkpoint, times, prediction, held,
                       start_at.notice, ranks)


def _resume(loop: LoopSetup, trainer: Stepper, store: CachedTables | None,
            run_fingerprint: dict) -> _Resumed:
    """Settle the table stores on what the run committed and load the newest committed
    checkpoint into ``trainer`` when resuming (every rank alike)."""
    config, peers = loop.config, loop.peers
    committed = None
    if config.checkpoint_dir is not None:
        # rank 0 reads what the run committed; every rank settles its stores on it
        found = (committed_step(config.checkpoint_dir, two_phase=store is not None)
                 if peers.rank == 0 else None)
        committed = peers.broadcast(found)
    if store is not None:
        settle_stores(store, committed, peers)
    if committed is not None and not config.resume:
        raise CheckpointError(f"{config.checkpoint_dir} already holds checkpoints (newest "
                              f"committed: step {committed}); pass --resume to continue that "
                              f"run or choose an empty --checkpoint-dir")
    if config.checkpoint_dir is not None and peers.rank == 0 and store is not None:
        prune_checkpoints(config.checkpoint_dir, committed)  # undecided ones, older ones
    if committed is None:
        if not config.resume:
            return _Resumed()
        return _Resumed(notice=f"nothing committed in {config.checkpoint_dir}: starting from "
                               f"step 0" if config.checkpoint_dir is not None
                        else "no --checkpoint-dir to resume from: starting from step 0")
    latest = Path(config.checkpoint_dir) / f"{PREFIX}{committed:010d}"
    state = load_checkpoint(latest)  # every rank reads it: a shared directory
    check_fingerprint(state.get("fingerprint", {}), run_fingerprint, latest)
    first_step = int(state["step"])
    check_not_past(latest, first_step, config.steps)
    trainer.restore(state, latest)
    return _Resumed(first_step, [float(v) for v in state["recent_losses"]], first_step,
                    str(latest))


def _report_progress(bar: Progress, log: IO[str] | None, embeddings: CachedTablesOwner,
                     done: int, first_step: int, recent: list[float], start: float,
                     batch_size: int, world: int) -> None:
    rate = (done - first_step) * batch_size / (time.perf_counter() - start)
    postfix = {"loss": f"{np.mean(recent):.4f}", "samples/s": f"{rate:,.0f}"}
    record = {"event": "train", "step": done, "loss": float(np.mean(recent)),
              "samples_per_s": rate, "world_size": world}
    stats = embeddings.cache_stats()
    if stats is not None:
        postfix["hit"] = f"{stats['hit_rate']:.1%}"
        record["cache"] = stats
    bar.update(done, postfix)
    _log(log, record)


def _report_timing(loop: LoopSetup, trainer: Stepper, times: StepTimes, log: IO[str] | None
                   ) -> tuple[StepPrediction, int, tuple[dict[str, Any], ...]]:
    """The plan's prediction for this process's devices, the bytes it holds, and (on
    rank 0 of several processes) every rank's record, also written to the metrics log."""
    config = loop.config
    prediction = predict_step(loop.plan, loop.model_config, config.batch_size, loop.devices,
                              communication=loop.communication)
    held = embedding_bytes(trainer)
    record = {"measured": {**times.to_json(), "embedding_bytes": held},
              "predicted": prediction.to_json()}
    identity = plan_sha256(loop.plan) if loop.peers.rank == 0 else ""
    gathered = loop.peers.gather(record) or []
    for rank, mine in enumerate(gathered):
        where = {"rank": rank} if loop.peers.world > 1 else {}
        _log(log, {"event": "timing", "step": config.steps, "plan_sha256": identity,
                   "batch_size": config.batch_size, **where, **mine})
    return prediction, held, tuple(gathered) if loop.peers.world > 1 else ()


def _spans_devices(plan: Plan) -> bool:
    """Whether this process places the plan's devices on more than one torch device
    (then pooled outputs travel between them)."""
    return len({device_for(d) for d in range(plan.topology.world_size)}) > 1


def embedding_bytes(trainer: Stepper) -> int:
    """Bytes of the embedding weights and the row optimizer's state this process holds
    on its devices (for cached tables: the cached rows)."""
    embeddings = trainer.model.embeddings
    weights = sum(p.numel() * p.element_size() for p in embeddings.parameters())
    state = sum(t.numel() * t.element_size() for entry in trainer.row_opt.state
                for t in entry.values())
    cached = embeddings.cached
    return weights + state + (cached.resident_bytes() if cached is not None else 0)


def _log(out: IO[str] | None, record: dict) -> None:
    if out is not None:
        out.write(json.dumps(record) + "\n")
        out.flush()


def open_metrics_log(path: str | Path | None) -> IO[str] | None:
    if path is None:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")
