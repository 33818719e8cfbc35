"""Tiered embedding-table storage: zarr tables on disk, read and written row by row
through their uncompressed chunk files, with crash-safe checkpoints (an undo
journal); a row cache on the compute device over them (:class:`RowCache`); and
:func:`replay`, the cache-policy simulator used to size row caches.
"""

from storage.cache import RowCache, lookup_many
from storage.cache_policy import POLICIES as CACHE_POLICIES
from storage.cache_types import CacheArgumentError, CacheStats, TierBytes
from storage.cache_worker import CacheWriteError
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
    "CACHE_POLICIES", "CacheArgumentError", "CacheStats", "CacheWriteError", "RowCache",
    "TierBytes", "POLICIES", "CacheCounters", "CorruptStoreError", "FormatVersionError", "MissingArrayError",
    "ReadOnlyStoreError", "RecoveryRequiredError", "ReplayError", "RowIndexError", "RowShapeError",
    "StoreArgumentError", "StoreClosedError", "StoreError", "StoreExistsError", "StoreLockedError",
    "StoreNotFoundError", "TableExistsError", "TableInfo", "TableSpecError", "TableStore",
    "belady_hit_rate", "lookup_many", "replay", "static_topk_hit_rate",
]
