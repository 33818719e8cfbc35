"""Train DLRM from a plan in one process: the Python entry point behind ``dlrm-run``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F

from dlrm_runtime.config import ModelConfig, TrainConfig
from dlrm_runtime.data import VALIDATION_OFFSET, SyntheticClicks
from dlrm_runtime.embeddings import device_for, embeddings_from_plan
from dlrm_runtime.errors import PlanMismatchError, TrainingDivergedError
from dlrm_runtime.metrics import accuracy, roc_auc
from dlrm_runtime.model import DLRM
from dlrm_runtime.optim import RowOptimizer
from planner import Plan, TablesSpec


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float
    auc: float
    accuracy: float
    teacher_auc: float
    """AUC of the hidden teacher's probabilities: the ceiling for any model."""
    samples: int


@dataclass(frozen=True, slots=True)
class TrainResult:
    steps: int
    batch_size: int
    train_loss: float
    """Mean loss over the last ``log_every`` steps."""
    samples_per_s: float
    """Training samples per second, data generation included."""
    seconds: float
    validation: EvalResult


ProgressFactory = Callable[[int], "Progress"]


class Progress:
    """What the loop reports to; the CLI passes a tqdm-backed one."""

    def update(self, steps: int, postfix: dict[str, str]) -> None:  # noqa: D102
        pass

    def close(self) -> None:  # noqa: D102
        pass


def check_plan_matches(plan: Plan, tables: TablesSpec) -> None:
    """The plan must have been made for exactly these tables."""
    if plan.tables_spec.sha256() != tables.sha256():
        ours = {t.name: t for t in tables.tables}
        theirs = {t.name: t for t in plan.tables_spec.tables}
        if ours.keys() != theirs.keys():
            missing = sorted(ours.keys() - theirs.keys())
            extra = sorted(theirs.keys() - ours.keys())
            detail = f"tables missing from the plan {missing}, unknown to the spec {extra}"
        else:
            differ = [n for n in ours if ours[n] != theirs[n]]
            detail = (f"table {differ[0]!r} differs: spec {ours[differ[0]].to_json()}, "
                      f"plan {theirs[differ[0]].to_json()}") if differ else "table order differs"
        raise PlanMismatchError(f"the plan was made for other tables: {detail}; "
                                f"re-run dlrm-plan with this tables spec")


def build_model(plan: Plan, config: ModelConfig, seed: int = 0) -> DLRM:
    """DLRM with its embeddings placed as ``plan`` says."""
    dense_device = device_for(0)
    embeddings = embeddings_from_plan(plan, dense_device, seed)
    dims = [t.embedding_dim for t in plan.tables_spec.tables]
    return DLRM(config, embeddings, dims, seed).to(dense_device)


def _dense_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.Adagrad(params, lr=lr)


@torch.no_grad()
def evaluate(model: DLRM, data: SyntheticClicks, batches: int, batch_size: int) -> EvalResult:
    model.eval()
    labels, probs, teacher, losses = [], [], [], []
    device = next(model.parameters()).device
    for i in range(batches):
        batch = data.batch(VALIDATION_OFFSET + i, batch_size)
        logits = model(batch.dense.to(device), batch.sparse)
        losses.append(float(F.binary_cross_entropy_with_logits(logits, batch.labels.to(device))))
        labels.append(batch.labels.numpy())
        probs.append(torch.sigmoid(logits).cpu().numpy())
        teacher.append(batch.teacher_prob.numpy())
    model.train()
    y, p, q = np.concatenate(labels), np.concatenate(probs), np.concatenate(teacher)
    return EvalResult(float(np.mean(losses)), roc_auc(y, p), accuracy(y, p), roc_auc(y, q), y.size)


def train(
    plan: Plan,
    model_config: ModelConfig = ModelConfig(),
    config: TrainConfig = TrainConfig(),
    *,
    progress: ProgressFactory | None = None,
    metrics_log: IO[str] | None = None,
) -> TrainResult:
    """Train on synthetic data for ``config.steps`` steps, then evaluate.

    Raises :class:`ConfigError` for bad settings, :class:`PlanMismatchError` for a plan
    this runtime cannot execute, :class:`TrainingDivergedError` on a NaN/inf loss.
    """
    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = build_model(plan, model_config, config.seed)
    data = SyntheticClicks(plan.tables_spec, model_config.dense_features, config.seed)
    dense_opt = _dense_optimizer(config.dense_optimizer, model.dense_parameters(), config.lr)
    row_opt = RowOptimizer(plan.tables_spec.tables, list(model.embeddings.weights), config.embedding_lr)
    device = next(model.parameters()).device
    bar = progress(config.steps) if progress else Progress()

    recent: list[float] = []
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            batch = data.batch(step, config.batch_size)
            logits = model(batch.dense.to(device), batch.sparse)
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels.to(device))
            dense_opt.zero_grad(set_to_none=True)
            row_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            row_opt.step()
            value = float(loss.detach())  # sync point: one per step, needed for the NaN check
            if not np.isfinite(value):
                raise TrainingDivergedError(step, value)
            recent = (recent + [value])[-config.log_every:]
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                elapsed = time.perf_counter() - start
                rate = (step + 1) * config.batch_size / elapsed
                bar.update(step + 1, {"loss": f"{np.mean(recent):.4f}", "samples/s": f"{rate:,.0f}"})
                _log(metrics_log, {"event": "train", "step": step + 1, "loss": float(np.mean(recent)),
                                   "samples_per_s": rate})
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    validation = evaluate(model, data, config.eval_batches, config.batch_size)
    result = TrainResult(config.steps, config.batch_size, float(np.mean(recent)),
                         config.steps * config.batch_size / seconds, seconds, validation)
    _log(metrics_log, {"event": "eval", "step": config.steps, **asdict(validation)})
    return result


def _log(out: IO[str] | None, record: dict) -> None:
    if out is not None:
        out.write(json.dumps(record) + "\n")
        out.flush()


def open_metrics_log(path: str | Path | None) -> IO[str] | None:
    if path is None:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")
