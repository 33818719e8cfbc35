"""DLRM trained from a plan, in one process or over torch.distributed.

The room: :mod:`.data` (what training reads), :mod:`.embeddings` (tables built from a
plan), :mod:`.distributed` (the multi-process trainer), :mod:`.measure` (timing,
prediction, metrics), and at the top :mod:`.config`, :mod:`.model`, :mod:`.prepare` (one
call checks a run before any work), :mod:`.train` (the step and the loop),
:mod:`.checkpoint`, :mod:`.calibrate` (a topology from short measured runs) and
:mod:`.errors`.

Typical use::

    from dlrm_runtime import ModelConfig, TrainConfig, train
    result = train(read_plan("plan.json"), ModelConfig(), TrainConfig(steps=100))
"""

from dlrm_runtime import calibrate
from dlrm_runtime.config import Interaction, ModelConfig, TrainConfig, as_flag
from dlrm_runtime.data import (
    CriteoCache,
    CriteoClicks,
    SyntheticClicks,
    open_clicks,
    open_or_build_cache,
    profile_tables,
)
from dlrm_runtime.distributed import (
    DistributedTrainer,
    LaunchSpec,
    WorkerFailure,
    WorkersFailed,
    WorkersInterrupted,
    init_from_env,
    launch,
    record_failure,
    shutdown,
    train_distributed,
)
from dlrm_runtime.embeddings import (
    InMemoryEmbeddings,
    ShardedTable,
    SparseBatch,
    TableBatchedBags,
    check_store_dir,
    device_for,
    embeddings_from_plan,
    embeddings_in_memory,
    verify_stores,
)
from dlrm_runtime.errors import (
    CheckpointError,
    ConfigError,
    PeerRefusedError,
    PlanMismatchError,
    RuntimeErrorBase,
    TrainingDivergedError,
)
from dlrm_runtime.model import DLRM
from dlrm_runtime.prepare import RunSetup, prepare_run
from dlrm_runtime.train import (
    EvalResult,
    Progress,
    Trainer,
    TrainingInterrupted,
    TrainResult,
    build_model,
    check_plan_matches,
    evaluate,
    open_metrics_log,
    train,
)

__all__ = [
    "CheckpointError", "ConfigError", "CriteoCache", "CriteoClicks", "DLRM",
    "DistributedTrainer", "EvalResult", "LaunchSpec", "WorkerFailure", "WorkersFailed",
    "WorkersInterrupted", "launch", "record_failure", "InMemoryEmbeddings", "Interaction",
    "ModelConfig", "PeerRefusedError", "PlanMismatchError", "Progress", "RunSetup", "RuntimeErrorBase",
    "ShardedTable", "SparseBatch", "SyntheticClicks", "TableBatchedBags", "TrainConfig",
    "TrainResult", "Trainer", "TrainingDivergedError", "TrainingInterrupted", "as_flag",
    "build_model", "calibrate", "check_plan_matches", "check_store_dir", "device_for",
    "embeddings_from_plan", "embeddings_in_memory", "evaluate", "init_from_env",
    "open_clicks", "open_metrics_log", "open_or_build_cache", "prepare_run", "profile_tables", "shutdown",
    "train", "train_distributed", "verify_stores",
]
