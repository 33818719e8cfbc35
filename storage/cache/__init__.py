"""The row cache: rows of a :class:`~storage.TableStore` table held on the compute
device (:class:`RowCache`, :func:`lookup_many`), with its replacement policies
(:mod:`storage.cache.policy`), row -> slot indexes (:mod:`storage.cache.index`),
background store work (:mod:`storage.cache.worker`) and statistics
(:mod:`storage.cache.stats`). Needs torch; the store alone (``storage.TableStore``)
does not.
"""

from storage.cache.policy import POLICIES
from storage.cache.row_cache import RowCache, lookup_many
from storage.cache.stats import CacheStats, TierBytes
from storage.errors import CacheArgumentError, CacheWriteError

__all__ = ["POLICIES", "CacheArgumentError", "CacheStats", "CacheWriteError", "RowCache",
           "TierBytes", "lookup_many"]
