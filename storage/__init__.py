"""Tiered embedding-table storage: zarr tables, a device row cache, checkpoints."""
