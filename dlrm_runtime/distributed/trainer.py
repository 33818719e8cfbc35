"""The training step of one rank (:class:`DistributedTrainer`) and
:func:`train_distributed`, :func:`dlrm_runtime.train` on every rank of a process group."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dlrm_runtime.checkpoint import Peers, assemble_tables, table_pieces
from dlrm_runtime.config import ModelConfig, TrainConfig
from dlrm_runtime.data.batches import VALIDATION_OFFSET, Batch, ClickSource
from dlrm_runtime.distributed.collectives import ProcessGroupInfo, process_group_info
from dlrm_runtime.distributed.jobs import check_ids, local_batch
from dlrm_runtime.distributed.model_parallel import DistributedEmbeddings, DistributedRowOptimizer
from dlrm_runtime.measure.metrics import accuracy, roc_auc
from dlrm_runtime.measure.timing import PhaseTimer, Stopwatch
from dlrm_runtime.model import DLRM
from dlrm_runtime.prepare import RunSetup, prepare_run
from dlrm_runtime.train import (
    EvalResult,
    LoopSetup,
    ProgressFactory,
    TrainResult,
    checkpoint_state,
    data_for,
    dense_optimizer,
    restore_state,
    run_loop,
    timed_step,
    torch_settings,
)
from planner import Plan


class DistributedTrainer:
    """The training step of one rank, with :class:`~dlrm_runtime.train.Trainer`'s
    interface: ``step(batch)`` takes the GLOBAL batch (the same on every rank), trains
    on this rank's slice and returns the global mean loss (the same on every rank).

    Built inside an initialised process group (see
    :func:`~dlrm_runtime.distributed.init_from_env`); raises
    :class:`PlanMismatchError` when the plan's device count is not the world size and
    :class:`ConfigError` when the world size does not divide ``config.batch_size``.
    """

    def __init__(self, plan: Plan, model_config: ModelConfig, config: TrainConfig,
                 info: ProcessGroupInfo | None = None, setup: RunSetup | None = None) -> None:
        info = info or process_group_info()
        if setup is None:
            setup = prepare_run(plan, config, world_size=info.world_size, rank=info.rank)
        self.plan = plan
        self.config = config
        self.info = info
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        self.embeddings = DistributedEmbeddings(plan, info.rank, info.world_size, info.device,
                                                config.seed, store_dir=config.store_dir,
                                                embedding_lr=config.embedding_lr,
                                                placements=setup.placements)
        dims = [t.embedding_dim for t in plan.tables_spec.tables]
        self.model = DLRM(model_config, self.embeddings, dims, config.seed).dense_to(info.device)
        self.dense_params = self.model.dense_parameters()
        self.dense_opt = dense_optimizer(config.dense_optimizer, self.dense_params, config.lr)
        self.row_opt = DistributedRowOptimizer.for_embeddings(self.embeddings, config.embedding_lr)

    def step(self, batch: Batch, timer: PhaseTimer | None = None) -> float:
        """One step on this rank's slice of the global ``batch``; one all-reduce of
        every dense gradient and the loss; returns the global mean loss. With
        ``timer``, each phase's time on this rank is added to it, the exchanges and
        the all-reduce counted as communication."""
        check_ids(self.plan.tables_spec.tables, batch.sparse)
        local = local_batch(batch, self.rank, self.world)
        if timer is None:
            logits = self.model(local.dense.to(self.device), local.sparse)
            value = self._backward(logits, local)
            self.dense_opt.step()
            self.row_opt.step()
            return value
        clock = self.embeddings.clock = Stopwatch()  # the exchanges: communication
        try:
            return timed_step(
                timer, self.embeddings,
                lookup=lambda: self.model.lookup(local.sparse),
                dense=lambda pooled: self._dense_step(local, pooled, clock),
                update=self.row_opt.step, exchanges=clock)
        finally:
            self.embeddings.clock = None

    def _dense_step(self, local: Batch, pooled: list[torch.Tensor], clock: Stopwatch) -> float:
        logits = self.model.dense_forward(local.dense.to(self.device), pooled)
        value = self._backward(logits, local, clock)
        self.dense_opt.step()
        return value

    def _backward(self, logits: torch.Tensor, local: Batch, clock: Stopwatch | None = None) -> float:
        loss = F.binary_cross_entropy_with_logits(logits, local.labels.to(self.device))
        for param in self.dense_params:
            param.grad = None
        self.row_opt.zero_grad()
        # gradients of local_mean / W, summed over ranks, are those of the global mean
        (loss / self.world).backward()
        if clock is None:
            return self._all_reduce(loss.detach())
        with clock.timing():
            return self._all_reduce(loss.detach())

    def _all_reduce(self, loss: torch.Tensor) -> float:
        """Sum the MLP gradients, the replicas' gradients and the loss over the ranks in
        one flat all-reduce; write them back; return the global mean loss."""
        replicas = self.embeddings.replica_grads()
        parts = [p.grad.reshape(-1) for p in self.dense_params]  # type: ignore[union-attr]
        parts += [r.reshape(-1) for r in replicas]
        parts.append(loss.float().reshape(1))
        flat = torch.cat(parts)
        dist.all_reduce(flat)  # the step's one sync point besides the exchanges
        at = 0
        for param in self.dense_params:
            n = param.numel()
            param.grad = flat[at:at + n].view_as(param)
            at += n
        summed = []
        for r in replicas:
            summed.append(flat[at:at + r.numel()].view_as(r))
            at += r.numel()
        self.embeddings.set_replica_grads(summed)
        return float(flat[at]) / self.world

    # ------------------------------------------------------------ checkpoints

    def gather_tables(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Every table whole with its optimizer state, on rank 0 (None elsewhere), as
        :func:`dlrm_runtime.checkpoint.export_tables` lays it out. A collective."""
        # replicas are identical on every rank: rank 0's copy
        skip = self.embeddings.replica_weights() if self.rank != 0 else set()
        pieces = table_pieces(self.row_opt, skip)
        gathered: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(pieces, gathered, dst=0)
        if gathered is None:
            return None
        return assemble_tables(self.plan.tables_spec,
                               (piece for rank_pieces in gathered for piece in rank_pieces))

    def state(self, step: int, run_fingerprint: dict, recent: list[float]) -> dict | None:
        """On rank 0, what :meth:`dlrm_runtime.train.Trainer.state` returns for the same
        model (so either runtime resumes it); None on the other ranks. A collective."""
        tables = self.gather_tables()
        if self.rank != 0:
            return None
        return checkpoint_state(self, tables, step, run_fingerprint, recent)

    def restore(self, state: dict, path: Path) -> None:
        """Load a checkpoint (fingerprint already checked) into this rank's part; this
        config's learning rates apply from here on."""
        restore_state(self, state, path)


# ---------------------------------------------------------------- evaluation and the loop


@torch.no_grad()
def evaluate_distributed(trainer: DistributedTrainer, data: Any, batches: int,
                         batch_size: int) -> EvalResult:
    """:func:`dlrm_runtime.train.evaluate` over the ranks: each rank scores its slice,
    the logits are all-gathered, and every rank computes the same result."""
    model, world, device = trainer.model, trainer.world, trainer.device
    model.eval()
    labels, probs, teacher, losses = [], [], [], []
    try:
        for i in range(batches):
            batch = data.batch(VALIDATION_OFFSET + i, batch_size)
            check_ids(trainer.plan.tables_spec.tables, batch.sparse)
            local = local_batch(batch, trainer.rank, world)
            mine = model(local.dense.to(device), local.sparse).float().contiguous()
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            logits = torch.cat(gathered).cpu()
            losses.append(float(F.binary_cross_entropy_with_logits(logits, batch.labels)))
            labels.append(batch.labels.numpy())
            probs.append(torch.sigmoid(logits).numpy())
            teacher.append(batch.teacher_prob.numpy())
    finally:
        model.train()
    y, p, q = np.concatenate(labels), np.concatenate(probs), np.concatenate(teacher)
    teacher_auc = None if np.isnan(q).any() else roc_auc(y, q)
    return EvalResult(float(np.mean(losses)), roc_auc(y, p), accuracy(y, p), teacher_auc,  # type: ignore[arg-type]
                      y.size)


def train_distributed(
    plan: Plan,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    data: ClickSource | None = None,
    progress: ProgressFactory | None = None,
    metrics_log: IO[str] | None = None,
    setup: RunSetup | None = None,
) -> TrainResult:
    """:func:`dlrm_runtime.train` on every rank of the initialised process group: the
    same steps, losses, checkpoints and validation as one process (to float
    tolerance). Call it on every rank with the same arguments; only rank 0 reports to
    ``progress`` and ``metrics_log`` and writes checkpoints. ``samples_per_s`` counts
    the global batch. Checkpoints gather every table to rank 0 in the one-process
    format (a run resumes with any process count); every rank reads the checkpoint it
    resumes from, so ``checkpoint_dir`` must be visible to all ranks.

    Raises :class:`PlanMismatchError` when the plan's device count is not the world
    size, :class:`ConfigError` when the world size does not divide the batch size, and
    otherwise what :func:`dlrm_runtime.train` raises, on every rank alike.
    """
    info = process_group_info()
    if setup is None:
        setup = prepare_run(plan, config, world_size=info.world_size, rank=info.rank,
                            model=model_config)
    with torch_settings(config):
        return _train_distributed(setup, info, model_config, config, data, progress,
                                  metrics_log)


def _train_distributed(setup: RunSetup, info: ProcessGroupInfo, model_config: ModelConfig,
                       config: TrainConfig, data: ClickSource | None,
                       progress: ProgressFactory | None,
                       metrics_log: IO[str] | None) -> TrainResult:
    plan = setup.plan
    torch.manual_seed(config.seed)
    trainer = DistributedTrainer(plan, model_config, config, info, setup)
    try:
        data = data_for(plan, model_config, config, data)
        loop = LoopSetup(
            plan, model_config, config, data, Peers(trainer.rank, trainer.world),
            save_state=trainer.state,
            validate=lambda: evaluate_distributed(trainer, data, config.eval_batches,
                                                  config.batch_size),
            devices=(trainer.rank,), communication=True, progress=progress,
            metrics_log=metrics_log)
        return run_loop(loop, trainer)
    finally:
        trainer.embeddings.close()  # cached tables: the store rolls back to its checkpoint
