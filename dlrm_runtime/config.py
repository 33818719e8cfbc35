"""Model and training configuration."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dlrm_runtime.errors import ConfigError


class Interaction(enum.Enum):
    DOT = "dot"
    """Pairwise dot products among [bottom output, table 0, ..., table T-1]."""
    CAT = "cat"
    """Plain concatenation."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """DLRM's dense parts; the embedding tables come from the tables spec or plan."""

    dense_features: int = 13
    """Number of dense (continuous) input features."""
    bottom_mlp: tuple[int, ...] = (64, 16)
    """Bottom MLP layer widths; for ``dot`` the last equals the embedding dim."""
    top_mlp: tuple[int, ...] = (64, 1)
    """Top MLP layer widths; the last must be 1 (the click logit)."""
    interaction: Interaction = Interaction.DOT

    def check(self, embedding_dims: tuple[int, ...]) -> None:
        """Raise :class:`ConfigError` when the layer sizes cannot work with the tables."""
        if self.dense_features < 1:
            raise ConfigError(f"dense_features must be >= 1, got {self.dense_features}")
        for name, layers in (("bottom_mlp", self.bottom_mlp), ("top_mlp", self.top_mlp)):
            if not layers or any(w < 1 for w in layers):
                raise ConfigError(f"{name} needs one or more positive widths, got {list(layers)}")
        if self.top_mlp[-1] != 1:
            raise ConfigError(f"top_mlp must end with 1 (the logit), got {list(self.top_mlp)}")
        if self.interaction is Interaction.DOT:
            dims = set(embedding_dims) | {self.bottom_mlp[-1]}
            if len(dims) != 1:
                raise ConfigError(
                    f"dot interaction needs one width for the bottom MLP output "
                    f"({self.bottom_mlp[-1]}) and every table (dims {sorted(set(embedding_dims))});"
                    f" set the bottom MLP's last width to the tables' dim or use --interaction cat")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 256
    lr: float = 0.05
    """Dense (MLP) learning rate."""
    embedding_lr: float = 0.05
    """Embedding learning rate (SGD or row-wise Adagrad, from the tables spec)."""
    dense_optimizer: str = "adagrad"
    """``sgd``, ``adagrad`` or ``adam``."""
    eval_batches: int = 20
    log_every: int = 50
    seed: int = 0
    threads: int | None = None
    checkpoint_dir: str | None = None
    """Directory of this run's checkpoints (``ckpt-<step>/`` subdirectories; only the
    newest complete one is kept). With it, a checkpoint is also written at the end."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0: only at the end. Needs ``checkpoint_dir``."""
    resume: bool = False
    """Continue from the newest checkpoint in ``checkpoint_dir`` (it must exist and
    come from the same plan inputs, model config, seed, batch size and dense
    optimizer); the learning rates of this config apply from there on."""
    store_dir: str | None = None
    """Directory of the table store that holds the tables planned in a cached tier
    (``dram_cache``, ``store_cache``): created with the tables' initial values when
    missing or empty, else opened as it is (at its last checkpoint). Needed only when
    the plan caches a table."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)`` while training: an op without a
    deterministic implementation raises instead of running. On the CPU every op of
    the training step is already deterministic for a fixed thread count (results
    depend on the thread count through matmul blocking, so fix ``threads`` too); the
    flag matters on CUDA, where it also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in
    the environment before CUDA starts."""

    def check(self) -> None:
        for name in ("steps", "batch_size", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.checkpoint_dir is None:
            if self.resume:
                raise ConfigError("resume needs checkpoint_dir (--checkpoint-dir)")
            if self.checkpoint_every:
                raise ConfigError("checkpoint_every needs checkpoint_dir (--checkpoint-dir)")
        for name in ("lr", "embedding_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.dense_optimizer not in ("sgd", "adagrad", "adam"):
            raise ConfigError(f"dense_optimizer must be sgd, adagrad or adam, "
                              f"got {self.dense_optimizer!r}")
