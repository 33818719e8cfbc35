"""Measurement: step timing by phase (:mod:`.timing`), the plan's prediction of a step
next to it (:mod:`.prediction`), click metrics (:mod:`.metrics`) and calibration of a
topology from measured rates (:mod:`.calibrate`, which trains probe models: it sits
above the training loop and loads when first used)."""

from typing import Any

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

_CALIBRATE = ("Calibration", "CalibrationSizes", "combine", "measure", "spreads", "to_topology")

__all__ = [
    "PHASES", "PhaseTimer", "StepPrediction", "StepTimes", "Stopwatch", "accuracy", "cpu_ticks",
    "dense_ms", "plan_cost_model", "predict_step", "roc_auc", "steal_share", *_CALIBRATE,
]


def __getattr__(name: str) -> Any:
    if name in _CALIBRATE:
        from dlrm_runtime.measure import calibrate

        return getattr(calibrate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
