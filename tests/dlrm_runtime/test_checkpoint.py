"""Checkpoints: exact resume (also after SIGKILL), atomic writes, foreign checkpoints refused."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlrm_runtime import (
    CheckpointError,
    ConfigError,
    ModelConfig,
    SyntheticClicks,
    TrainConfig,
    TrainingDivergedError,
    train,
)
from dlrm_runtime import checkpoint as ckpt
from dlrm_runtime.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from planner import Sharding
from tests.dlrm_runtime import train_worker
from tests.dlrm_runtime.helpers import sharded, table_wise, tables, topology

MODEL = ModelConfig(dense_features=13, bottom_mlp=(16, 8), top_mlp=(8, 1))
ROOT = Path(__file__).resolve().parents[2]


def _plan(**overrides):
    spec = tables(optimizers=("sgd", "rowwise_adagrad", "adam"))
    return table_wise(spec, topology(), overrides)


def _config(directory: Path, steps: int, **changes) -> TrainConfig:
    base = TrainConfig(steps=steps, batch_size=32, eval_batches=2, log_every=5, seed=2,
                       checkpoint_dir=str(directory), checkpoint_every=4)
    return dataclasses.replace(base, **changes)


def _assert_equal(a, b, where: str = "state") -> None:
    """Bit-exact equality of nested checkpoint states."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def _final_state(directory: Path) -> dict:
    path = latest_checkpoint(directory)
    assert path is not None
    return load_checkpoint(path)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    whole = train(_plan(), MODEL, _config(tmp_path / "a", 12))
    assert [step for step, _ in list_checkpoints(tmp_path / "a")] == [12]  # older ones dropped
    first = train(_plan(), MODEL, _config(tmp_path / "b", 7))  # checkpoints at 4 and 7
    assert first.checkpoint.endswith("ckpt-0000000007")
    rest = train(_plan(), MODEL, _config(tmp_path / "b", 12, resume=True))
    assert rest.resumed_from == 7 and rest.checkpoint.endswith("ckpt-0000000012")
    _assert_equal(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))
    assert rest.train_loss == whole.train_loss
    assert rest.validation == whole.validation
    # nothing left to do: resuming at the last step only evaluates
    again = train(_plan(), MODEL, _config(tmp_path / "b", 12, resume=True))
    assert again.validation == whole.validation and again.samples_per_s == 0.0


def test_killed_at_any_instant_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """SIGKILL a training process at a random moment after its first checkpoint (maybe
    inside a checkpoint write), resume from what it left, and compare every weight and
    optimizer state bit for bit with an uninterrupted run (one thread everywhere)."""
    steps = 300
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.Popen([sys.executable, str(Path(train_worker.__file__)),
                               str(tmp_path / "killed"), str(steps)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list_checkpoints(tmp_path / "killed"):
            assert killed.poll() is None, killed.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.002)
        time.sleep(random.uniform(0.0, 0.3))
        killed.send_signal(signal.SIGKILL)
    finally:
        killed.kill()  # no-op once dead; cleans up when an assertion failed
        killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "finished before the kill: make the run longer"
    # the uninterrupted run, after the kill (run beside the worker, it let the worker
    # finish before the kill landed)
    train(train_worker.plan(), train_worker.MODEL,
          train_worker.config(str(tmp_path / "whole"), steps, resume=False))
    # one complete checkpoint, or two when the kill came after a new one was renamed
    # into place but before the older one was removed: the newest is the run's
    found = list_checkpoints(tmp_path / "killed")
    assert 1 <= len(found) <= 2
    cut = found[-1]
    assert 0 < cut[0] < steps
    resumed = train(train_worker.plan(), train_worker.MODEL,
                    train_worker.config(str(tmp_path / "killed"), steps, resume=True))
    assert resumed.resumed_from == cut[0]
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]
    _assert_equal(_final_state(tmp_path / "whole"), _final_state(tmp_path / "killed"))


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    train(_plan(), MODEL, _config(tmp_path, 4))
    real_save = torch.save

    def torn_save(obj, out):
        out.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands for a kill in the middle of the write

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        train(_plan(), MODEL, _config(tmp_path, 8, resume=True))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    result = train(_plan(), MODEL, _config(tmp_path, 8, resume=True))
    assert result.resumed_from == 4
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-0000000008"]  # leftovers removed


def test_resume_into_another_sharding_of_the_same_plan_inputs(tmp_path: Path) -> None:
    """Tables are saved whole, so a checkpoint loads into any placement of the tables."""
    whole = train(_plan(), MODEL, _config(tmp_path / "a", 8))
    train(_plan(), MODEL, _config(tmp_path / "b", 4))
    row_wise = {"t1": sharded("t1", Sharding.ROW_WISE, (0, 0, 300, 0, 8), (3, 300, 1000, 0, 8)),
                "t2": sharded("t2", Sharding.COLUMN_WISE, (1, 0, 1500, 0, 5), (2, 0, 1500, 5, 8))}
    resharded = train(_plan(**row_wise), MODEL, _config(tmp_path / "b", 8, resume=True))
    assert resharded.resumed_from == 4
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    for name in ("t0", "t1", "t2"):
        for key, tensor in a["tables"][name].items():
            torch.testing.assert_close(b["tables"][name][key], tensor, atol=1e-6, rtol=1e-5)
    assert resharded.validation.auc == pytest.approx(whole.validation.auc, abs=1e-4)


def test_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    train(_plan(), MODEL, _config(tmp_path, 4))
    with pytest.raises(CheckpointError, match="comes from another run \\(seed: 2 there, 3 here\\)"):
        train(_plan(), MODEL, _config(tmp_path, 8, resume=True, seed=3))
    other_model = dataclasses.replace(MODEL, top_mlp=(4, 1))
    with pytest.raises(CheckpointError, match="model: "):
        train(_plan(), other_model, _config(tmp_path, 8, resume=True))
    other_tables = table_wise(tables(num_tables=2), topology())
    with pytest.raises(CheckpointError, match="plan_inputs_sha256: "):
        train(other_tables, MODEL, _config(tmp_path, 8, resume=True))
    with pytest.raises(CheckpointError, match="batch_size: 32 there, 16 here"):
        train(_plan(), MODEL, _config(tmp_path, 8, resume=True, batch_size=16))
    # learning rates may change on resume (e.g. lowered after a divergence)
    assert train(_plan(), MODEL, _config(tmp_path, 8, resume=True, lr=0.01)).resumed_from == 4


def test_checkpoint_errors(tmp_path: Path) -> None:
    fresh = train(_plan(), MODEL, _config(tmp_path / "empty", 4, resume=True))
    assert fresh.resumed_from is None  # resume-if-present: nothing there, so from step 0
    assert fresh.notice == f"nothing committed in {tmp_path / 'empty'}: starting from step 0"
    train(_plan(), MODEL, _config(tmp_path, 8))
    with pytest.raises(CheckpointError, match="already holds checkpoints \\(newest committed: "
                                              "step 8\\)"):
        train(_plan(), MODEL, _config(tmp_path, 8))
    with pytest.raises(CheckpointError, match="at step 8, past the 6 steps"):
        train(_plan(), MODEL, _config(tmp_path, 6, resume=True))
    (latest_checkpoint(tmp_path) / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="is unreadable"):
        train(_plan(), MODEL, _config(tmp_path, 9, resume=True))
    (latest_checkpoint(tmp_path) / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="has no state.pt"):
        train(_plan(), MODEL, _config(tmp_path, 9, resume=True))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"checkpoint_dir": None, "checkpoint_every": 0, "resume": True}, "resume needs checkpoint_dir"),
        ({"checkpoint_dir": None, "checkpoint_every": 5}, "checkpoint_every needs checkpoint_dir"),
        ({"checkpoint_every": -1}, "checkpoint_every must be >= 0"),
    ],
)
def test_checkpoint_config_errors(tmp_path: Path, changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        train(_plan(), MODEL, _config(tmp_path, 4, **changes))


def test_nan_names_the_step_and_the_last_good_checkpoint(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    original = SyntheticClicks.batch

    def poisoned(self, index, batch_size):
        batch = original(self, index, batch_size)
        if index == 10:
            batch.dense[0, 0] = float("nan")
        return batch

    monkeypatch.setattr(SyntheticClicks, "batch", poisoned)
    with pytest.raises(TrainingDivergedError) as info:
        train(_plan(), MODEL, _config(tmp_path, 20))
    expected = str(tmp_path / "ckpt-0000000008")
    assert info.value.step == 10 and info.value.checkpoint == expected
    assert f"at step 10; the last good checkpoint is {expected}" in str(info.value)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [8]
    with pytest.raises(TrainingDivergedError, match="no checkpoint was written"):
        train(_plan(), MODEL, TrainConfig(steps=12, batch_size=32))


def test_nan_right_after_a_resume_suspects_the_checkpoint(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    train(_plan(), MODEL, _config(tmp_path, 8))
    original = SyntheticClicks.batch

    def poisoned(self, index, batch_size):
        batch = original(self, index, batch_size)
        if index == 9:
            batch.dense[0, 0] = float("nan")
        return batch

    monkeypatch.setattr(SyntheticClicks, "batch", poisoned)
    with pytest.raises(TrainingDivergedError) as info:
        train(_plan(), MODEL, dataclasses.replace(_config(tmp_path, 20), resume=True))
    message = str(info.value)
    assert info.value.step == 9 and info.value.resumed_from == 8
    assert "the checkpoint itself may be damaged" in message and "dlrm-store verify" in message
    assert "continue from it with --resume" not in message
    with pytest.raises(TrainingDivergedError) as later:  # a checkpoint written since: as before
        train(_plan(), MODEL, dataclasses.replace(_config(tmp_path, 20), resume=True,
                                                  checkpoint_every=1))
    assert later.value.resumed_from is None and "--resume" in str(later.value)


def test_deterministic_mode_trains_and_is_restored(tmp_path: Path) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    plain = train(_plan(), MODEL, _config(tmp_path / "a", 6))
    strict = train(_plan(), MODEL, _config(tmp_path / "b", 6, deterministic=True))
    assert not torch.are_deterministic_algorithms_enabled()
    assert strict.validation == plain.validation
    _assert_equal(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))


def test_cli_checkpoint_and_resume_flags(tmp_path: Path, capsys) -> None:
    from cli import run as run_cli
    from cli.errors import ExitCode
    from planner import write_plan

    plan_file = tmp_path / "plan.json"
    write_plan(_plan(), plan_file)
    common = ["--plan", str(plan_file), "--bottom-mlp", "16,8", "--batch-size", "32",
              "--eval-batches", "1", "--no-progress", "--checkpoint-dir", str(tmp_path / "ck"),
              "--threads", "1", "--deterministic"]
    assert run_cli.main([*common, "--steps", "6", "--checkpoint-every", "3"]) == ExitCode.OK
    assert f"checkpoint: {tmp_path / 'ck' / 'ckpt-0000000006'}" in capsys.readouterr().out
    assert run_cli.main([*common, "--steps", "9", "--resume"]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert printed.startswith("resumed from step 6") and "ckpt-0000000009" in printed
