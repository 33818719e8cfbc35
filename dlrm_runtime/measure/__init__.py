"""Measurement: step timing by phase (:mod:`.timing`), the plan's prediction of a step
next to it (:mod:`.prediction`) and click metrics (:mod:`.metrics`). Everything here
sits below the training loop; calibration, which trains probe models, is
:mod:`dlrm_runtime.calibrate`."""

from dlrm_runtime.measure.metrics import accuracy, roc_auc
from dlrm_runtime.measure.prediction import StepPrediction, dense_ms, plan_cost_model, predict_step
from dlrm_runtime.measure.timing import (
    PHASES,
    PhaseTimer,
    StepTimes,
    Stopwatch,
    cpu_ticks,
    steal_share,
)

__all__ = [
    "PHASES", "PhaseTimer", "StepPrediction", "StepTimes", "Stopwatch", "accuracy", "cpu_ticks",
    "dense_ms", "plan_cost_model", "predict_step", "roc_auc", "steal_share",
]
