"""Training over torch.distributed: 2 processes (gloo on loopback, launched by torchrun)
compute what 1 process computes, for a plan mixing every sharding type.

One torchrun launch (``--standalone``: a free port) runs every multi-process scenario
(the workers are this module's ``__main__``) and rank 0 saves the results; the tests
compare them with one-process runs of :class:`dlrm_runtime.Trainer` and
:func:`dlrm_runtime.train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlrm_runtime import (
    ConfigError,
    ModelConfig,
    PlanMismatchError,
    SyntheticClicks,
    TrainConfig,
    Trainer,
    build_model,
    train,
)
from dlrm_runtime.checkpoint import export_tables, latest_checkpoint, load_checkpoint
from dlrm_runtime.distributed import init_from_env, process_group_info, shutdown
from dlrm_runtime.config import Interaction
from dlrm_runtime.distributed import (
    DistributedTrainer,
    local_batch,
    lookup_jobs,
    train_distributed,
)
from dlrm_runtime.embeddings import placements_from_plan
from dlrm_runtime.prepare import check_batch_size, check_world_size
from planner import Sharding, Tier
from tests.dlrm_runtime.helpers import sharded, table_wise, tables, topology

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(dense_features=13, bottom_mlp=(16, 8), top_mlp=(8, 1))
CAT_MODEL = dataclasses.replace(MODEL, interaction=Interaction.CAT)
STEPS = 5
BATCH = 32
SCENARIOS = (("dot", MODEL, "adagrad"), ("cat", CAT_MODEL, "adam"), ("lopsided", MODEL, "sgd"),
             ("host", MODEL, "adagrad"))
OPTIMIZERS = ("sgd", "rowwise_adagrad", "adam", "rowwise_adagrad", "adam", "rowwise_adagrad",
              "rowwise_adagrad", "sgd")


def mixed_plan():
    """Eight tables on two devices (one host), every sharding type: table-wise on
    either device, row-wise and table-row-wise (uneven; two shards on one device),
    column-wise across devices (row-wise Adagrad: row statistics shared between
    ranks) and data-parallel (Adam: touched rows matter; SGD)."""
    spec = tables(num_tables=8, rows=40, dim=8, optimizers=OPTIMIZERS)
    rows = [t.num_embeddings for t in spec.tables]
    names = [t.name for t in spec.tables]
    overrides = {
        names[0]: sharded(names[0], Sharding.TABLE_WISE, (1, 0, rows[0], 0, 8)),
        names[1]: sharded(names[1], Sharding.ROW_WISE, (1, 30, rows[1], 0, 8), (0, 0, 30, 0, 8)),
        names[2]: sharded(names[2], Sharding.TABLE_ROW_WISE, (1, 0, 7, 0, 8),
                          (0, 7, 50, 0, 8), (1, 50, rows[2], 0, 8)),
        names[3]: sharded(names[3], Sharding.COLUMN_WISE, (1, 0, rows[3], 3, 8),
                          (0, 0, rows[3], 0, 3)),
        names[4]: sharded(names[4], Sharding.DATA_PARALLEL, (0, 0, rows[4], 0, 8),
                          (1, 0, rows[4], 0, 8)),
        names[5]: sharded(names[5], Sharding.TABLE_WISE, (0, 0, rows[5], 0, 8)),
        names[6]: sharded(names[6], Sharding.COLUMN_WISE, (0, 0, rows[6], 0, 2),
                          (1, 0, rows[6], 2, 5), (0, 0, rows[6], 5, 8)),
        names[7]: sharded(names[7], Sharding.DATA_PARALLEL, (1, 0, rows[7], 0, 8),
                          (0, 0, rows[7], 0, 8)),
    }
    return table_wise(spec, topology(hosts=1, devices_per_host=2), overrides)


def lopsided_plan():
    """Every table on device 0: rank 1 serves no lookup, only sends ids and receives."""
    spec = tables(num_tables=3, rows=40, dim=8, optimizers=("sgd", "rowwise_adagrad", "adam"))
    rows = [t.num_embeddings for t in spec.tables]
    names = [t.name for t in spec.tables]
    return table_wise(spec, topology(hosts=1, devices_per_host=2), {
        names[1]: sharded(names[1], Sharding.TABLE_WISE, (0, 0, rows[1], 0, 8)),
        names[2]: sharded(names[2], Sharding.ROW_WISE, (0, 0, 9, 0, 8), (0, 9, rows[2], 0, 8)),
    })


def host_plan():
    """:func:`mixed_plan` with every model-parallel table in the host tier (rows in host
    memory, pooled on the device); it trains like the in-device mixed plan."""
    plan = mixed_plan()
    return dataclasses.replace(plan, tables=tuple(
        t if t.sharding is Sharding.DATA_PARALLEL else dataclasses.replace(
            t, shards=tuple(dataclasses.replace(s, tier=Tier.HOST) for s in t.shards))
        for t in plan.tables))


def scenario_plan(name: str):
    return {"lopsided": lopsided_plan, "host": host_plan}.get(name, mixed_plan)()


def config(**changes) -> TrainConfig:
    base = TrainConfig(steps=STEPS, batch_size=BATCH, lr=0.05, embedding_lr=0.1,
                       dense_optimizer="adagrad", eval_batches=2, log_every=2, seed=3, threads=1)
    return dataclasses.replace(base, **changes)


def ckpt_config(directory: Path, steps: int, resume: bool) -> TrainConfig:
    return config(steps=steps, checkpoint_dir=str(directory), checkpoint_every=2, resume=resume)


# ---------------------------------------------------------------- the workers (torchrun)


def _error(build) -> str:
    try:
        build()
    except (ConfigError, PlanMismatchError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _worker(out: Path) -> None:
    """Every multi-process scenario; rank 0 saves what the tests compare."""
    torch.set_num_threads(1)
    world = init_from_env()
    rank = process_group_info().rank
    plan = mixed_plan()
    results: dict = {"world": world}
    for name, model_config, dense_optimizer in SCENARIOS:
        cfg = config(dense_optimizer=dense_optimizer)
        run_plan = scenario_plan(name)
        trainer = DistributedTrainer(run_plan, model_config, cfg)
        data = SyntheticClicks(run_plan.tables_spec, model_config.dense_features, cfg.seed)
        losses = [trainer.step(data.batch(s, BATCH)) for s in range(STEPS)]
        results[name] = {"losses": losses, "tables": trainer.gather_tables(),
                         "dense": trainer.model.state_dict() if rank == 0 else None,
                         "host_modules": sum(m.compute_device is not None for m in
                                             [*trainer.embeddings.whole,
                                              *trainer.embeddings.shards])}
    three = table_wise(tables(num_tables=3, rows=40), topology(hosts=1, devices_per_host=3))
    results["mismatch"] = _error(lambda: DistributedTrainer(three, MODEL, config()))
    results["indivisible"] = _error(lambda: DistributedTrainer(plan, MODEL, config(batch_size=33)))
    # checkpoints: 2 processes write one (the tests resume it in 1) and resume one
    # written by 1 process (the tests write it before the launch)
    with open(out / f"metrics-{rank}.jsonl", "w", encoding="utf-8") as log:
        train_distributed(plan, MODEL, ckpt_config(out / "from2", 2, False), metrics_log=log)
    resumed = train_distributed(plan, MODEL, ckpt_config(out / "from1", STEPS, True))
    results["resumed"] = resumed
    if rank == 0:
        torch.save(results, out / "results.pt")
    # every rank waits for the others before closing its connections: a rank that exits
    # while a peer still uses the process group is aborted by gloo
    shutdown(synchronize=True)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, dict]:
    """Write the 1-process checkpoint, launch the workers, return their results."""
    out = tmp_path_factory.mktemp("distributed")
    train(mixed_plan(), MODEL, ckpt_config(out / "from1", 2, False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")  # the venv's launcher script
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    done = subprocess.run(
        [*launcher, "--standalone", "--nproc_per_node", "2", "-m",
         "tests.dlrm_runtime.test_distributed", str(out)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-12000:]
    return out, torch.load(out / "results.pt", weights_only=False)


# ---------------------------------------------------------------- one process for reference


def _one_process(model_config: ModelConfig, cfg: TrainConfig, plan):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        trainer = Trainer(build_model(plan, model_config, cfg.seed), cfg)
        data = SyntheticClicks(plan.tables_spec, model_config.dense_features, cfg.seed)
        losses = [trainer.step(data.batch(s, BATCH)) for s in range(STEPS)]
    finally:
        torch.set_num_threads(threads)
    return trainer, losses, export_tables(plan.tables_spec, trainer.row_opt)


def _assert_tables_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, entry in expected.items():
        assert got[name].keys() == entry.keys(), name
        for key, want in entry.items():  # optimizer states are tiny: a relative atol
            atol = 1e-5 * float(want.abs().max()) + 1e-30
            torch.testing.assert_close(got[name][key], want, rtol=1e-4, atol=atol,
                                       msg=lambda m, n=name, k=key: f"table {n} {k}: {m}")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_two_processes_train_like_one(launched, scenario) -> None:
    _, results = launched
    assert results["world"] == 2
    name, model_config, dense_optimizer = scenario
    # the host scenario against the same shards in device memory
    plan = lopsided_plan() if name == "lopsided" else mixed_plan()
    trainer, losses, tables_1 = _one_process(model_config, config(dense_optimizer=dense_optimizer),
                                             plan)
    got = results[name]
    assert (got["host_modules"] > 0) == (name == "host")  # rank 0's weights in host memory
    torch.testing.assert_close(torch.tensor(got["losses"], dtype=torch.float64),
                               torch.tensor(losses, dtype=torch.float64), rtol=1e-5, atol=0)
    _assert_tables_close(got["tables"], tables_1)
    dense_1 = trainer.model.state_dict()
    dense_2 = got["dense"]
    for key in ("bottom", "top"):
        for param, value in dense_1.items():
            if param.startswith(key):
                torch.testing.assert_close(dense_2[param], value, rtol=1e-4, atol=1e-6)
    # the updates moved every kind of table: the comparison is not vacuous
    initial = build_model(plan, model_config, 3).embeddings
    for spec in plan.tables_spec.tables:
        assert not torch.equal(initial.weight(spec.name), tables_1[spec.name]["weight"]), spec.name


def _final_state(directory: Path) -> dict:
    path = latest_checkpoint(directory)
    assert path is not None and path.name.endswith(f"{STEPS:010d}")
    return load_checkpoint(path)


def test_checkpoints_resume_across_process_counts(launched) -> None:
    out, results = launched
    plan = mixed_plan()
    straight = train(plan, MODEL, ckpt_config(out / "straight", STEPS, False))
    expected = _final_state(out / "straight")
    # written by 2 processes at step 2, resumed by 1 process
    train(plan, MODEL, ckpt_config(out / "from2", STEPS, True))
    # written by 1 process at step 2, resumed by 2 processes
    resumed = results["resumed"]
    assert resumed.resumed_from == 2
    for directory in ("from2", "from1"):
        state = _final_state(out / directory)
        _assert_tables_close(state["tables"], expected["tables"])
        for part in ("bottom", "top"):
            for key, value in expected["dense"][part].items():
                torch.testing.assert_close(state["dense"][part][key], value, rtol=1e-4, atol=1e-6)
        assert state["row_optimizer_steps"] == expected["row_optimizer_steps"]
        torch.testing.assert_close(torch.tensor(state["recent_losses"]),
                                   torch.tensor(expected["recent_losses"]), rtol=1e-5, atol=0)
    assert straight.validation is not None and resumed.validation is not None
    assert resumed.validation.samples == straight.validation.samples
    assert resumed.validation.loss == pytest.approx(straight.validation.loss, rel=1e-5)
    assert resumed.validation.auc == pytest.approx(straight.validation.auc, abs=1e-3)
    assert resumed.train_loss == pytest.approx(straight.train_loss, rel=1e-5)


def test_only_rank_0_logs(launched) -> None:
    out, _ = launched
    records = [json.loads(line) for line in (out / "metrics-0.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["train", "checkpoint", "timing", "timing", "eval"]
    assert (out / "metrics-1.jsonl").read_text() == ""
    # one timing record per rank: its measured phases beside the prediction for its device
    for rank, record in enumerate(records[2:4]):
        assert record["rank"] == rank and record["predicted"]["devices"] == [rank]
        measured = record["measured"]
        assert measured["communication_ms"] > 0 and measured["lookup_ms"] > 0
        assert measured["step_ms"] == pytest.approx(
            measured["lookup_ms"] + measured["communication_ms"] + measured["dense_ms"]
            + measured["update_ms"])


def test_errors_in_the_workers_name_the_fix(launched) -> None:
    _, results = launched
    assert results["mismatch"].startswith("PlanMismatchError: the plan has 3 devices but "
                                          "torchrun started 2 processes")
    assert "--topology of 2 devices" in results["mismatch"]
    assert results["indivisible"].startswith("ConfigError: batch_size 33 is not divisible by "
                                             "the world size 2")


# ---------------------------------------------------------------- without a process group


def test_world_size_must_match_the_plan() -> None:
    plan = mixed_plan()
    check_world_size(plan, 2)
    with pytest.raises(PlanMismatchError, match=r"plan has 2 devices but torchrun started 4 processes.*"
                                                r"--topology of 4 devices"):
        check_world_size(plan, 4)


def test_batch_must_divide_by_the_world_size() -> None:
    assert check_batch_size(32, 4) == 8
    for bad in (30, 2):
        with pytest.raises(ConfigError, match=f"batch_size {bad} is not divisible by the world "
                                              f"size 4"):
            check_batch_size(bad, 4)
    batch = SyntheticClicks(mixed_plan().tables_spec, 13, 0).batch(0, 6)
    with pytest.raises(ConfigError, match="not divisible"):
        local_batch(batch, 0, 4)


def test_local_batches_tile_the_global_batch() -> None:
    batch = SyntheticClicks(mixed_plan().tables_spec, 13, 0).batch(0, 12)
    parts = [local_batch(batch, r, 3) for r in range(3)]
    torch.testing.assert_close(torch.cat([p.dense for p in parts]), batch.dense)
    torch.testing.assert_close(torch.cat([p.labels for p in parts]), batch.labels)
    for t, (ids, offsets) in enumerate(zip(batch.sparse.ids, batch.sparse.offsets)):
        assert torch.equal(torch.cat([p.sparse.ids[t] for p in parts]), ids)
        for p in parts:
            assert p.sparse.offsets[t][0] == 0 and p.sparse.batch_size == 4
            assert p.sparse.offsets[t][-1] == p.sparse.ids[t].numel()


def _jobs(plan, world: int):
    return lookup_jobs(plan.tables_spec.tables, placements_from_plan(plan), world)


def test_lookup_jobs_follow_the_plan() -> None:
    jobs, replicated = _jobs(mixed_plan(), 2)
    assert replicated == (4, 7)
    by_table = {}
    for job in jobs:
        by_table.setdefault(job.table, []).append((job.owner, job.shard.row_start,
                                                  job.shard.col_start))
    assert by_table[1] == [(0, 0, 0), (1, 30, 0)]  # row order
    assert by_table[3] == [(0, 0, 0), (1, 0, 3)]  # column order
    assert by_table[6] == [(0, 0, 0), (1, 0, 2), (0, 0, 5)]


def test_lookup_jobs_carry_the_host_tier() -> None:
    jobs, replicated = _jobs(host_plan(), 2)
    assert replicated == (4, 7)
    assert jobs and all(job.host for job in jobs)
    assert not any(job.host for job in _jobs(mixed_plan(), 2)[0])


def test_data_parallel_needs_a_replica_on_every_rank() -> None:
    spec = tables(num_tables=2, rows=40)
    name = spec.tables[0].name
    plan = table_wise(spec, topology(hosts=1, devices_per_host=2),
                      {name: sharded(name, Sharding.DATA_PARALLEL, (0, 0, 40, 0, 8))})
    with pytest.raises(PlanMismatchError, match="replica on every device 0..1, got \\[0\\]"):
        _jobs(plan, 2)


def test_init_from_env_without_torchrun(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE must be an integer, got 'two'"):
        init_from_env()
    with pytest.raises(ConfigError, match="no torch.distributed process group"):
        process_group_info()
    with pytest.raises(ConfigError, match="launch with torchrun"):
        DistributedTrainer(mixed_plan(), MODEL, config())


if __name__ == "__main__":  # a torchrun worker (see the ``launched`` fixture)
    _worker(Path(sys.argv[1]))
