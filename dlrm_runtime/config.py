"""Model and training configuration."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from dlrm_runtime.errors import ConfigError


SettingNames = Callable[[str], str]
"""How an error names a setting: the field name (the default) or, from the CLI, the
flag the user typed (``steps`` -> ``--steps``)."""


def as_field(name: str) -> str:
    return name


def as_flag(name: str) -> str:
    """The ``dlrm-run`` flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


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

    def check(self, embedding_dims: tuple[int, ...], names: SettingNames = as_field) -> None:
        """Raise :class:`ConfigError` when the layer sizes cannot work with the tables;
        ``names`` words the settings (:func:`as_flag` for the CLI's flags)."""
        if self.dense_features < 1:
            raise ConfigError(f"{names('dense_features')} must be >= 1, "
                              f"got {self.dense_features}")
        for name, layers in (("bottom_mlp", self.bottom_mlp), ("top_mlp", self.top_mlp)):
            if not layers or any(w < 1 for w in layers):
                raise ConfigError(f"{names(name)} needs one or more positive widths, "
                                  f"got {list(layers)}")
        if self.top_mlp[-1] != 1:
            raise ConfigError(f"{names('top_mlp')} must end with 1 (the logit), "
                              f"got {list(self.top_mlp)}")
        if self.interaction is Interaction.DOT:
            dims = set(embedding_dims) | {self.bottom_mlp[-1]}
            if len(dims) != 1:
                raise ConfigError(
                    f"dot interaction needs one width for the bottom MLP output "
                    f"({self.bottom_mlp[-1]}) and every table (dims {sorted(set(embedding_dims))});"
                    f" set the last width of {names('bottom_mlp')} to the tables' dim or use "
                    f"{names('interaction')} cat")


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

    def check(self, names: SettingNames = as_field) -> None:
        """Raise :class:`ConfigError` for a setting out of range; ``names`` words the
        settings (:func:`as_flag` for the CLI's flags)."""
        for name in ("steps", "batch_size", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{names(name)} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{names('threads')} must be >= 1, got {self.threads}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"{names('checkpoint_every')} must be >= 0, "
                              f"got {self.checkpoint_every}")
        if self.checkpoint_dir is None:
            if self.resume:
                raise ConfigError(f"{names('resume')} needs {names('checkpoint_dir')}")
            if self.checkpoint_every:
                raise ConfigError(f"{names('checkpoint_every')} needs {names('checkpoint_dir')}")
        for name in ("lr", "embedding_lr"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"{names(name)} must be > 0, got {getattr(self, name)}")
        if self.dense_optimizer not in ("sgd", "adagrad", "adam"):
            raise ConfigError(f"{names('dense_optimizer')} must be sgd, adagrad or adam, "
                              f"got {self.dense_optimizer!r}")
