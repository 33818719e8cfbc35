"""What training reads: batches and their sources (:mod:`.batches`), synthetic clicks
with a hidden teacher (:mod:`.synthetic`), Criteo click logs (:mod:`.criteo`: format,
reader, cache, batches) and access profiling of a dataset (:mod:`.profile`)."""

from dlrm_runtime.data.batches import VALIDATION_OFFSET, Batch, ClickSource, Prefetcher
from dlrm_runtime.data.criteo import (
    CriteoCache,
    CriteoCacheError,
    CriteoClicks,
    CriteoFormatError,
    open_clicks,
    open_or_build_cache,
)
from dlrm_runtime.data.profile import (
    AccessCounts,
    ProfileError,
    access_profile,
    count_accesses,
    profile_from_counts,
    profile_tables,
)
from dlrm_runtime.data.synthetic import SyntheticClicks, ZipfSampler, zipf_ranks

__all__ = [
    "VALIDATION_OFFSET", "AccessCounts", "Batch", "ClickSource", "CriteoCache",
    "CriteoCacheError", "CriteoClicks", "CriteoFormatError", "Prefetcher", "ProfileError",
    "SyntheticClicks", "ZipfSampler", "access_profile", "count_accesses", "open_clicks", "open_or_build_cache",
    "profile_from_counts", "profile_tables", "zipf_ranks",
]
