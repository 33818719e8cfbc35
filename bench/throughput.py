"""Training-step throughput: this runtime's step against a straightforward PyTorch DLRM.

    .venv/bin/python bench/throughput.py [--configs a,b] [--reps 30] [--threads 2]

Both sides train the same model shape on the same pre-generated batches (generation is
not timed), in ONE process, with interleaved repetitions (the order alternates every
repetition), on ``--threads`` threads; the table reports the median ms/step, samples/s,
their ratio, and the median of the per-repetition ratios (each pair of steps runs back
to back, so this one is less sensitive to load that comes and goes on a shared
machine). The baseline is ``bench/reference_dlrm.py``: one
``nn.EmbeddingBag(mode="sum", sparse=True)`` per table and one ``torch.optim.SGD`` over
all parameters, as the paper's reference implementation trains. Ours is
:class:`dlrm_runtime.Trainer` (what ``dlrm-run`` runs every step) with SGD for the
MLPs and the tables, on whole tables in memory (what a table-wise plan on one device
builds).

The dense floor is the MLPs' forward+backward FLOPs per step (the first layer's input
gradient excluded: dense inputs need none) divided by this machine's fp32 matmul
rate, measured here with ``torch.matmul`` on ``--threads`` threads (best of several
square-ish GEMMs, so the floor is optimistic): no step can be faster.

Configs (ids drawn by :class:`dlrm_runtime.SyntheticClicks`, Zipf 1.05):
  a: 26 tables x 100k rows, dim 16, 1 id per lookup, bottom 13-512-256-64-16,
     top 512-256-1, batch 128;
  b: 8 tables x 1M rows, dim 64, 10 ids per lookup, bottom 13-512-256-64,
     top 512-512-256-1, batch 2048.
Writes ``bench/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reference_dlrm import ReferenceDLRM, ReferenceTrainer  # noqa: E402
from dlrm_runtime import (  # noqa: E402
    DLRM,
    ModelConfig,
    SyntheticClicks,
    TrainConfig,
    Trainer,
    embeddings_in_memory,
)
from dlrm_runtime.embeddings import tune_malloc  # noqa: E402
from planner import parse_tables  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    name: str
    tables: int
    rows: int
    dim: int
    ids_per_lookup: int
    bottom: tuple[int, ...]
    """Including the dense input width."""
    top: tuple[int, ...]
    """Excluding the interaction width."""
    batch: int
    target_ratio: float
    floor_within: float | None = None
    """Our step must be within this factor of the dense floor (1.25: within 25 %)."""


CONFIGS = {
    "a": BenchConfig("a", 26, 100_000, 16, 1, (13, 512, 256, 64, 16), (512, 256, 1), 128, 1.5),
    "b": BenchConfig("b", 8, 1_000_000, 64, 10, (13, 512, 256, 64), (512, 512, 256, 1), 2048,
                     1.25, 1.25),
}
LR = 0.01


def matmul_gflops(threads: int, seconds: float = 1.0) -> float:
    """Best fp32 ``torch.matmul`` rate over a few GEMM shapes, in GFLOP/s."""
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in ((2048, 512, 512), (2048, 1024, 1024), (4096, 512, 256)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2.0 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


def mlp_flops(cfg: BenchConfig) -> float:
    """Forward + backward FLOPs of both MLPs per step (weight and input gradients; no
    input gradient for the first bottom layer)."""
    num = cfg.tables + 1
    interaction = cfg.bottom[-1] + num * (num - 1) // 2
    layers = list(zip(cfg.bottom[:-1], cfg.bottom[1:]))
    top = (interaction, *cfg.top)
    layers += list(zip(top[:-1], top[1:]))
    macs = sum(i * o for i, o in layers)
    first = cfg.bottom[0] * cfg.bottom[1]
    return 2.0 * cfg.batch * (3 * macs - first)


def build(cfg: BenchConfig, batches: int, seed: int = 0):
    doc = {"tables": [{"name": f"t{i}", "num_embeddings": cfg.rows, "embedding_dim": cfg.dim,
                       "pooling_factor": float(cfg.ids_per_lookup), "dtype": "fp32"}
                      for i in range(cfg.tables)]}
    tables = parse_tables(doc)
    data = SyntheticClicks(tables, cfg.bottom[0], seed)
    ours_batches = [data.batch(i, cfg.batch) for i in range(batches)]
    ref_batches = [(b.dense, [o[:-1] for o in b.sparse.offsets], list(b.sparse.ids),
                    b.labels.unsqueeze(1)) for b in ours_batches]
    model_config = ModelConfig(cfg.bottom[0], cfg.bottom[1:], cfg.top)
    model = DLRM(model_config, embeddings_in_memory(tables, seed), [cfg.dim] * cfg.tables, seed)
    ours = Trainer(model, TrainConfig(lr=LR, embedding_lr=LR, dense_optimizer="sgd"))
    reference = ReferenceTrainer(ReferenceDLRM([cfg.rows] * cfg.tables, cfg.dim, cfg.bottom,
                                               cfg.top, seed), LR)
    return ours, ours_batches, reference, ref_batches


def run(cfg: BenchConfig, reps: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    print(f"[{cfg.name}] building models and {min(reps, 8)} batches ...", file=sys.stderr)
    ours, ours_batches, reference, ref_batches = build(cfg, min(reps, 8))
    n = len(ours_batches)
    for i in range(warmup):
        reference.step(*ref_batches[i % n])
        ours.step(ours_batches[i % n])
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    losses: dict[str, list[float]] = {"ours": [], "reference": []}
    for r in range(reps):
        order = ("reference", "ours") if r % 2 == 0 else ("ours", "reference")
        for side in order:
            start = time.perf_counter()
            if side == "ours":
                loss = ours.step(ours_batches[r % n])
            else:
                loss = reference.step(*ref_batches[r % n])
            times[side].append(time.perf_counter() - start)
            losses[side].append(loss)
    out = {"config": cfg.__dict__ | {"bottom": list(cfg.bottom), "top": list(cfg.top)}}
    for side, ts in times.items():
        ts_sorted = sorted(ts)
        median = statistics.median(ts)
        out[side] = {"median_ms": median * 1e3, "p10_ms": ts_sorted[len(ts) // 10] * 1e3,
                     "p90_ms": ts_sorted[(9 * len(ts)) // 10] * 1e3,
                     "samples_per_s": cfg.batch / median, "final_loss": losses[side][-1]}
    out["ratio"] = out["ours"]["samples_per_s"] / out["reference"]["samples_per_s"]
    # reference time / our time per repetition (run back to back), then the median
    out["paired_ratio_median"] = statistics.median(
        r / o for r, o in zip(times["reference"], times["ours"]))
    out["target_ratio"] = cfg.target_ratio
    del ours, reference, ours_batches, ref_batches
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="a,b", help="comma-separated: a, b (default a,b)")
    parser.add_argument("--reps", type=int, default=30, help="timed steps per side (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc malloc as it is (by default the process gets "
                             "dlrm_runtime.embeddings.tune_malloc, as dlrm-run does; it speeds up "
                             "both sides)")
    args = parser.parse_args(argv)
    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()

    load_before = os.getloadavg()
    gflops = matmul_gflops(args.threads)
    results = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name.strip()]
        result = run(cfg, args.reps, args.warmup, args.threads)
        flops = mlp_flops(cfg)
        result["mlp_gflop_per_step"] = flops / 1e9
        result["dense_floor_ms"] = flops / (gflops * 1e9) * 1e3
        result["ours_over_floor"] = result["ours"]["median_ms"] / result["dense_floor_ms"]
        result["floor_within"] = cfg.floor_within
        results.append(result)
    gflops_after = matmul_gflops(args.threads)
    doc = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__,
                    "matmul_gflops": max(gflops, gflops_after),
                    "matmul_gflops_before_after": [gflops, gflops_after],
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "malloc_tuned": malloc_tuned},
        "reps": args.reps, "warmup": args.warmup,
        "results": results,
    }
    for result in results:  # the floor from the better of the two rate measurements
        flops = result["mlp_gflop_per_step"] * 1e9
        result["dense_floor_ms"] = flops / (doc["machine"]["matmul_gflops"] * 1e9) * 1e3
        result["ours_over_floor"] = result["ours"]["median_ms"] / result["dense_floor_ms"]
    print(format_table(doc))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"written {out}", file=sys.stderr)
    return 0


def format_table(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"torch {m['torch']}, {m['threads']} threads, fp32 matmul {m['matmul_gflops']:.0f} "
             f"GFLOP/s, load average {m['loadavg_before'][0]:.2f} -> {m['loadavg_after'][0]:.2f}",
             f"{'config':6} {'side':10} {'ms/step':>9} {'p10-p90 ms':>15} {'samples/s':>11} "
             f"{'ratio':>6} {'target':>7} {'paired':>7}"]
    for r in doc["results"]:
        name = r["config"]["name"]
        for side in ("reference", "ours"):
            s = r[side]
            ratio = f"{r['ratio']:.2f}x" if side == "ours" else ""
            target = f">={r['target_ratio']}x" if side == "ours" else ""
            paired = f"{r['paired_ratio_median']:.2f}x" if side == "ours" else ""
            lines.append(f"{name:6} {side:10} {s['median_ms']:9.2f} "
                         f"{s['p10_ms']:7.2f}-{s['p90_ms']:<7.2f} {s['samples_per_s']:11,.0f} "
                         f"{ratio:>6} {target:>7} {paired:>7}")
        floor = (f"{name:6} {'floor':10} {r['dense_floor_ms']:9.2f}  MLP {r['mlp_gflop_per_step']:.2f}"
                 f" GFLOP/step; ours = {r['ours_over_floor']:.2f}x the floor")
        if r["floor_within"]:
            floor += f" (target <= {r['floor_within']}x)"
        lines.append(floor)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
