"""DLRM trained from a plan: the model, embeddings built from a plan, data and the loop."""

from dlrm_runtime.config import Interaction, ModelConfig, TrainConfig
from dlrm_runtime.data import SyntheticClicks
from dlrm_runtime.embeddings import embeddings_from_plan, embeddings_in_memory
from dlrm_runtime.errors import (
    ConfigError,
    PlanMismatchError,
    RuntimeErrorBase,
    TrainingDivergedError,
)
from dlrm_runtime.model import DLRM
from dlrm_runtime.sparse import SparseBatch
from dlrm_runtime.train import (
    EvalResult,
    TrainResult,
    build_model,
    check_plan_matches,
    evaluate,
    train,
)

__all__ = [
    "ConfigError", "DLRM", "EvalResult", "Interaction", "ModelConfig", "PlanMismatchError",
    "RuntimeErrorBase", "SparseBatch", "SyntheticClicks", "TrainConfig", "TrainResult",
    "TrainingDivergedError", "build_model", "check_plan_matches", "embeddings_from_plan",
    "embeddings_in_memory", "evaluate", "train",
]
