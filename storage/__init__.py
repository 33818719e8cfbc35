"""Tiered embedding-table storage: zarr tables on disk, read and written row by row
through their uncompressed chunk files, with crash-safe checkpoints (an undo
journal); and :func:`replay`, the cache-policy simulator used to size row caches.
"""

from storage.errors import (
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
from storage.replay import POLICIES, CacheCounters, ReplayError, belady_hit_rate, replay, static_topk_hit_rate
from storage.store import TableStore
from storage.layout import TableInfo

__all__ = [
    "POLICIES", "CacheCounters", "CorruptStoreError", "FormatVersionError", "MissingArrayError",
    "ReadOnlyStoreError", "RecoveryRequiredError", "ReplayError", "RowIndexError", "RowShapeError",
    "StoreArgumentError", "StoreClosedError", "StoreError", "StoreExistsError", "StoreLockedError",
    "StoreNotFoundError", "TableExistsError", "TableInfo", "TableSpecError", "TableStore",
    "belady_hit_rate", "replay", "static_topk_hit_rate",
]
