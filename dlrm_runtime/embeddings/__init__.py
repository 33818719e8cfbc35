"""Embedding tables built from a plan: placements read from it (:mod:`.placement`), the
shared primitives (:mod:`.base`, :mod:`.lookup`), the table kinds built on them (whole
tables batched, :mod:`.batched`; split tables, :mod:`.sharded`; cached tables over the
table store, :mod:`.cached`, whose stores :mod:`.stores` lays out; the host tier is a
placement of the first two), the collection of every table in one process
(:mod:`.collection`) and the row optimizer (:mod:`.optim`)."""

from dlrm_runtime.embeddings.base import (
    TORCH_DTYPE,
    RowBlock,
    Segment,
    UniformRun,
    bag_of_ids,
    check_range,
    expand_pooled,
    init_generator,
    init_table,
    sum_rows,
    uniform_bag_length,
)
from dlrm_runtime.embeddings.batched import TableBatchedBags, batch_order
from dlrm_runtime.embeddings.cached import (
    CachedTable,
    CachedTables,
    CachedTablesOwner,
    lookup_shards,
)
from dlrm_runtime.embeddings.collection import (
    InMemoryEmbeddings,
    embeddings_from_plan,
    embeddings_in_memory,
)
from dlrm_runtime.embeddings.lookup import (
    HostLookup,
    PooledLookup,
    host_pooled,
    pooled_lookup,
    uniform_runs,
)
from dlrm_runtime.embeddings.memory import empty_weight, host_weight, tune_malloc
from dlrm_runtime.embeddings.optim import RowOptimizer
from dlrm_runtime.embeddings.placement import (
    CACHED_TIERS,
    ShardPlacement,
    TablePlacement,
    device_for,
    placement_from_plan,
    placements_from_plan,
    whole_table,
)
from dlrm_runtime.embeddings.sharded import ShardedTable
from dlrm_runtime.embeddings.sparse import SparseBatch
from dlrm_runtime.embeddings.stores import (
    StoreTable,
    check_store_dir,
    check_store_tables,
    check_stores_at,
    device_store_dir,
    open_device_stores,
    store_paths,
    verify_stores,
    open_store,
    store_tables,
)

__all__ = [
    "CACHED_TIERS", "CachedTable", "CachedTables", "CachedTablesOwner", "HostLookup",
    "InMemoryEmbeddings", "PooledLookup", "RowBlock", "RowOptimizer", "Segment",
    "ShardPlacement", "ShardedTable", "SparseBatch", "StoreTable", "TORCH_DTYPE",
    "TableBatchedBags", "TablePlacement", "UniformRun", "bag_of_ids", "batch_order",
    "check_range", "check_store_dir", "check_store_tables", "check_stores_at", "device_for", "device_store_dir",
    "embeddings_from_plan", "embeddings_in_memory", "empty_weight", "expand_pooled",
    "host_pooled", "host_weight", "init_generator", "init_table", "lookup_shards",
    "open_device_stores", "store_paths", "verify_stores", "open_store", "placement_from_plan", "placements_from_plan",
    "pooled_lookup", "store_tables", "sum_rows", "tune_malloc", "uniform_bag_length",
    "uniform_runs", "whole_table",
]
