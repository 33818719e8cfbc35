"""Typed errors of the runtime; the CLI maps each to an exit code."""

from __future__ import annotations


class RuntimeErrorBase(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(RuntimeErrorBase, ValueError):
    """A model or training setting is invalid (names the setting and the value)."""


class PlanMismatchError(RuntimeErrorBase, ValueError):
    """The plan does not fit the tables spec, the world size or this runtime."""


class CheckpointError(RuntimeErrorBase, ValueError):
    """A checkpoint cannot be used: none to resume from, one from another run (its
    fingerprint differs), an unreadable one, or a directory that already holds
    another run's checkpoints."""


class PeerRefusedError(RuntimeErrorBase):
    """Rank 0 refused the run (its checks of the stores and checkpoints failed); the
    other ranks stop with this, having written nothing. Rank 0 reports the cause."""


class TrainingDivergedError(RuntimeErrorBase, ArithmeticError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, checkpoint: str | None = None, *,
                 resumed_from: int | None = None) -> None:
        self.step = step
        self.loss = loss
        self.checkpoint = checkpoint
        """The last checkpoint written before the divergence, if any."""
        self.resumed_from = resumed_from
        """The step this run resumed from when no checkpoint was written since (the
        divergence may then come from the checkpoint itself)."""
        if resumed_from is not None:
            super().__init__(
                f"loss is {loss} at step {step}, {step - resumed_from + 1} step(s) after "
                f"resuming from checkpoint {checkpoint} (step {resumed_from}): the checkpoint "
                f"itself may be damaged, and resuming from it again repeats this; check its "
                f"table stores with `dlrm-store verify STORE_DIR` (every block against its "
                f"checksum), then restore the checkpoint and stores from a backup, or train "
                f"from scratch (a new --checkpoint-dir and --store-dir, without --resume)")
            return
        where = (f"; the last good checkpoint is {checkpoint} (continue from it with --resume)"
                 if checkpoint else "; no checkpoint was written")
        super().__init__(f"loss is {loss} at step {step}{where}; lower the learning rate "
                         f"(--lr, --embedding-lr) or use --seed to retry")
