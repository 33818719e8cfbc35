"""Training process for the tiered (cached tables) tests and crash trials (run as a
script, not collected).

``python tiered_worker.py OUT STEPS [--resume] [--every N]`` trains
:func:`tiered_plan` with its tables' store in ``OUT/store`` and checkpoints in
``OUT/ck`` every ``N`` steps (default :data:`EVERY`), deterministic, one thread, in
one process or, when launched by torchrun (or with its environment variables), on
every rank; rank 0 prints ``done`` at the end and the result's notice line, if any.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dlrm_runtime import (  # noqa: E402
    ModelConfig,
    TrainConfig,
    init_from_env,
    train,
    train_distributed,
)
from dlrm_runtime.distributed import shutdown  # noqa: E402
from planner import Sharding, Tier  # noqa: E402
from tests.dlrm_runtime.helpers import sharded, table_wise, tables, topology  # noqa: E402

EVERY = 2
MODEL = ModelConfig(dense_features=13, bottom_mlp=(16, 8), top_mlp=(8, 1))
BATCH = 32


def tiered_plan(cache_rows: int = 48):
    """Two devices: t0 in HBM on device 1; t1 (row-wise Adagrad) cached whole over the
    store on device 0; t2 (SGD) row-wise over DRAM on devices 0 and 1; t3 (row-wise
    Adagrad) row-wise in HBM. ``cache_rows`` slots per cached shard."""
    spec = tables(num_tables=4, rows=300, dim=8,
                  optimizers=("sgd", "rowwise_adagrad", "sgd", "rowwise_adagrad"))
    names = [t.name for t in spec.tables]
    rows = [t.num_embeddings for t in spec.tables]
    cut = rows[2] // 3
    return table_wise(spec, topology(hosts=1, devices_per_host=2), {
        names[0]: sharded(names[0], Sharding.TABLE_WISE, (1, 0, rows[0], 0, 8)),
        names[1]: sharded(names[1], Sharding.TABLE_WISE,
                          (0, 0, rows[1], 0, 8, Tier.STORE_CACHE, cache_rows)),
        names[2]: sharded(names[2], Sharding.ROW_WISE,
                          (0, 0, cut, 0, 8, Tier.DRAM_CACHE, cache_rows),
                          (1, cut, rows[2], 0, 8, Tier.DRAM_CACHE, cache_rows)),
        names[3]: sharded(names[3], Sharding.ROW_WISE, (0, 0, 120, 0, 8),
                          (1, 120, rows[3], 0, 8)),
    })


def config(out: Path, steps: int, resume: bool, every: int = EVERY) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=BATCH, lr=0.05, embedding_lr=0.1,
                       dense_optimizer="adagrad", eval_batches=1, log_every=1, seed=4,
                       threads=1, checkpoint_dir=str(out / "ck"), checkpoint_every=every,
                       resume=resume, store_dir=str(out / "store"), deterministic=True)


def run(out: Path, steps: int, *, every: int = EVERY, resume: bool = False):
    """One process's part of the run (every rank of a torch.distributed run calls it);
    rank 0 appends metrics to ``OUT/metrics.jsonl``. Returns the
    :class:`~dlrm_runtime.TrainResult`."""
    world = init_from_env()
    finished = False
    try:
        lead = world == 1 or torch.distributed.get_rank() == 0
        log = open(out / "metrics.jsonl", "a", encoding="utf-8") if lead else None
        try:
            run_fn = train_distributed if world > 1 else train
            result = run_fn(tiered_plan(), MODEL, config(out, steps, resume, every),
                            metrics_log=log)
        finally:
            if log is not None:
                log.close()
        finished = True
    finally:
        shutdown(synchronize=finished)
    return result


def main(argv: list[str]) -> int:
    out, steps = Path(argv[0]), int(argv[1])
    every = int(argv[argv.index("--every") + 1]) if "--every" in argv else EVERY
    result = run(out, steps, every=every, resume="--resume" in argv)
    if result.notice:
        print(result.notice, flush=True)
    print(f"done {result.resumed_from}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
