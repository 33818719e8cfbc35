"""Measure this machine's bandwidths for the planner's cost model (``dlrm-plan calibrate``).

Every figure is an effective rate for the operation the cost model charges, in GB/s
(1e9 bytes/s) of embedding-row bytes moved:

- device gather: ``index_select`` of random rows of a table on the compute device
  (logged; the topology's ``hbm_gbps`` is the runtime's embedding step rate below);
- host gather: numpy ``take`` of random rows in host memory;
- host-to-device: copying a gathered block to the device (a memory copy on a CPU-only
  machine);
- store read / write: random rows through :class:`storage.TableStore` (page cache
  warm for reads; writes made durable by a checkpoint);
- all-to-all: ``all_to_all_single`` between two local processes over gloo (NCCL when
  two GPUs are present), bytes sent per process;
- runtime overheads: training steps of this runtime's own embedding modules on eight
  probe tables looked up together, whole and in 4 row shards each, and on four tables
  of four sizes behind row caches (two batch sizes, three cache sizes): the time per
  extra shard, and the row cache's time per cached shard, per looked-up id, per miss
  and per row that finds no slot, beyond moving bytes;
- dense: DLRM dense steps (MLPs, interaction, loss, optimizer) of six shapes and
  batches, narrow to wide, timed on the compute device with torch's current thread
  count; a fit of GFLOP/s, GB/s and a fixed time per step to them.

Each is the median of a few repetitions after a warm-up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dlrm_runtime.collectives import shutdown
from dlrm_runtime.config import ModelConfig
from dlrm_runtime.data import Prefetcher, SyntheticClicks, ZipfSampler
from dlrm_runtime.embeddings import InMemoryEmbeddings
from dlrm_runtime.memory import tune_malloc
from dlrm_runtime.model import DLRM
from dlrm_runtime.optim import RowOptimizer
from dlrm_runtime.prediction import dense_bytes, dense_flops
from dlrm_runtime.sharding import ShardPlacement, TablePlacement
from dlrm_runtime.sparse import SparseBatch
from planner import Sharding, TableSpec, TablesSpec, Tier
from planner.specs import AccessProfile, DeviceSpec, HostSpec, NetworkSpec, StoreSpec, Topology
from storage import TableStore

GB = 1e9


@dataclass(frozen=True, slots=True)
class CalibrationSizes:
    rows: int = 1_000_000
    """Rows of the probe table (dim 64, fp32: 256 MB)."""
    dim: int = 64
    batch_rows: int = 65_536
    """Rows per gather."""
    store_rows: int = 262_144
    """Rows of the probe table in the store."""
    repeats: int = 5
    all_to_all_bytes: int = 64 * 1024 * 1024
    mlp_batch: int = 2048
    """Batch of the dense probes (see :data:`DENSE_PROBES`)."""
    overhead_batches: int = 24
    """Batches of the runtime probes: half warm up (and fill the cache), half are timed."""
    overhead_rows: int = 1_000_000
    """Rows of the probe table (dim 16, 64 MB: beyond the CPU caches) of the runtime
    probes."""


@dataclass(frozen=True, slots=True)
class Calibration:
    device: str
    device_gbps: float
    """The runtime's embedding step rate (the topology's ``hbm_gbps``)."""
    host_gather_gbps: float
    h2d_gbps: float
    store_read_gbps: float
    store_write_gbps: float
    all_to_all_gbps: float | None
    """None when it was not measured."""
    backend: str
    date: str
    dense_gflops: float = 0.0
    dense_gbps: float = 0.0
    dense_step_ms: float = 0.0
    shard_overhead_ms: float = 0.0
    cache_shard_overhead_ms: float = 0.0
    cache_ns_per_miss: float = 0.0
    cache_ns_per_lookup: float = 0.0
    cache_ns_per_overflow_row: float = 0.0
    threads: int = 1
    """torch CPU threads during the probes."""
    rounds: int = 1
    """Calibrations whose medians these figures are (see :func:`combine`)."""


def combine(results: Sequence[Calibration]) -> Calibration:
    """The median of each measured figure over several calibrations of one machine
    (``dlrm-plan calibrate --rounds N``): on a shared VM a single calibration can catch
    a fast or a slow minute (here the embedding step rate measured 0.8 to 1.4 GB/s
    and the dense fit's prediction moved by 30 % between calibrations minutes apart).
    Descriptions (device, backend, threads) and the date come from the last one."""
    if not results:
        raise ValueError("combine needs at least one calibration")
    last = results[-1]
    figures: dict[str, object] = {}
    for field in dataclasses.fields(Calibration):
        values = [getattr(r, field.name) for r in results]
        if field.name == "rounds":
            figures[field.name] = sum(values)
        elif all(isinstance(v, float) for v in values):
            figures[field.name] = float(statistics.median(values))
        elif field.name == "all_to_all_gbps":  # None where it was not measured
            measured = [v for v in values if v is not None]
            figures[field.name] = float(statistics.median(measured)) if measured else None
    return dataclasses.replace(last, **figures)


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(sizes: CalibrationSizes = CalibrationSizes(), *, store_dir: str | Path | None = None,
            network: bool = True, log: Callable[[str], None] = lambda _: None) -> Calibration:
    """Run every probe; ``log`` receives one line per finished probe. glibc's malloc is
    tuned as ``dlrm-run`` tunes it (:func:`~dlrm_runtime.memory.tune_malloc`), so that
    the probes allocate as the runtime does."""
    tune_malloc()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    row_bytes = sizes.dim * 4
    block = sizes.batch_rows * row_bytes

    table = torch.rand(sizes.rows, sizes.dim, device=device)
    ids = torch.from_numpy(rng.integers(0, sizes.rows, sizes.batch_rows)).to(device)
    seconds = _median_seconds(lambda: torch.index_select(table, 0, ids), sizes.repeats, sync)
    device_gbps = block / seconds / GB
    log(f"device gather ({device.type}, index_select): {device_gbps:.2f} GB/s")

    host = np.random.default_rng(1).random((sizes.rows, sizes.dim), dtype=np.float32)
    host_ids = rng.integers(0, sizes.rows, sizes.batch_rows)
    out = np.empty((sizes.batch_rows, sizes.dim), dtype=np.float32)
    seconds = _median_seconds(lambda: np.take(host, host_ids, axis=0, out=out), sizes.repeats,
                              lambda: None)
    host_gbps = block / seconds / GB
    log(f"host gather: {host_gbps:.2f} GB/s")

    source = torch.from_numpy(out)
    if device.type == "cuda":
        source = source.pin_memory()
    target = torch.empty_like(source, device=device)
    seconds = _median_seconds(lambda: target.copy_(source, non_blocking=True), sizes.repeats, sync)
    h2d_gbps = block / seconds / GB
    log(f"host-to-device copy: {h2d_gbps:.2f} GB/s")

    dense_gflops, dense_gbps, dense_step_ms = _dense_model(sizes, device, sync)
    log(f"dense step ({torch.get_num_threads()} threads): {dense_gflops:.1f} GFLOP/s, "
        f"{dense_gbps:.2f} GB/s, {dense_step_ms:.2f} ms fixed")

    read_gbps, write_gbps = _store_rates(sizes, store_dir, rng)
    log(f"store: read {read_gbps:.3f} GB/s, write {write_gbps:.3f} GB/s (random rows)")

    costs = _runtime_overheads(sizes, device, sync, store_dir, min(h2d_gbps, host_gbps))
    log(f"runtime: embedding step {costs.step_gbps:.2f} GB/s (used as the device rate), "
        f"{costs.shard_ms:.3f} ms per extra shard; row cache: {costs.cache_shard_ms:.3f} ms "
        f"per cached shard, {costs.cache_ns_per_lookup:.0f} ns per looked-up id, "
        f"{costs.cache_ns_per_miss:.0f} ns per miss beyond its traffic, "
        f"{costs.cache_ns_per_overflow_row:.0f} ns per row without a slot")

    a2a, backend = (None, "none")
    if network:
        a2a, backend = _all_to_all_gbps(sizes.all_to_all_bytes, sizes.repeats)
        log(f"all-to-all ({backend}, 2 processes): {a2a:.2f} GB/s")
    return Calibration(str(device), costs.step_gbps, host_gbps, h2d_gbps, read_gbps, write_gbps,
                       a2a, backend,
                       dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       dense_gflops=dense_gflops, dense_gbps=dense_gbps,
                       dense_step_ms=dense_step_ms, shard_overhead_ms=costs.shard_ms,
                       cache_shard_overhead_ms=costs.cache_shard_ms,
                       cache_ns_per_miss=costs.cache_ns_per_miss,
                       cache_ns_per_lookup=costs.cache_ns_per_lookup,
                       cache_ns_per_overflow_row=costs.cache_ns_per_overflow_row,
                       threads=torch.get_num_threads())


DENSE_PROBES: tuple[tuple[ModelConfig, tuple[int, ...], float], ...] = (
    (ModelConfig(13, (64, 16), (64, 1)), (16,) * 8, 0.25),
    (ModelConfig(13, (64, 16), (64, 1)), (16,) * 8, 1.0),
    (ModelConfig(13, (64, 16), (64, 1)), (16,) * 8, 2.0),
    (ModelConfig(13, (256, 64, 16), (256, 64, 1)), (16,) * 26, 1.0),
    (ModelConfig(13, (256, 64, 16), (256, 64, 1)), (16,) * 26, 2.0),
    (ModelConfig(13, (512, 256, 64), (512, 512, 256, 1)), (64,) * 8, 0.5),
)
"""Dense steps timed to fit the dense model: (MLPs, embedding dims, batch as a
fraction of ``CalibrationSizes.mlp_batch``): narrow MLPs at three batch sizes, a
Criteo-like model at two and the wide MLPs of the throughput benchmark's config (b).
The batches reach 4096 (the global batch of the prediction benchmark's plans, which
one process runs whole) so that the fit does not extrapolate past its largest probe."""


def _dense_model(sizes: CalibrationSizes, device: torch.device,
                 sync: Callable[[], None]) -> tuple[float, float, float]:
    """``(GFLOP/s, GB/s, fixed ms)`` of the dense step, fitted to timed DLRM dense
    steps (MLPs and dot interaction forward and backward, BCE loss, fused Adagrad) of
    the :data:`DENSE_PROBES` shapes: time = FLOPs / rate + bytes / rate + fixed, FLOPs
    and bytes counted as :mod:`dlrm_runtime.prediction` counts them, by non-negative
    least squares on the relative error (each probe the median of 3 x ``repeats``
    steps: its fit moved by 30 % between calibrations with 5). One constant rate fits
    narrow and wide MLPs badly (measured here: 25 % too slow for wide ones when narrow
    ones set the bytes rate); the fit's worst probe is within about 15 %. A GB/s of 0
    means the bytes term did not help the fit (then it is left out)."""
    generator = torch.Generator().manual_seed(0)
    rows, seconds_list = [], []
    for config, dims, fraction in DENSE_PROBES:
        batch = max(16, round(sizes.mlp_batch * fraction))
        model = DLRM(config, torch.nn.Identity(), dims).dense_to(device)
        optimizer = torch.optim.Adagrad(model.dense_parameters(), lr=0.01)
        dense = torch.randn(batch, config.dense_features, generator=generator).to(device)
        pooled = torch.randn(len(dims), batch, dims[0], generator=generator).to(device)
        pooled.requires_grad_(True)
        labels = (torch.rand(batch, generator=generator) < 0.3).float().to(device)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            pooled.grad = None
            logits = model.dense_forward(dense, pooled)
            torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
            optimizer.step()

        seconds = _median_seconds(step, 3 * sizes.repeats, sync)  # short steps: more of them
        rows.append((dense_flops(config, dims, batch), dense_bytes(config, dims, batch), 1.0))
        seconds_list.append(seconds)
    times = np.array(seconds_list)
    design = np.array(rows) / times[:, None]
    (per_flop, per_byte, fixed), _ = scipy.optimize.nnls(design, np.ones(len(times)))
    if per_flop <= 0:  # the fit put everything elsewhere: the widest probe's plain rate
        per_flop = times[-1] / rows[-1][0]
    return 1.0 / per_flop / 1e9, (1.0 / per_byte / GB if per_byte > 0 else 0.0), fixed * 1e3


@dataclass(frozen=True, slots=True)
class RuntimeCosts:
    """What :func:`_runtime_overheads` measures (see :class:`planner.specs.DeviceSpec`)."""

    step_gbps: float
    shard_ms: float
    cache_shard_ms: float
    cache_ns_per_lookup: float
    cache_ns_per_miss: float
    cache_ns_per_overflow_row: float


STEP_PROBE_TABLES = 8
"""In-memory tables of the embedding-step probe (see :func:`_runtime_overheads`)."""
CACHE_PROBES = ((1, 0.02), (1, 0.05), (1, 0.1), (4, 0.02), (4, 0.05), (4, 0.1))
"""Cached probe runs: (batch as a multiple of the probe batch, cache slots as a share
of the probe table's rows)."""
CACHE_PROBE_ROWS = (0.02, 0.05, 0.1, 0.2)
"""Cached tables trained together in each cached probe run, by their rows as shares of
``CalibrationSizes.overhead_rows``: like a model's, their caches' background threads
share the cores (one cache alone measured 25-35 % less per table here), and their
sizes differ (fitted to 50k-row tables only, the costs came out 45 % low for the
cache of a 200k-row table in a real run)."""
CACHE_PROBE_POOLING = (1, 3, 1, 2)
"""Ids per sample of those tables: a cached table's work grows with its ids (one with
three per sample measured 1.7-2.1x its prediction when only one-id tables were
probed)."""
CACHE_PROBE_TABLES = len(CACHE_PROBE_ROWS)


def _probe_batches(rows: Sequence[int], batch: int, count: int, rng: np.random.Generator,
                   pooling: Sequence[int] | None = None) -> list[SparseBatch]:
    """``count`` batches over tables of ``rows`` rows each: Zipf 1.05 ids, ``pooling``
    per sample (default one), hot rows spread over each table (as hashed categorical
    values are)."""
    pooling = pooling or [1] * len(rows)
    per_table, offsets = [], []
    for n, per in zip(rows, pooling):
        ranks = ZipfSampler(n, 1.05).ranks(rng.random((count, batch * per)))
        per_table.append((ranks * 7919 + 13) % n if math.gcd(7919, n) == 1 else ranks)
        offsets.append(torch.arange(0, batch * per + 1, per, dtype=torch.int64))
    return [SparseBatch(tuple(torch.from_numpy(ids[step]) for ids in per_table),
                        tuple(offsets)) for step in range(count)]


def _step_seconds(embeddings: InMemoryEmbeddings, batches: list[SparseBatch],
                  sync: Callable[[], None],
                  head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  load: Callable[[], object] | None = None) -> float:
    """Mean seconds of a training step (lookup, backward, SGD) over the second half
    of ``batches`` after the first half (warm-up; it fills a cache). ``head(pooled)``
    gives the loss (default: the pooled sum); ``load()`` is called once per step,
    outside the timing (e.g. to take a batch from a background
    :class:`~dlrm_runtime.data.Prefetcher`, as the training loop does)."""
    optimizer = RowOptimizer.for_blocks(embeddings.row_blocks(), 0.01)
    cached = embeddings.cache_stats() is not None

    def step(index: int) -> float:
        if load is not None:
            load()
        start = time.perf_counter()
        if cached and index + 1 < len(batches):  # as the training loop announces it
            embeddings.prefetch(batches[index + 1])
        optimizer.zero_grad()
        pooled = embeddings.forward_stacked(batches[index])
        (pooled.sum() if head is None else head(pooled)).backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    half = len(batches) // 2
    for index in range(half):
        step(index)
    return sum(step(index) for index in range(half, len(batches))) / (len(batches) - half)


def _cache_features(spec: TablesSpec, samples: int, share: float
                    ) -> tuple[float, float, float, float]:
    """Per table, on average: ``(1, lookups, misses, overflow rows)`` of a step of
    ``samples`` samples with caches of ``share`` of each table's rows, as
    :class:`planner.AnalyticCostModel` counts them (misses: the lookups outside the
    access profile's hottest rows; overflow: the expected distinct rows beyond the
    slots), so that the costs fitted to them are the ones the model needs."""
    rows = []
    for table in spec.tables:
        lookups = samples * table.pooling_factor
        slots = max(1, round(table.num_embeddings * share))
        hit = table.access.hit_rate(table.num_embeddings, slots)
        distinct = table.access.expected_distinct(table.num_embeddings, lookups)
        rows.append((1.0, lookups, lookups * (1.0 - hit), max(0.0, distinct - slots)))
    return tuple(float(v) for v in np.mean(rows, axis=0))  # type: ignore[return-value]


CACHE_PROBE_HEAD = ModelConfig(13, (64, 16), (64, 1))
"""The dense part trained on the cached probes' pooled embeddings (the demo's MLPs)."""


def _dense_head(tables: int, batch: int, dim: int, device: torch.device
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss of :data:`CACHE_PROBE_HEAD` on ``tables`` pooled embeddings of dim
    ``dim`` (fixed dense features and labels), as a training step computes it."""
    generator = torch.Generator().manual_seed(1)
    model = DLRM(CACHE_PROBE_HEAD, torch.nn.Identity(), (dim,) * tables).dense_to(device)
    dense = torch.randn(batch, CACHE_PROBE_HEAD.dense_features, generator=generator).to(device)
    labels = (torch.rand(batch, generator=generator) < 0.3).float().to(device)
    parameters = model.dense_parameters()

    def loss(pooled: torch.Tensor) -> torch.Tensor:
        for parameter in parameters:
            parameter.grad = None
        return torch.nn.functional.binary_cross_entropy_with_logits(
            model.dense_forward(dense, pooled), labels)

    return loss


def _runtime_overheads(sizes: CalibrationSizes, device: torch.device, sync: Callable[[], None],
                       store_dir: str | Path | None, miss_gbps: float) -> RuntimeCosts:
    """This runtime's own embedding modules, timed on training steps (lookup, backward,
    SGD update) of probe tables of dim 16 with Zipf ids (one per sample; the cached
    tables :data:`CACHE_PROBE_POOLING`).

    - GB/s: the bytes the cost model charges for the tables' step (the rows read by
      the lookup, read and written by the update: 3 x the looked-up bytes) over its
      time, for :data:`STEP_PROBE_TABLES` tables of ``overhead_rows`` rows in all,
      which the runtime batches into one lookup as it batches a device's whole tables
      (one table alone measured 0.57 GB/s here, eight 0.84: per-call work is shared);
      the median of three runs;
    - ms per extra shard: the same tables in 4 row shards each against whole;
    - cached: tables of :data:`CACHE_PROBE_ROWS` shares of the rows, each behind a
      ``dram_cache`` row cache, the next batch announced for prefetch as the training
      loop does, at two batch sizes and three cache sizes (:data:`CACHE_PROBES`; the
      warm-up fills the caches, so the timed steps evict and write back as a long run
      does), each against the same tables in memory; a non-negative least-squares
      fit of the excess time per table to ``fixed + per id x ids + per miss x misses
      + per overflow row x rows without a slot`` (the smallest caches hold fewer slots
      than a batch's distinct rows), each counted as the cost model counts it
      (:func:`_cache_features`), gives the ms per cached shard and the ns per
      looked-up id, per miss (less the miss traffic the cost model charges at
      ``miss_gbps``: fetch and write-back) and per overflow row."""
    dim, batch = 16, 2 * sizes.mlp_batch
    rng = np.random.default_rng(2)

    def tables(rows: Sequence[int], pooling: Sequence[int] | None = None) -> TablesSpec:
        pooling = pooling or [1] * len(rows)
        return TablesSpec(tuple(TableSpec(f"probe{i}", n, dim, float(per),
                                          access=AccessProfile(zipf=1.05))
                                for i, (n, per) in enumerate(zip(rows, pooling))))

    def shards(spec: TablesSpec, count: int, tier: Tier = Tier.HBM,
               cache_share: float = 0.0) -> dict[str, TablePlacement]:
        out = {}
        for table in spec.tables:
            rows = table.num_embeddings
            cuts = [rows * k // count for k in range(count + 1)]
            cache_rows = max(1, round(rows * cache_share)) if tier is not Tier.HBM else 0
            out[table.name] = TablePlacement(
                Sharding.TABLE_WISE if count == 1 else Sharding.ROW_WISE,
                tuple(ShardPlacement(0, device, lo, hi, 0, dim, tier, cache_rows)
                      for lo, hi in zip(cuts, cuts[1:])))
        return out

    group = [max(1000, sizes.overhead_rows // STEP_PROBE_TABLES)] * STEP_PROBE_TABLES
    many = tables(group)
    batches = _probe_batches(group, batch, sizes.overhead_batches, rng)

    def step_of(pieces: int) -> float:
        return statistics.median(
            _step_seconds(InMemoryEmbeddings(many, shards(many, pieces), device), batches,
                          sync) for _ in range(3))

    whole, split = step_of(1), step_of(4)
    shard_ms = max(0.0, (split - whole) / (3 * len(group)) * 1e3)
    step_gbps = 3 * len(group) * batch * dim * 4 / whole / GB

    rows = [max(1000, round(sizes.overhead_rows * share)) for share in CACHE_PROBE_ROWS]
    count = len(rows)
    several = tables(rows, CACHE_PROBE_POOLING)
    design, excess = [], []  # per table
    for multiple in sorted({m for m, _ in CACHE_PROBES}):
        ids = batch * multiple
        probe = _probe_batches(rows, ids, sizes.overhead_batches, rng, CACHE_PROBE_POOLING)
        head = _dense_head(count, ids, dim, device)
        # as in a training run: the next batch is made meanwhile on a background thread
        with Prefetcher(SyntheticClicks(several), ids, 0, 1 << 40) as making:
            plain = _step_seconds(InMemoryEmbeddings(several, shards(several, 1), device),
                                  probe, sync, head, making.next)
            for _, share in (p for p in CACHE_PROBES if p[0] == multiple):
                with tempfile.TemporaryDirectory(dir=store_dir) as tmp:
                    cached = InMemoryEmbeddings(several,
                                                shards(several, 1, Tier.DRAM_CACHE, share),
                                                device, store_dir=tmp, embedding_lr=0.01)
                    try:
                        seconds = _step_seconds(cached, probe, sync, head, making.next)
                    finally:
                        cached.close()
                design.append(_cache_features(several, ids, share))
                excess.append(max(0.0, seconds - plain) / count)
    weights = 1.0 / np.maximum(np.array(excess), 1e-4)  # relative errors
    (fixed, per_id, per_miss, per_overflow), _ = scipy.optimize.nnls(
        np.array(design) * weights[:, None], np.array(excess) * weights)
    traffic = 2 * dim * 4 / (miss_gbps * GB)  # fetch and write-back, as the cost model charges
    return RuntimeCosts(step_gbps, shard_ms, fixed * 1e3, per_id * 1e9,
                        max(0.0, per_miss - traffic) * 1e9, per_overflow * 1e9)


def _store_rates(sizes: CalibrationSizes, store_dir: str | Path | None,
                 rng: np.random.Generator) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir=store_dir) as tmp:
        store = TableStore.create(Path(tmp) / "probe")
        try:
            store.add_table("probe", sizes.store_rows, sizes.dim, init="zeros")
            ids = rng.integers(0, sizes.store_rows, min(sizes.batch_rows, sizes.store_rows))
            row_bytes = sizes.dim * 4
            seconds = _median_seconds(lambda: store.gather("probe", ids), sizes.repeats,
                                      lambda: None)
            read = ids.size * row_bytes / seconds / GB
            rows = np.ones((ids.size, sizes.dim), dtype=np.float32)
            step = iter(range(1, 10_000))

            def write_and_commit() -> None:
                store.scatter("probe", ids, rows)
                store.checkpoint(next(step))

            seconds = _median_seconds(write_and_commit, max(2, sizes.repeats // 2), lambda: None)
            write = ids.size * row_bytes / seconds / GB
        finally:
            store.close()
    return read, write


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _all_to_all_worker(rank: int, port: int, nbytes: int, repeats: int, result: str) -> None:
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    finished = False
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        send = torch.ones(nbytes // 4, device=device)
        recv = torch.empty_like(send)
        sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)

        def exchange() -> None:
            dist.all_to_all_single(recv, send)

        seconds = _median_seconds(exchange, repeats, sync)
        if rank == 0:
            # half of the buffer leaves each process
            Path(result).write_text(f"{nbytes / 2 / seconds / GB} {backend}")
        finished = True
    finally:
        shutdown(synchronize=finished)


def _all_to_all_gbps(nbytes: int, repeats: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "a2a")
        mp.spawn(_all_to_all_worker, args=(_free_port(), nbytes, repeats, result), nprocs=2,
                 join=True)
        value, backend = Path(result).read_text().split()
    return float(value), backend


def _memory_gb() -> float:
    """Total host memory from /proc/meminfo (Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return 0.0


def to_topology(cal: Calibration, *, hbm_gb: float | None = None, dram_gb: float | None = None,
                devices: int | None = None, batch_size_per_device: int = 2048,
                reserved_hbm_gb: float = 0.0, inter_host_gbps: float | None = None) -> Topology:
    """One host of this machine's devices with the measured rates. Capacities default
    to the GPU's memory (CPU: half the host memory) and the host memory."""
    gpus = torch.cuda.device_count()
    if devices is None:
        devices = max(1, gpus)
    if hbm_gb is None:
        hbm_gb = (torch.cuda.get_device_properties(0).total_memory / GB if gpus
                  else _memory_gb() / 2)
    if dram_gb is None:
        dram_gb = _memory_gb()
    network = cal.all_to_all_gbps or cal.h2d_gbps
    return Topology(
        hosts=1,
        devices_per_host=devices,
        device=DeviceSpec(round(hbm_gb, 3), round(cal.device_gbps, 3),
                          round(cal.dense_gflops, 2) if cal.dense_gflops > 0 else None,
                          round(cal.dense_gbps, 3) if cal.dense_gbps > 0 else None,
                          round(cal.dense_step_ms, 3) if cal.dense_step_ms > 0 else None,
                          round(cal.shard_overhead_ms, 4), round(cal.cache_shard_overhead_ms, 4),
                          round(cal.cache_ns_per_miss, 1), round(cal.cache_ns_per_lookup, 1),
                          round(cal.cache_ns_per_overflow_row, 1)),
        host=HostSpec(round(dram_gb, 3), round(cal.host_gather_gbps, 3), round(cal.h2d_gbps, 3)),
        store=StoreSpec(round(cal.store_read_gbps, 4), round(cal.store_write_gbps, 4)),
        network=NetworkSpec(round(network, 3), round(inter_host_gbps or network, 3)),
        batch_size_per_device=batch_size_per_device,
        reserved_hbm_gb=reserved_hbm_gb,
        description=f"Calibrated on {platform.node()} ({cal.device}) by dlrm-plan calibrate",
        calibration=(("date", cal.date), ("machine", platform.platform()),
                     ("device", cal.device), ("all_to_all_backend", cal.backend),
                     ("threads", str(cal.threads)), ("rounds", str(cal.rounds)),
                     ("method", "median of repeated probes; see dlrm_runtime/calibrate.py")),
    )
