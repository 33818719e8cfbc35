"""Training process for the kill-and-resume test (run as a script, not collected).

``python train_worker.py CHECKPOINT_DIR STEPS [--resume]`` trains a small model on
one thread with a checkpoint every :data:`EVERY` steps into CHECKPOINT_DIR and
prints ``done`` at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dlrm_runtime import ModelConfig, TrainConfig, train  # noqa: E402
from tests.dlrm_runtime.helpers import table_wise, tables, topology  # noqa: E402

EVERY = 10
MODEL = ModelConfig(dense_features=13, bottom_mlp=(32, 8), top_mlp=(16, 1))


def config(directory: str, steps: int, resume: bool) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=64, lr=0.05, embedding_lr=0.1,
                       dense_optimizer="adagrad", eval_batches=1, log_every=10, seed=4,
                       threads=1, checkpoint_dir=directory, checkpoint_every=EVERY,
                       resume=resume)


def plan():
    spec = tables(num_tables=3, rows=5_000, dim=8,
                  optimizers=("sgd", "rowwise_adagrad", "adam"))
    return table_wise(spec, topology(hosts=1, devices_per_host=2))


def main(argv: list[str]) -> int:
    directory, steps = argv[0], int(argv[1])
    train(plan(), MODEL, config(directory, steps, "--resume" in argv))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
