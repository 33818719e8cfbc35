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
  two GPUs are present), bytes sent per process beyond the fixed time of one
  collective, which a one-element exchange measures (the topology's
  ``network.collective_latency_us``);
- training runs: short runs of this runtime's training loop
  (:func:`dlrm_runtime.train.train`, batches made on its background thread) of
  one-device plans of six shapes, narrow to wide MLPs, 8 or 26 tables, batches to
  4096: a fit of the dense phase to GFLOP/s, GB/s and a fixed time per step, and the
  embedding step rate (the bytes the cost model charges for the lookup and update
  over their time; the topology's ``hbm_gbps``); one of them again with row-wise
  Adagrad tables for the optimizer's time per id. The same steps timed in isolation
  ran 1.3-1.5x faster than in runs;
- runtime overheads: training steps of this runtime's own embedding modules on eight
  probe tables looked up together, whole and in 4 row shards each, and on four tables
  of four sizes behind row caches (two batch sizes, three cache sizes): the time per
  extra shard, and the row cache's time per cached shard, per looked-up id, per miss
  and per row that finds no slot, beyond moving bytes.

Each is the median of a few repetitions (or steps) after a warm-up, on the compute
device with torch's current thread count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import platform
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

from dlrm_runtime.config import ModelConfig, TrainConfig
from dlrm_runtime.data import Prefetcher, SyntheticClicks, ZipfSampler
from dlrm_runtime.distributed.collectives import free_port, shutdown
from dlrm_runtime.embeddings import (
    InMemoryEmbeddings,
    RowOptimizer,
    ShardPlacement,
    SparseBatch,
    TablePlacement,
    tune_malloc,
)
from dlrm_runtime.measure.prediction import dense_bytes, dense_flops, predict_step
from dlrm_runtime.measure.timing import StepTimes
from dlrm_runtime.model import DLRM
from dlrm_runtime.train import train
from planner import (
    AccessProfile,
    DeviceSpec,
    HostSpec,
    NetworkSpec,
    Optimizer,
    PlanOptions,
    Sharding,
    StoreSpec,
    TableSpec,
    TablesSpec,
    Tier,
    Topology,
    link_ms,
    plan,
)
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
    """Batch of the training-run probes at fraction 1 (see :data:`RUN_PROBES`) and half
    the batch of the row-cache probes."""
    overhead_batches: int = 24
    """Batches of the runtime probes: half warm up (and fill the cache), half are timed."""
    overhead_rows: int = 1_000_000
    """Rows of the probe table (dim 16, 64 MB: beyond the CPU caches) of the runtime
    probes, and of each training-run probe's tables together."""
    run_steps: int = 24
    """Steps of each training-run probe (the median step's phases count)."""


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
    optimizer_ns_per_id: float = 0.0
    collective_latency_us: float | None = None
    """Median time of a one-element all-to-all between the two processes (None when the
    network was not measured)."""
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
        elif field.name in ("all_to_all_gbps", "collective_latency_us"):  # None: not measured
            measured = [v for v in values if v is not None]
            figures[field.name] = float(statistics.median(measured)) if measured else None
    return dataclasses.replace(last, **figures)


DISAGREEMENT = 0.20
"""Rounds whose figures spread wider than this share of their median disagree: the
machine's speed changed while it was measured."""


@dataclass(frozen=True, slots=True)
class Spread:
    """How one measured figure varied over the rounds of a calibration."""

    figure: str
    """A :class:`Calibration` field, e.g. ``device_gbps``."""
    low: float
    median: float
    high: float

    @property
    def relative(self) -> float:
        """(high - low) / median: 0 when every round measured the same."""
        return (self.high - self.low) / abs(self.median) if self.median else 0.0

    @property
    def disagrees(self) -> bool:
        return self.relative > DISAGREEMENT


def spreads(results: Sequence[Calibration]) -> tuple[Spread, ...]:
    """The spread of every measured figure over ``results`` (rounds of one machine)."""
    out = []
    for field in dataclasses.fields(Calibration):
        values = [getattr(r, field.name) for r in results]
        values = [v for v in values if isinstance(v, float)]
        if len(values) < 2 or field.name == "rounds":
            continue
        out.append(Spread(field.name, min(values), float(statistics.median(values)),
                          max(values)))
    return tuple(out)


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
    tuned as ``dlrm-run`` tunes it (:func:`~dlrm_runtime.embeddings.memory.tune_malloc`), so that
    the probes allocate as the runtime does."""
    tune_malloc()
    total = 7 if network else 6
    done = [0]

    def finished(line: str) -> None:
        done[0] += 1
        log(f"[{done[0]}/{total}] {line}")

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    row_bytes = sizes.dim * 4
    block = sizes.batch_rows * row_bytes

    table = torch.rand(sizes.rows, sizes.dim, device=device)
    ids = torch.from_numpy(rng.integers(0, sizes.rows, sizes.batch_rows)).to(device)
    seconds = _median_seconds(lambda: torch.index_select(table, 0, ids), sizes.repeats, sync)
    device_gbps = block / seconds / GB
    finished(f"device gather ({device.type}, index_select): {device_gbps:.2f} GB/s")

    host = np.random.default_rng(1).random((sizes.rows, sizes.dim), dtype=np.float32)
    host_ids = rng.integers(0, sizes.rows, sizes.batch_rows)
    out = np.empty((sizes.batch_rows, sizes.dim), dtype=np.float32)
    seconds = _median_seconds(lambda: np.take(host, host_ids, axis=0, out=out), sizes.repeats,
                              lambda: None)
    host_gbps = block / seconds / GB
    finished(f"host gather: {host_gbps:.2f} GB/s")

    source = torch.from_numpy(out)
    if device.type == "cuda":
        source = source.pin_memory()
    target = torch.empty_like(source, device=device)
    seconds = _median_seconds(lambda: target.copy_(source, non_blocking=True), sizes.repeats, sync)
    h2d_gbps = block / seconds / GB
    finished(f"host-to-device copy: {h2d_gbps:.2f} GB/s")

    read_gbps, write_gbps = _store_rates(sizes, store_dir, rng)
    finished(f"store: read {read_gbps:.3f} GB/s, write {write_gbps:.3f} GB/s (random rows)")

    costs = _runtime_overheads(sizes, device, sync, store_dir, min(h2d_gbps, host_gbps))
    finished(f"runtime: {costs.shard_ms:.3f} ms per extra shard; row cache: "
        f"{costs.cache_shard_ms:.3f} ms per cached shard, {costs.cache_ns_per_lookup:.0f} ns "
        f"per looked-up id, {costs.cache_ns_per_miss:.0f} ns per miss beyond its traffic, "
        f"{costs.cache_ns_per_overflow_row:.0f} ns per row without a slot")

    rates = _training_model(sizes, costs.shard_ms)
    finished(f"training runs ({torch.get_num_threads()} threads): embedding step "
        f"{rates.step_gbps:.2f} GB/s (used as the device rate), "
        f"{rates.optimizer_ns_per_id:.0f} ns per id for optimizer state; dense "
        f"{rates.dense_gflops:.1f} GFLOP/s, {rates.dense_gbps:.2f} GB/s, "
        f"{rates.dense_step_ms:.2f} ms fixed")

    a2a, latency_us, backend = (None, None, "none")
    if network:
        a2a, latency_us, backend = _all_to_all_rates(sizes.all_to_all_bytes, sizes.repeats)
        finished(f"all-to-all ({backend}, 2 processes): {a2a:.2f} GB/s, "
                 f"{latency_us:.0f} us per collective")
    return Calibration(str(device), rates.step_gbps, host_gbps, h2d_gbps, read_gbps, write_gbps,
                       a2a, backend,
                       dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       dense_gflops=rates.dense_gflops, dense_gbps=rates.dense_gbps,
                       dense_step_ms=rates.dense_step_ms, shard_overhead_ms=costs.shard_ms,
                       cache_shard_overhead_ms=costs.cache_shard_ms,
                       cache_ns_per_miss=costs.cache_ns_per_miss,
                       cache_ns_per_lookup=costs.cache_ns_per_lookup,
                       cache_ns_per_overflow_row=costs.cache_ns_per_overflow_row,
                       optimizer_ns_per_id=rates.optimizer_ns_per_id,
                       collective_latency_us=latency_us, threads=torch.get_num_threads())


RUN_PROBES: tuple[tuple[ModelConfig, tuple[int, ...], float], ...] = (
    (ModelConfig(13, (64, 16), (64, 1)), (16,) * 8, 0.25),
    (ModelConfig(13, (64, 16), (64, 1)), (16,) * 8, 1.0),
    (ModelConfig(13, (64, 16), (64, 1)), (16,) * 8, 2.0),
    (ModelConfig(13, (256, 64, 16), (256, 64, 1)), (16,) * 26, 1.0),
    (ModelConfig(13, (256, 64, 16), (256, 64, 1)), (16,) * 26, 2.0),
    (ModelConfig(13, (512, 256, 64), (512, 512, 256, 1)), (64,) * 8, 0.5),
)
"""The training runs timed to fit the dense model and the embedding step rate (see
:func:`_training_model`): (MLPs, embedding dims, batch as a fraction of
``CalibrationSizes.mlp_batch``): narrow MLPs at three batch sizes, a
Criteo-like model at two and the wide MLPs of the throughput benchmark's config (b).
The batches reach 4096 (the global batch of the prediction benchmark's plans, which
one process runs whole) so that the fit does not extrapolate past its largest probe."""


RUN_TOPOLOGY = Topology(1, 1, DeviceSpec(1e6, 1.0), HostSpec(1e6, 1.0, 1.0), StoreSpec(1.0, 1.0),
                        NetworkSpec(1.0, 1.0), 1)
"""The one-device topology of the training-run probes' plans: unit rates, so that the
plan's predicted embedding time is the cost model's charged bytes in GB."""


def _probe_tables(rows: Sequence[int], dims: Sequence[int], pooling: Sequence[int] | None = None,
                  optimizer: Optimizer = Optimizer.SGD) -> TablesSpec:
    """Probe tables ``probe0..``: ``rows[i]`` rows of dim ``dims[i]``, ``pooling[i]`` ids
    per sample (default one), Zipf 1.05 access, trained with ``optimizer``."""
    pooling = pooling or [1] * len(rows)
    return TablesSpec(tuple(TableSpec(f"probe{i}", n, dim, float(per),
                                      access=AccessProfile(zipf=1.05), optimizer=optimizer)
                            for i, (n, dim, per) in enumerate(zip(rows, dims, pooling))))


def _training_run(config: ModelConfig, dims: Sequence[int], batch: int, sizes: CalibrationSizes,
                  optimizer: Optimizer = Optimizer.SGD) -> tuple[StepTimes, float]:
    """Train a one-device plan of ``len(dims)`` tables (``overhead_rows`` rows in all,
    Zipf 1.05 ids, one per sample, ``optimizer``) with ``config``'s MLPs for
    ``run_steps`` steps of ``batch`` samples with :func:`dlrm_runtime.train.train`
    (synthetic clicks made on its background thread, as in every run): its measured
    times, and the embedding bytes (GB) the cost model charges for a step's lookup
    and update."""
    rows = [max(1000, sizes.overhead_rows // len(dims))] * len(dims)
    spec = _probe_tables(rows, dims, optimizer=optimizer)
    topology = dataclasses.replace(RUN_TOPOLOGY, batch_size_per_device=batch)
    probe = plan(spec, topology, options=PlanOptions(baseline="size"))
    result = train(probe, config, TrainConfig(steps=sizes.run_steps, batch_size=batch,
                                              eval_batches=1, log_every=sizes.run_steps))
    predicted = predict_step(probe, config, batch, communication=False)
    return result.times, (predicted.lookup_ms + predicted.update_ms) / 1e3  # ms at 1 GB/s


@dataclass(frozen=True, slots=True)
class RunRates:
    """What :func:`_training_model` fits (see :class:`planner.DeviceSpec`)."""

    dense_gflops: float
    dense_gbps: float
    dense_step_ms: float
    step_gbps: float
    optimizer_ns_per_id: float


OPTIMIZER_PROBE = 4
"""The :data:`RUN_PROBES` run trained a second time with row-wise Adagrad tables
(26 tables at the largest batch: the most ids)."""


def _training_model(sizes: CalibrationSizes, shard_ms: float) -> RunRates:
    """The dense and embedding rates fitted to short training runs of this runtime
    (:func:`_training_run`) of the :data:`RUN_PROBES` shapes, each phase taken at
    its median step.

    Timed in isolation, the same dense steps ran 1.3-1.5x faster here than inside a
    run, whose batch-making thread and embedding tables share the cores and the caches
    (and the embedding step likewise): a cost model fitted to isolated probes
    predicted every run too fast. So the probes are runs.

    - dense: time = FLOPs / rate + bytes / rate + fixed, FLOPs and bytes counted as
      :mod:`dlrm_runtime.measure.prediction` counts them, by non-negative least squares on the
      relative error. One constant rate fits narrow and wide MLPs badly (measured
      here: 25 % too slow for wide ones when narrow ones set the bytes rate). A GB/s of
      0 means the bytes term did not help the fit (then it is left out);
    - embedding step: the bytes the cost model charges for the lookup and the update
      over their measured time, less ``shard_ms`` per table (the cost model adds that
      per shard); the median over the runs;
    - optimizer: the :data:`OPTIMIZER_PROBE` run's update with row-wise Adagrad tables
      against plain SGD, less the optimizer state's bytes at the step rate, per
      looked-up id (summing repeated rows' gradients sorts the ids: 3 ms of a demo
      plan's 8 ms update here)."""
    rows, dense_seconds, step_rates = [], [], []
    stateful_ms, extra_gb, ids = 0.0, 0.0, 1
    for index, (config, dims, fraction) in enumerate(RUN_PROBES):
        batch = max(16, round(sizes.mlp_batch * fraction))
        times, charged_gb = _training_run(config, dims, batch, sizes)
        lookup, _, dense, update = times.median_phase_ms
        rows.append((dense_flops(config, dims, batch), dense_bytes(config, dims, batch), 1.0))
        dense_seconds.append(dense / 1e3)
        embedding_ms = max(lookup + update - shard_ms * len(dims), 1e-3)
        step_rates.append(charged_gb / (embedding_ms / 1e3))
        if index == OPTIMIZER_PROBE:
            stateful, stateful_gb = _training_run(config, dims, batch, sizes,
                                                  Optimizer.ROWWISE_ADAGRAD)
            stateful_ms = stateful.median_phase_ms[3] - update
            extra_gb, ids = stateful_gb - charged_gb, len(dims) * batch
    seconds = np.array(dense_seconds)
    design = np.array(rows) / seconds[:, None]
    (per_flop, per_byte, fixed), _ = scipy.optimize.nnls(design, np.ones(len(seconds)))
    if per_flop <= 0:  # the fit put everything elsewhere: the widest probe's plain rate
        per_flop = seconds[-1] / rows[-1][0]
    step_gbps = float(statistics.median(step_rates))
    optimizer_ms = max(0.0, stateful_ms - extra_gb / step_gbps * 1e3)
    return RunRates(1.0 / per_flop / 1e9, 1.0 / per_byte / GB if per_byte > 0 else 0.0,
                    fixed * 1e3, step_gbps, optimizer_ms * 1e6 / ids)


@dataclass(frozen=True, slots=True)
class RuntimeCosts:
    """What :func:`_runtime_overheads` measures (see :class:`planner.DeviceSpec`)."""

    shard_ms: float
    cache_shard_ms: float
    cache_ns_per_lookup: float
    cache_ns_per_miss: float
    cache_ns_per_overflow_row: float


STEP_PROBE_TABLES = 8
"""In-memory tables of the shard-overhead probe (see :func:`_runtime_overheads`)."""
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

    - ms per extra shard: :data:`STEP_PROBE_TABLES` tables of ``overhead_rows`` rows
      in all (which the runtime batches into one lookup, as it batches a device's whole
      tables) in 4 row shards each against whole, the median of three runs of each;
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
    many = _probe_tables(group, [dim] * len(group))
    batches = _probe_batches(group, batch, sizes.overhead_batches, rng)

    def step_of(pieces: int) -> float:
        return statistics.median(
            _step_seconds(InMemoryEmbeddings(many, shards(many, pieces), device), batches,
                          sync) for _ in range(3))

    shard_ms = max(0.0, (step_of(4) - step_of(1)) / (3 * len(group)) * 1e3)

    rows = [max(1000, round(sizes.overhead_rows * share)) for share in CACHE_PROBE_ROWS]
    count = len(rows)
    several = _probe_tables(rows, [dim] * count, CACHE_PROBE_POOLING)
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
    traffic = 2 * link_ms(1, dim * 4, miss_gbps) / 1e3  # fetch and write-back, as charged
    return RuntimeCosts(shard_ms, fixed * 1e3, per_id * 1e9,
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



def _all_to_all_worker(rank: int, port: int, nbytes: int, repeats: int, result: str) -> None:
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    finished = False
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)

        def seconds_of(elements: int) -> float:
            send = torch.ones(elements, device=device)
            recv = torch.empty_like(send)
            return _median_seconds(lambda: dist.all_to_all_single(recv, send), repeats, sync)

        latency = seconds_of(2)
        bulk = seconds_of(nbytes // 4)
        if rank == 0:
            # half of the buffer leaves each process, after the collective's fixed time
            gbps = nbytes / 2 / max(bulk - latency, bulk / 2) / GB
            Path(result).write_text(f"{gbps} {latency * 1e6} {backend}")
        finished = True
    finally:
        shutdown(synchronize=finished)


def _all_to_all_rates(nbytes: int, repeats: int) -> tuple[float, float, str]:
    """All-to-all between two local processes: GB/s sent per process beyond the fixed
    time, the fixed time of one collective (us) and the backend."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "a2a")
        mp.spawn(_all_to_all_worker, args=(free_port(), nbytes, repeats, result), nprocs=2,
                 join=True)
        gbps, latency_us, backend = Path(result).read_text().split()
    return float(gbps), float(latency_us), backend


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
                          round(cal.cache_ns_per_overflow_row, 1),
                          round(cal.optimizer_ns_per_id, 1)),
        host=HostSpec(round(dram_gb, 3), round(cal.host_gather_gbps, 3), round(cal.h2d_gbps, 3)),
        store=StoreSpec(round(cal.store_read_gbps, 4), round(cal.store_write_gbps, 4)),
        network=NetworkSpec(round(network, 3), round(inter_host_gbps or network, 3),
                            None if cal.collective_latency_us is None
                            else round(cal.collective_latency_us, 1)),
        batch_size_per_device=batch_size_per_device,
        reserved_hbm_gb=reserved_hbm_gb,
        description=f"Calibrated on {platform.node()} ({cal.device}) by dlrm-plan calibrate",
        calibration=(("date", cal.date), ("machine", platform.platform()),
                     ("device", cal.device), ("all_to_all_backend", cal.backend),
                     ("threads", str(cal.threads)), ("rounds", str(cal.rounds)),
                     ("method", "median of repeated probes; see dlrm_runtime/calibrate.py")),
    )
