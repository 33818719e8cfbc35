"""Cached tiers at scale: two processes train like one, checkpoints are one
transaction across ranks and stores, resume is bitwise exact, and a SIGKILL of any
rank (or all) at any instant leaves a run that ``--resume`` continues from the newest
step every part committed (step 0 when none).

The runs are :mod:`tests.dlrm_runtime.tiered_worker` in forked processes (see
:mod:`tests.dlrm_runtime.tiered_trials`); two ranks talk gloo over loopback, with
torchrun's environment variables.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dlrm_runtime import ModelConfig, SyntheticClicks, TrainConfig, Trainer, embeddings_from_plan
from dlrm_runtime.checkpoint import FAULT_POINTS, list_checkpoints, read_decision
from dlrm_runtime.model import DLRM
from planner import Tier
from tests.dlrm_runtime import tiered_trials as trials
from tests.dlrm_runtime import tiered_worker as worker

STEPS = 8


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs, checkpointing every step, in 1 and 2 processes."""
    root = tmp_path_factory.mktemp("tiered")
    out = {}
    for world in (1, 2):
        out[world] = root / f"reference-{world}"
        trials.reference(out[world], STEPS, 1, world)
    return out


def test_two_processes_train_like_one(references) -> None:
    one, two = references[1], references[2]
    torch.testing.assert_close(torch.tensor(_losses(two), dtype=torch.float64),
                               torch.tensor(_losses(one), dtype=torch.float64), rtol=1e-5, atol=0)
    assert len(_losses(one)) == STEPS
    step_1, state_1, arrays_1 = trials.final_state(one)
    step_2, state_2, arrays_2 = trials.final_state(two)
    assert step_1 == step_2 == STEPS
    # every rank's store (weights and row-wise Adagrad state) against the one process's
    assert sorted(arrays_1) == sorted(arrays_2) == [
        "device-0/t1/state", "device-0/t1/weight", "device-0/t2.rows-0-300/weight",
        "device-1/t2.rows-300-900/weight"]
    initial = {}
    for key, want in arrays_1.items():
        np.testing.assert_allclose(arrays_2[key], want, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(want).max()), err_msg=key)
        initial[key] = want
    # the in-memory tables and their optimizer state, from the runtime checkpoints
    for name, entry in state_1["tables"].items():
        for key, want in entry.items():
            torch.testing.assert_close(state_2["tables"][name][key], want, rtol=1e-4,
                                       atol=1e-5 * float(want.abs().max()))
    for part in ("bottom", "top"):
        for key, want in state_1["dense"][part].items():
            torch.testing.assert_close(state_2["dense"][part][key], want, rtol=1e-4, atol=1e-6)
    # training moved the cached tables (the comparison is not vacuous)
    fresh = embeddings_from_plan(worker.tiered_plan(), torch.device("cpu"), seed=4,
                                 store_dir=str(one.parent / "fresh"))
    try:
        for name in ("t1", "t2"):
            assert not torch.equal(fresh.weight(name), _weight(arrays_1, name))
    finally:
        fresh.close()


def _weight(arrays: dict[str, np.ndarray], name: str) -> torch.Tensor:
    parts = sorted((key for key in arrays if key.split("/")[1].split(".")[0] == name
                    and key.endswith("/weight")),
                   key=lambda k: int(k.split(".rows-")[1].split("-")[0]) if ".rows-" in k else 0)
    return torch.from_numpy(np.concatenate([arrays[k] for k in parts]))


@pytest.mark.parametrize("world", [1, 2])
def test_stop_and_resume_ends_bitwise_equal(references, tmp_path: Path, world: int) -> None:
    """Stopped at step 3 (after its checkpoint), resumed to the end: the runtime
    checkpoint and every store array equal the uninterrupted run's, bit for bit."""
    rng = random.Random(0)
    first = trials.launch(tmp_path, 3, 1, world, None, rng)
    assert not first.killed and first.resumed == [None] * world
    second = trials.launch(tmp_path, STEPS, 1, world, None, rng)
    assert second.resumed == [3] * world and second.first_step == 4
    assert trials.differences(references[world], tmp_path) == []


@pytest.mark.parametrize("world", [1, 2])
def test_sigkills_at_named_points_and_random_instants(references, tmp_path: Path,
                                                      world: int) -> None:
    """Real SIGKILLs: at every point of the checkpoint protocol (on rank 0, on the last
    rank, on every rank) and at random instants (of one rank, or of all); each
    relaunch resumes from the step the run had committed, and the end state is the
    uninterrupted run's, bit for bit."""
    rng = random.Random(1000 + world)
    span = trials.reference(tmp_path / "timing", STEPS, 1, world)
    ranks = [0, world - 1, None]
    kills = [trials.Kill(point=point, step=2 + i, rank=ranks[i % len(ranks)])
             for i, point in enumerate(FAULT_POINTS)]
    kills += [trials.Kill(after_s=rng.uniform(0.0, span), step=-1,
                          rank=None if i % 2 else rng.randrange(world)) for i in range(3)]
    launches = trials.chain(tmp_path / "run", kills, STEPS, 1, world, rng)
    assert sum(launch.killed for launch in launches) >= len(FAULT_POINTS)
    committed = [launch.committed_before for launch in launches]
    assert committed[:len(FAULT_POINTS) + 1] == [None, 1, 2, 4, 5]  # 'decided' rolls forward
    assert trials.differences(references[world], tmp_path / "run") == []


def test_a_crash_between_the_runtime_checkpoint_and_the_store_restarts(tmp_path: Path,
                                                                       capsys) -> None:
    """Killed after the first runtime checkpoint was written but before any store
    committed: nothing is committed, ``--resume`` starts from step 0 and says so in one
    line, and a plain run may start too."""
    rng = random.Random(2)
    killed = trials.launch(tmp_path, STEPS, 2, 2, trials.Kill(point="saved", step=2, rank=0),
                           rng)
    assert killed.killed and read_decision(tmp_path / "ck") is None
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [2]  # written, undecided
    stores = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert stores == ["device-0", "device-1"]

    from cli import run as run_cli
    from cli.errors import ExitCode
    from planner import write_plan

    write_plan(worker.tiered_plan(), tmp_path / "plan.json")
    args = ["--plan", str(tmp_path / "plan.json"), "--bottom-mlp", "16,8", "--top-mlp", "8,1",
            "--batch-size", "32", "--steps", "2", "--eval-batches", "1", "--no-progress",
            "--threads", "1", "--checkpoint-dir", str(tmp_path / "ck"),
            "--store-dir", str(tmp_path / "store"), "--embedding-lr", "0.1", "--seed", "4"]
    assert run_cli.main([*args, "--resume"]) == ExitCode.OK
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"nothing committed in {tmp_path / 'ck'}: starting from step 0"
    assert read_decision(tmp_path / "ck") == 2
    assert run_cli.main([*args, "--steps", "4", "--resume"]) == ExitCode.OK
    assert capsys.readouterr().out.splitlines()[0] == "resumed from step 2"


def test_cached_training_equals_in_memory_training_bitwise(tmp_path: Path) -> None:
    """When every batch's rows fit the slots, training through the caches (which evict
    and refill rows across steps) gives the in-memory weights bit for bit: duplicate
    ids are summed per row id in id order on both paths. (Row-wise tables are left
    out: one process keeps a row-wise table's in-memory shards of one device in one
    weight, so its bags are summed in another order than shard by shard.)"""
    plan = worker.tiered_plan(cache_rows=120)
    t1 = plan.table("t1")
    whole = dataclasses.replace(t1, name="t2", shards=(dataclasses.replace(
        t1.shards[0], device=1, row_end=plan.tables_spec.by_name("t2").num_embeddings,
        tier=Tier.DRAM_CACHE),))
    cached_plan = dataclasses.replace(plan, tables=tuple(
        whole if t.name == "t2" else t for t in plan.tables))
    plain_plan = _all_in_memory(cached_plan)
    config = TrainConfig(batch_size=32, lr=0.05, embedding_lr=0.1, dense_optimizer="sgd",
                         threads=1)
    models = [_model(plain_plan), _model(cached_plan, tmp_path / "store")]
    try:
        data = SyntheticClicks(cached_plan.tables_spec, 13, seed=4)
        trainers = [Trainer(m, config) for m in models]
        for step in range(12):
            batch = data.batch(step, 32)
            models[1].embeddings.prefetch(data.batch(step + 1, 32).sparse)
            losses = [t.step(batch) for t in trainers]
            assert losses[0] == losses[1], step
        stats = models[1].embeddings.cache_stats()
        assert stats["evictions"] > 0 and stats["uncached"] == 0
        for spec in cached_plan.tables_spec.tables:
            assert torch.equal(models[1].embeddings.weight(spec.name),
                               models[0].embeddings.weight(spec.name)), spec.name
    finally:
        models[1].embeddings.close()


def _all_in_memory(plan):
    tables = tuple(
        dataclasses.replace(t, shards=tuple(dataclasses.replace(s, tier=Tier.HBM, cache_rows=0)
                                            for s in t.shards))
        for t in plan.tables)
    return dataclasses.replace(plan, tables=tables)


def _model(plan, store: Path | None = None) -> DLRM:
    torch.manual_seed(4)
    embeddings = embeddings_from_plan(plan, torch.device("cpu"), seed=4,
                                      store_dir=None if store is None else str(store),
                                      embedding_lr=0.1)
    dims = [t.embedding_dim for t in plan.tables_spec.tables]
    return DLRM(ModelConfig(dense_features=13, bottom_mlp=(16, 8), top_mlp=(8, 1)),
                embeddings, dims, seed=4)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_a_refused_run_writes_nothing_and_verify_finds_a_flipped_byte(tmp_path: Path,
                                                                      capsys) -> None:
    """Refusals (a fresh --store-dir on --resume, a truncated or foreign decision record,
    checkpoints without --resume) leave every file as it was and create none; a flipped
    byte in a committed chunk is named by ``dlrm-store verify`` and stops the resumed
    run on its first read, before it trains on it."""
    from cli import run as run_cli
    from cli import store as store_cli
    from cli.errors import ExitCode
    from planner import write_plan

    write_plan(worker.tiered_plan(), tmp_path / "plan.json")
    ck, store = tmp_path / "ck", tmp_path / "store"

    def args(steps: int, store_dir: Path = store, *extra: str) -> list[str]:
        return ["--plan", str(tmp_path / "plan.json"), "--bottom-mlp", "16,8", "--top-mlp",
                "8,1", "--batch-size", "32", "--steps", str(steps), "--eval-batches", "1",
                "--no-progress", "--threads", "1", "--checkpoint-dir", str(ck),
                "--checkpoint-every", "2", "--store-dir", str(store_dir), "--embedding-lr",
                "0.1", "--seed", "4", "--deterministic", *extra]

    assert run_cli.main(args(4)) == ExitCode.OK
    assert store_cli.main(["verify", str(store), "--no-progress"]) == ExitCode.OK
    capsys.readouterr()
    before = _tree(tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    decision = ck / "committed.json"
    original = decision.read_bytes()
    cases = [
        ("fresh store dir", args(6, fresh, "--resume"), None, "has no table store"),
        ("no --resume", args(6), None, "already holds checkpoints"),
        ("truncated decision", args(6, store, "--resume"), original[:len(original) // 2],
         "decision record"),
        ("decision of step 999", args(6, store, "--resume"),
         original.replace(b'"step": 4', b'"step": 999'), "step 999"),
    ]
    for what, argv, record, fragment in cases:
        if record is not None:
            decision.write_bytes(record)
        expected = _tree(tmp_path)
        assert run_cli.main(argv) == ExitCode.BAD_INPUT, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, (what, err)
        assert _tree(tmp_path) == expected, f"{what}: the refused run wrote files"
        assert not any(fresh.iterdir())
        decision.write_bytes(original)
    assert _tree(tmp_path) == before

    chunk = store / "device-0" / "t1" / "weight" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0x04
    chunk.write_bytes(bytes(data))
    assert store_cli.main(["verify", str(store), "--no-progress"]) == ExitCode.BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "device-0" in lines[0] and "'t1/weight' block 0" in lines[0]
    stores = _tree(store)
    assert run_cli.main(args(6, store, "--resume")) == ExitCode.BAD_INPUT
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the "training ..." line
    assert last.startswith("dlrm-run: error:") and "t1/weight: block 0" in last, last
    assert _tree(store) == stores
