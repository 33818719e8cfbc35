"""Training from the store against the same model fully in memory (tables 10x larger
than the cache, Zipf 1.05; targets: at least 90 % of the in-memory samples/s for the
default config (b), 80 % with ``--small-mlp``).

    .venv/bin/python bench/store_training.py [--tables 8] [--rows 1000000] [--dim 64]
        [--pooling 10] [--batch 2048] [--cache-fraction 0.1] [--reps 10] [--steps 6]
        [--warmup 12] [--tier store_cache] [--store-dir DIR] [--keep] [--small-mlp]

The default model is bench/throughput.py's config b (8 tables x 1M rows, dim 64, 10
ids per lookup, bottom 13-512-256-64, top 512-512-256-1, batch 2048); ``--small-mlp``
uses bottom 13-128-dim and top 128-64-1 instead, where the embeddings dominate the step.

One process, one torch thread. Both models are built from plans of the same tables:
every table ``hbm`` (in memory), or every table in ``--tier`` with ``cache_rows =
cache_fraction x rows`` (a row cache over the table store, created in ``--store-dir``
with the same initial values), and both are trained by :class:`dlrm_runtime.Trainer`
(SGD tables and MLPs). The cached side announces the next batch with
``embeddings.prefetch`` before every step, as the training loop does. After
``--warmup`` steps each, and as many more as the caches need to fill (until a step's
misses all evict: the steady state), ``--reps`` repetitions alternate which
side goes first; each side trains the same ``--steps`` pre-generated batches
(generation is not timed). Reported: per side the median samples/s, the median of the
per-repetition ratios cached/in-memory, the caches' hit rate over the measured steps
and how much background reading the prefetch hid. The store's chunk files are in the
page cache (just written): this measures the cache machinery, not the disk.

Writes ``bench/results/store_training.json`` (``store_training_small_mlp.json`` with
``--small-mlp``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrm_runtime import DLRM, ModelConfig, SyntheticClicks, TrainConfig, Trainer  # noqa: E402
from dlrm_runtime.embeddings import embeddings_from_plan  # noqa: E402
from dlrm_runtime.embeddings import tune_malloc  # noqa: E402
from planner import (  # noqa: E402
    DeviceLoad,
    Plan,
    Shard,
    ShardCost,
    Sharding,
    SolveReport,
    TablePlan,
    Tier,
    parse_tables,
    parse_topology,
)

TARGET_RATIO = {"b": 0.9, "small_mlp": 0.8}
"""Cached samples/s over in-memory samples/s to reach, per model."""


def manual_plan(tables_doc: dict, tier: Tier, cache_fraction: float) -> Plan:
    """Every table whole on device 0, in ``tier`` (cache of ``cache_fraction`` x rows)."""
    spec = parse_tables(tables_doc)
    topology = parse_topology({
        "hosts": 1, "devices_per_host": 1, "device": {"hbm_gb": 80.0, "hbm_gbps": 2000.0},
        "host": {"dram_gb": 24.0, "dram_gbps": 20.0, "h2d_gbps": 10.0},
        "store": {"read_gbps": 1.0, "write_gbps": 0.5},
        "network": {"intra_host_gbps": 50.0, "inter_host_gbps": 10.0},
        "batch_size_per_device": 1024})
    none = ShardCost(0.0, 0.0, 0.0, 0.0, 0, 0)
    plans = []
    for t in spec.tables:
        cache = 0 if tier is Tier.HBM else max(1, int(t.num_embeddings * cache_fraction))
        shard = Shard(0, 0, t.num_embeddings, 0, t.embedding_dim, tier, cache)
        plans.append(TablePlan(t.name, Sharding.TABLE_WISE, (shard,), none))
    devices = (DeviceLoad(0, 0, 0.0, 0, topology.usable_hbm_bytes),)
    solve = SolveReport("manual", "none", "Optimal", "Optimal", 0.0, 0.0, 0.0, 0.0, 1)
    return Plan(spec, topology, "analytic", tuple(plans), devices, solve)


def build(plan: Plan, config: ModelConfig, train: TrainConfig, store_dir: str | None) -> Trainer:
    embeddings = embeddings_from_plan(plan, torch.device("cpu"), seed=0, store_dir=store_dir,
                                      embedding_lr=train.embedding_lr)
    dims = [t.embedding_dim for t in plan.tables_spec.tables]
    return Trainer(DLRM(config, embeddings, dims, seed=0), train)


def run(trainer: Trainer, batches: list, next_batch) -> float:
    """Train on ``batches`` (announcing each next one); seconds taken."""
    embeddings = trainer.model.embeddings
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        following = batches[i + 1] if i + 1 < len(batches) else next_batch
        embeddings.prefetch(following.sparse)
        trainer.step(batch)
    return time.perf_counter() - start


FILL_MAX_STEPS = 400
"""At most this many extra warm-up steps wait for the caches to fill."""


def fill_caches(memory: Trainer, cached: Trainer, data: SyntheticClicks, step: int,
                batch: int) -> int:
    """Train both sides on further batches until the caches are full (a step's misses
    all evict: the steady state the measurement is about, not the filling); the steps
    taken."""
    stats = cached.model.embeddings.cache_stats
    for extra in range(FILL_MAX_STEPS):
        before = stats() or {}
        batches = [data.batch(step + extra, batch)]
        following = data.batch(step + extra + 1, batch)
        run(memory, batches, following)
        run(cached, batches, following)
        after = stats() or {}
        misses = after.get("misses", 0) - before.get("misses", 0)
        if after.get("evictions", 0) - before.get("evictions", 0) >= 0.99 * misses:
            return extra + 1
    return FILL_MAX_STEPS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", type=int, default=8, help="embedding tables")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per table")
    parser.add_argument("--dim", type=int, default=64, help="embedding dim")
    parser.add_argument("--cache-fraction", type=float, default=0.1,
                        help="cache slots per table, as a share of its rows")
    parser.add_argument("--batch", type=int, default=2048, help="samples per step")
    parser.add_argument("--pooling", type=float, default=10.0, help="ids per lookup")
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids")
    parser.add_argument("--reps", type=int, default=10,
                        help="repetitions (each side trains --steps batches per repetition)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=12, help="untimed steps first")
    parser.add_argument("--small-mlp", action="store_true",
                        help="bottom 13-128-dim, top 128-64-1 (the embeddings dominate)")
    parser.add_argument("--tier", choices=["store_cache", "dram_cache"], default="store_cache",
                        help="tier of the cached tables")
    parser.add_argument("--store-dir", default=None,
                        help="where the table store is created (default: a new directory "
                             "under the system temp dir, deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the store")
    parser.add_argument("--out", default=None,
                        help="result file (default bench/results/store_training.json, "
                             "store_training_small_mlp.json with --small-mlp)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / ("store_training_small_mlp.json"
                                                      if args.small_mlp else "store_training.json"))
    target = TARGET_RATIO["small_mlp" if args.small_mlp else "b"]

    torch.set_num_threads(1)
    tune_malloc()
    tables_doc = {"tables": [
        {"name": f"t{i}", "num_embeddings": args.rows, "embedding_dim": args.dim,
         "pooling_factor": args.pooling, "dtype": "fp32", "optimizer": "sgd",
         "access": {"zipf": args.zipf}} for i in range(args.tables)]}
    model = (ModelConfig(dense_features=13, bottom_mlp=(128, args.dim), top_mlp=(128, 64, 1))
             if args.small_mlp else
             ModelConfig(dense_features=13, bottom_mlp=(512, 256, args.dim),
                         top_mlp=(512, 512, 256, 1)))
    train = TrainConfig(batch_size=args.batch, lr=0.05, embedding_lr=0.05, dense_optimizer="sgd")
    store_dir = Path(args.store_dir) if args.store_dir else Path(
        tempfile.mkdtemp(prefix="store-training-")) / "store"
    memory_plan = manual_plan(tables_doc, Tier.HBM, 1.0)
    cached_plan = manual_plan(tables_doc, Tier(args.tier), args.cache_fraction)
    data = SyntheticClicks(memory_plan.tables_spec, model.dense_features, seed=0)

    load_before = os.getloadavg()
    start = time.perf_counter()
    cached = build(cached_plan, model, train, str(store_dir))
    created_s = time.perf_counter() - start
    memory = build(memory_plan, model, train, None)
    print(f"{args.tables} tables x {args.rows:,} rows x dim {args.dim}, cache "
          f"{args.cache_fraction:.0%} ({cached_plan.tables[0].shards[0].cache_rows:,} rows a "
          f"table), tier {args.tier}; store built in {created_s:.1f} s at {store_dir}")
    step = 0
    try:
        warm = [data.batch(i, args.batch) for i in range(args.warmup)]
        step = args.warmup
        run(memory, warm, data.batch(step, args.batch))
        run(cached, warm, data.batch(step, args.batch))
        filled = fill_caches(memory, cached, data, step, args.batch)
        step += filled
        print(f"warm-up: {args.warmup} steps, then {filled} more until the caches were full "
              f"(every miss evicting)")
        before = cached.model.embeddings.cache_stats() or {}
        reps = []
        for rep in range(args.reps):
            batches = [data.batch(step + i, args.batch) for i in range(args.steps)]
            step += args.steps
            after = data.batch(step, args.batch)
            seconds = {}
            order = (("memory", memory), ("cached", cached))
            for name, trainer in (order if rep % 2 == 0 else order[::-1]):
                seconds[name] = run(trainer, batches, after)
            rate = {k: args.steps * args.batch / v for k, v in seconds.items()}
            reps.append({"memory_samples_per_s": rate["memory"],
                         "cached_samples_per_s": rate["cached"],
                         "ratio": rate["cached"] / rate["memory"]})
            print(f"rep {rep}: in memory {rate['memory']:,.0f} samples/s, cached "
                  f"{rate['cached']:,.0f} samples/s, ratio {reps[-1]['ratio']:.2f}")
        stats = cached.model.embeddings.cache_stats() or {}
        window = {k: stats[k] - before.get(k, 0.0) for k in stats if not k.startswith("hit_rate")}
        hit_rate = window["hits"] / window["accesses"] if window.get("accesses") else 0.0
    finally:
        cached.model.embeddings.close()
        if not args.keep:
            shutil.rmtree(store_dir.parent if not args.store_dir else store_dir,
                          ignore_errors=True)
    ratio = statistics.median(r["ratio"] for r in reps)
    doc = {
        "benchmark": "store_training",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": 1},
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "model": {"bottom_mlp": list(model.bottom_mlp), "top_mlp": list(model.top_mlp)},
        "store_build_s": created_s,
        "fill_steps": filled,
        "memory_samples_per_s_median": statistics.median(r["memory_samples_per_s"] for r in reps),
        "cached_samples_per_s_median": statistics.median(r["cached_samples_per_s"] for r in reps),
        "ratio_median": ratio,
        "target_ratio": target,
        "target_met": ratio >= target,
        "ratio_first_rep": reps[0]["ratio"],
        "ratio_last_rep": reps[-1]["ratio"],
        "cached_last_over_first_rep": reps[-1]["cached_samples_per_s"]
        / reps[0]["cached_samples_per_s"],
        "first_and_last_within_10_percent": abs(reps[-1]["ratio"] / reps[0]["ratio"] - 1) <= 0.1,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "hit_rate_measured_steps": hit_rate,
        "cache_counters_measured_steps": window,
        "reps": reps,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"median: in memory {doc['memory_samples_per_s_median']:,.0f} samples/s, cached "
          f"{doc['cached_samples_per_s_median']:,.0f} samples/s; ratio {ratio:.2f} (target "
          f"{target:.2f}: {'met' if doc['target_met'] else 'NOT met'}); hit rate "
          f"{hit_rate:.1%}; background store work (prefetch reads, write-behind) hid "
          f"{window.get('background_hidden_s', 0):.2f} s, the step waited for it "
          f"{window.get('background_wait_s', 0):.2f} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
