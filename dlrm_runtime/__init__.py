"""DLRM trained from a plan: the model, embeddings built from a plan, data and the loop."""

from dlrm_runtime.collectives import init_from_env
from dlrm_runtime.config import Interaction, ModelConfig, TrainConfig
from dlrm_runtime.data import SyntheticClicks
from dlrm_runtime.distributed import DistributedTrainer, train_distributed
from dlrm_runtime.embeddings import (
    InMemoryEmbeddings,
    ShardedTable,
    TableBatchedBags,
    embeddings_from_plan,
    embeddings_in_memory,
)
from dlrm_runtime.errors import (
    CheckpointError,
    ConfigError,
    PlanMismatchError,
    RuntimeErrorBase,
    TrainingDivergedError,
)
from dlrm_runtime.model import DLRM
from dlrm_runtime.sharding import device_for
from dlrm_runtime.sparse import SparseBatch
from dlrm_runtime.train import (
    EvalResult,
    Trainer,
    TrainResult,
    build_model,
    check_plan_matches,
    evaluate,
    train,
)

__all__ = [
    "CheckpointError", "ConfigError", "DLRM", "DistributedTrainer", "EvalResult",
    "InMemoryEmbeddings", "Interaction",
    "ModelConfig", "PlanMismatchError", "RuntimeErrorBase", "ShardedTable", "SparseBatch",
    "SyntheticClicks", "TableBatchedBags", "TrainConfig", "TrainResult", "Trainer",
    "TrainingDivergedError", "build_model", "check_plan_matches", "device_for",
    "embeddings_from_plan", "embeddings_in_memory", "evaluate", "init_from_env", "train",
    "train_distributed",
]
