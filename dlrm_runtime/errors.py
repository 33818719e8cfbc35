"""Typed errors of the runtime; the CLI maps each to an exit code."""

from __future__ import annotations


class RuntimeErrorBase(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(RuntimeErrorBase, ValueError):
    """A model or training setting is invalid (names the setting and the value)."""


class PlanMismatchError(RuntimeErrorBase, ValueError):
    """The plan does not fit the tables spec, the world size or this runtime."""


class TrainingDivergedError(RuntimeErrorBase, ArithmeticError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float) -> None:
        self.step = step
        self.loss = loss
        super().__init__(f"loss is {loss} at step {step}; lower the learning rate "
                         f"(--lr, --embedding-lr) or use --seed to retry")
