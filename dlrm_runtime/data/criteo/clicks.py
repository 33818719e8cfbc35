"""Training batches from Criteo caches (:class:`CriteoClicks`), by batch index like
:class:`~dlrm_runtime.data.synthetic.SyntheticClicks`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dlrm_runtime.data.batches import VALIDATION_OFFSET, Batch
from dlrm_runtime.data.criteo.cache import CriteoCache, bad_record, open_or_build_cache
from dlrm_runtime.data.criteo.format import NUM_DENSE, NUM_SPARSE, table_sizes
from dlrm_runtime.embeddings.sparse import SparseBatch
from dlrm_runtime.errors import ConfigError
from planner import TablesSpec


class CriteoClicks:
    """Batches of Criteo samples from caches, by index, like
    :class:`dlrm_runtime.data.SyntheticClicks`.

    Batch ``i`` holds samples ``i*B .. i*B+B-1`` of ``train`` in file order, wrapping
    around at the end (so the epoch is ``len(train) / B`` batches and later indices
    replay the data). Indices from :data:`dlrm_runtime.data.VALIDATION_OFFSET` on read
    ``validation`` the same way. Real data has no teacher: ``teacher_prob`` is NaN.
    No shuffling: samples come in file order. With ``tables``, the caches must have been
    built for its table sizes (else :class:`ConfigError`).
    """

    dense_features = NUM_DENSE

    def __init__(self, train: CriteoCache, validation: CriteoCache | None = None,
                 tables: TablesSpec | Sequence[int] | None = None) -> None:
        if tables is not None and table_sizes(tables) != train.table_sizes:
            raise ConfigError(f"{train.path} was built for other table sizes than the tables "
                              f"spec; rebuild it (open_or_build_cache does)")
        for cache in (train, validation):
            if cache is not None and len(cache) == 0:
                header = cache.header
                raise ConfigError(f"{header.source}: lines {header.start}:"
                                  f"{'' if header.stop is None else header.stop} hold no "
                                  f"samples (cache {cache.path})")
        if validation is not None:
            if validation.table_sizes != train.table_sizes:
                raise ConfigError(f"{validation.path}: table sizes differ from {train.path}")
        self.train = train
        self.validation = validation
        self.has_validation = validation is not None

    @property
    def table_sizes(self) -> tuple[int, ...]:
        return self.train.table_sizes

    def num_batches(self, batch_size: int, validation: bool = False) -> int:
        """Whole batches in one pass over the training (or validation) samples."""
        data = self.validation if validation else self.train
        return 0 if data is None else len(data) // batch_size

    def batch(self, index: int, batch_size: int) -> Batch:
        """Batch ``index`` of ``batch_size`` samples (see the class doc)."""
        if batch_size < 1 or index < 0:
            raise ConfigError(f"batch index must be >= 0 and batch size >= 1, got {index}, "
                              f"{batch_size}")
        data = self.train
        if index >= VALIDATION_OFFSET:
            if self.validation is None:
                raise ConfigError("no validation data: pass a validation cache to CriteoClicks")
            data, index = self.validation, index - VALIDATION_OFFSET
        n = len(data)
        lo = (index * batch_size) % n
        if lo + batch_size <= n:
            records = data.records[lo:lo + batch_size]
            data.check(lo, lo + batch_size, records)
        else:
            at = (lo + np.arange(batch_size)) % n
            records = data.records[at]
            problem = bad_record(records, np.asarray(data.table_sizes, dtype=np.int64))
            if problem is not None:
                data.check(int(at[problem[0]]), int(at[problem[0]]) + 1)
        return records_to_batch(records)


def records_to_batch(records: np.ndarray) -> Batch:
    """A :class:`Batch` of cache records: dense [B, 13] float32, one id per sample and
    table (int64, offsets ``0..B``), labels [B] float32, ``teacher_prob`` NaN."""
    b = records.shape[0]
    # astype copies: the tensors own writable memory, never the read-only map
    rows = records["rows"].T.astype(np.int64, order="C")  # [26, B]
    offsets = torch.arange(b + 1, dtype=torch.int64)
    return Batch(
        dense=torch.from_numpy(records["dense"].astype(np.float32, order="C")),
        sparse=SparseBatch(tuple(torch.from_numpy(r) for r in rows),
                           tuple(offsets for _ in range(NUM_SPARSE))),
        labels=torch.from_numpy(records["label"].astype(np.float32, order="C")),
        teacher_prob=torch.full((b,), float("nan")),
    )


LineRange = tuple[int, "int | None"]
"""``(start, stop)`` 0-based line indices, half-open; ``stop`` None: to the end."""

ParseProgress = Callable[[str], "contextlib.AbstractContextManager[Callable[[int, int], None]]"]
"""``progress(what)`` gives a context holding ``callback(done_bytes, total_bytes)`` while
the lines of ``what`` ("train", "validation") are parsed."""


def cache_path(data: str | os.PathLike[str], lines: LineRange) -> Path:
    """Where the parsed cache of ``lines`` of ``data`` lives: ``DATA.cache`` for the whole
    file (the one ``dlrm-plan profile`` writes), else ``DATA.START-STOP.cache``."""
    start, stop = lines
    if (start, stop) == (0, None):
        return Path(f"{data}.cache")
    return Path(f"{data}.{start}-{'end' if stop is None else stop}.cache")


def open_clicks(data: str | os.PathLike[str], tables: TablesSpec, train_lines: LineRange,
                validation_lines: LineRange | None, *, strict: bool = False,
                progress: ParseProgress | None = None) -> CriteoClicks:
    """Training (and validation) batches from the line ranges of the Criteo file
    ``data``, each parsed once into its cache beside the data (:func:`cache_path`) and
    reused by later runs; on an error the caches built here are removed."""
    caches: list[CriteoCache | None] = []
    try:
        for what, lines in (("train", train_lines), ("validation", validation_lines)):
            if lines is None:
                caches.append(None)
                continue
            with progress(what) if progress is not None else contextlib.nullcontext() as step:
                caches.append(open_or_build_cache(data, cache_path(data, lines), tables,
                                                  start=lines[0], stop=lines[1], strict=strict,
                                                  progress=step))
        return CriteoClicks(caches[0], caches[1], tables)
    except BaseException:
        for cache in caches:
            if cache is not None and cache.built:
                cache.path.unlink(missing_ok=True)
        raise
