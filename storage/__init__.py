"""Tiered embedding-table storage: zarr tables on disk, read and written row by row
through their uncompressed chunk files, with crash-safe checkpoints (an undo
journal); a row cache on the compute device over them (:class:`RowCache`); and
:func:`replay`, the cache-policy simulator used to size row caches.

The store needs numpy and zarr only. The names that need torch (the row cache and
the row optimizers) are loaded on first use (PEP 562), so ``import storage`` and
``storage.TableStore`` do not import torch.
"""

from importlib import import_module
from typing import Any

from storage.errors import (
    CacheArgumentError,
    CacheWriteError,
    CorruptStoreError,
    FormatVersionError,
    MissingArrayError,
    ReadOnlyStoreError,
    RecoveryRequiredError,
    RowIndexError,
    RowShapeError,
    StoreArgumentError,
    StoreClosedError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    TableExistsError,
    TableSpecError,
)
from storage.layout import TableInfo, check_table_name
from storage.replay import POLICIES, CacheCounters, ReplayError, belady_hit_rate, replay, static_topk_hit_rate
from storage.store import TableStore, checkpoint_state
from storage.sums import BlockDamage

_LAZY: dict[str, tuple[str, str]] = {
    "CACHE_POLICIES": ("storage.cache", "POLICIES"),
    "CacheStats": ("storage.cache", "CacheStats"),
    "RowCache": ("storage.cache", "RowCache"),
    "TierBytes": ("storage.cache", "TierBytes"),
    "lookup_many": ("storage.cache", "lookup_many"),
    "ADAGRAD_EPS": ("storage.row_update", "ADAGRAD_EPS"),
    "rowwise_adagrad": ("storage.row_update", "rowwise_adagrad"),
    "rowwise_adagrad_": ("storage.row_update", "rowwise_adagrad_"),
    "sgd": ("storage.row_update", "sgd"),
}
"""Door names that need torch: name -> (module, attribute), imported on first use."""

__all__ = [
    "ADAGRAD_EPS", "BlockDamage", "CACHE_POLICIES", "CacheArgumentError", "CacheStats", "CacheWriteError",
    "RowCache", "TierBytes", "POLICIES", "CacheCounters", "CorruptStoreError",
    "FormatVersionError", "MissingArrayError", "ReadOnlyStoreError", "RecoveryRequiredError",
    "ReplayError", "RowIndexError", "RowShapeError", "StoreArgumentError", "StoreClosedError",
    "StoreError", "StoreExistsError", "StoreLockedError", "StoreNotFoundError",
    "TableExistsError", "TableInfo", "TableSpecError", "TableStore",
    "belady_hit_rate", "check_table_name", "checkpoint_state", "lookup_many", "replay", "rowwise_adagrad",
    "rowwise_adagrad_", "sgd", "static_topk_hit_rate",
]


def __getattr__(name: str) -> Any:
    """Import a torch-needing door name (see ``_LAZY``) on first use."""
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'storage' has no attribute {name!r}") from None
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
