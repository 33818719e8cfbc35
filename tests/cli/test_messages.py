"""What the CLIs tell the user: help for every flag, epochs, short validation, resumed
runs, Ctrl-C, calibration spread; and how they behave around it: torch-free
planning, the user's umask, cost models from the current directory, table names
the store accepts."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli import plan as plan_cli
from cli import run as run_cli
from cli.errors import ExitCode
from tests.conftest import small_tables_doc, small_topology_doc, write_json

ROOT = Path(__file__).resolve().parents[2]


def _parsers() -> list[argparse.ArgumentParser]:
    """Every parser the CLIs build: each ``build*parser`` function of cli modules."""
    import importlib
    import pkgutil

    import cli

    found = []
    for info in pkgutil.iter_modules(cli.__path__):
        module = importlib.import_module(f"cli.{info.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if (name.startswith("build") and name.endswith("parser")
                    and fn.__module__ == module.__name__):
                found.append(fn())
    return found


def test_every_flag_has_help() -> None:
    parsers = _parsers()
    assert {p.prog for p in parsers} >= {"dlrm-plan", "dlrm-run", "dlrm-plan show",
                                         "dlrm-plan calibrate", "dlrm-plan profile",
                                         "dlrm-plan evaluate"}
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in parsers for a in p._actions
               if not isinstance(a, argparse._HelpAction)
               and (not a.help or not a.help.strip() or a.help == argparse.SUPPRESS)]
    assert missing == []


TORCH_FREE = """
import sys
from cli import plan
try:
    plan.main(["--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
assert "torch" not in sys.modules, "--help imported torch"
code = plan.main(sys.argv[1:])
assert code == 0, code
assert "torch" not in sys.modules, "planning imported torch"
"""


def test_dlrm_plan_does_not_import_torch(tmp_path: Path, tables_file: Path,
                                         topology_file: Path) -> None:
    argv = ["--tables", str(tables_file), "--topology", str(topology_file),
            "-o", str(tmp_path / "p.json"), "-q", "--time-limit", "5"]
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.json").is_file()


def test_errors_map_without_importing_the_runtime() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys; import cli.errors; "
                               "assert 'dlrm_runtime' not in sys.modules; "
                               "assert 'torch' not in sys.modules"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


def test_exit_code_table_names_real_error_types() -> None:
    import importlib

    from cli.errors import EXIT_CODES

    for module_name, class_name, _ in EXIT_CODES:
        kind = getattr(importlib.import_module(module_name), class_name)
        assert isinstance(kind, type) and issubclass(kind, Exception), (module_name, class_name)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_plans_are_written_with_the_umask(tmp_path: Path, tables_file: Path,
                                          topology_file: Path, mask: int, mode: int) -> None:
    old = os.umask(mask)
    try:
        out = tmp_path / "plan.json"
        assert plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                              "-o", str(out), "-q", "--time-limit", "5"]) == ExitCode.OK
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode


MODEL = """
from planner import AnalyticCostModel


class Slower(AnalyticCostModel):
    pass
"""


def test_cost_model_from_the_current_directory(tmp_path: Path, tables_file: Path,
                                               topology_file: Path, monkeypatch,
                                               capsys) -> None:
    (tmp_path / "my_local_costs.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_local_costs", raising=False)
    out = tmp_path / "plan.json"
    code = plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                          "-o", str(out), "-q", "--time-limit", "5",
                          "--cost-model", "my_local_costs:Slower"])
    assert code == ExitCode.OK, capsys.readouterr().err
    assert json.loads(out.read_text())["cost_model"] == "my_local_costs:Slower"
    assert str(tmp_path) not in sys.path  # the directory is not left on the path


# ---------------------------------------------------------------- table names


@settings(max_examples=300, derandomize=True, database=None)
@given(name=st.one_of(st.text(max_size=12),
                      st.text(alphabet="abcXYZ019_.-/\\ ", max_size=12),
                      st.integers(90, 130).map(lambda n: "a" * n)))
def test_table_names_follow_the_store_rule(name: str) -> None:
    """The planner accepts exactly the names the table store accepts (short enough
    for a row shard's store table, ``<name>.rows-<start>-<end>``, too)."""
    from planner.inputs import MAX_TABLE_NAME_CHARS, table_name_problem
    from storage.errors import TableSpecError
    from storage.layout import check_table_name

    try:
        check_table_name(name)
        store_accepts = True
    except TableSpecError:
        store_accepts = False
    planner_accepts = table_name_problem(name) is None
    assert planner_accepts == (store_accepts and len(name) <= MAX_TABLE_NAME_CHARS)
    if planner_accepts:
        check_table_name(f"{name}.rows-{10 ** 11 - 1}-{10 ** 11}")


# ---------------------------------------------------------------- training messages


def _plan(tmp_path: Path, tables: dict, topology: dict, *extra: str) -> Path:
    write_json(tmp_path / "tables.json", tables)
    write_json(tmp_path / "topology.json", topology)
    out = tmp_path / "plan.json"
    assert plan_cli.main(["--tables", str(tmp_path / "tables.json"), "--topology",
                          str(tmp_path / "topology.json"), "-o", str(out), "-q",
                          "--time-limit", "5", *extra]) == ExitCode.OK
    return out


def _criteo(path: Path, n: int) -> Path:
    import random

    rng = random.Random(0)
    lines = []
    for i in range(n):
        dense = [str(rng.randint(0, 50)) for _ in range(13)]
        cats = [format(rng.randrange(1000), "08x") for _ in range(26)]
        lines.append("\t".join([str(i % 2), *dense, *cats]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_epochs_and_short_validation_are_said(tmp_path: Path, capsys) -> None:
    tables = {"tables": [{"name": f"C{i + 1}", "num_embeddings": 1000, "embedding_dim": 8,
                          "pooling_factor": 1.0} for i in range(26)]}
    plan = _plan(tmp_path, tables, small_topology_doc(hbm_gb=1.0), "--tiers", "hbm")
    data = _criteo(tmp_path / "day.tsv", 400)
    capsys.readouterr()
    code = run_cli.main(["--plan", str(plan), "--data", str(data), "--train-lines", "0:300",
                         "--validation-lines", "300:400", "--batch-size", "64", "--steps", "10",
                         "--eval-batches", "20", "--bottom-mlp", "16,8", "--no-progress",
                         "--threads", "1"])
    err = capsys.readouterr().err
    assert code == ExitCode.OK, err
    assert "cycle the 300 training samples 2.13 times (2.13 epochs" in err
    assert "validating on 64 samples (1 batches of 64), fewer than the --eval-batches 20" in err
    assert "hold 100 samples" in err


def test_one_epoch_says_nothing(tmp_path: Path, capsys) -> None:
    tables = {"tables": [{"name": f"C{i + 1}", "num_embeddings": 1000, "embedding_dim": 8,
                          "pooling_factor": 1.0} for i in range(26)]}
    plan = _plan(tmp_path, tables, small_topology_doc(hbm_gb=1.0), "--tiers", "hbm")
    data = _criteo(tmp_path / "day.tsv", 300)
    capsys.readouterr()
    assert run_cli.main(["--plan", str(plan), "--data", str(data), "--batch-size", "64",
                         "--steps", "4", "--bottom-mlp", "16,8", "--no-progress",
                         "--threads", "1"]) == ExitCode.OK
    assert "epochs" not in capsys.readouterr().err


def test_resumed_run_counts_its_own_steps(tmp_path: Path, tables_file: Path,
                                          topology_file: Path, capsys) -> None:
    plan = tmp_path / "plan.json"
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                          "-o", str(plan), "-q", "--time-limit", "5"]) == ExitCode.OK
    argv = ["--plan", str(plan), "--bottom-mlp", "16,8", "--no-progress", "--threads", "1",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert run_cli.main([*argv, "--steps", "2"]) == ExitCode.OK
    capsys.readouterr()
    assert run_cli.main([*argv, "--steps", "5", "--resume"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "resumed from step 2" in out
    assert "trained 3 steps (steps 3-5) x 64 samples" in out


@pytest.mark.parametrize("checkpoints", [True, False])
def test_ctrl_c_names_the_checkpoint_and_the_resume_command(
        tmp_path: Path, tables_file: Path, topology_file: Path, capsys, monkeypatch,
        checkpoints: bool) -> None:
    import importlib

    train_module = importlib.import_module("dlrm_runtime.train")
    plan = tmp_path / "plan.json"
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                          "-o", str(plan), "-q", "--time-limit", "5"]) == ExitCode.OK
    real = train_module.Trainer.step
    calls = []

    def step(self, batch, timer=None):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, batch, timer)

    monkeypatch.setattr(train_module.Trainer, "step", step)
    ckpt = tmp_path / "ckpt dir"
    argv = ["--plan", str(plan), "--steps", "6", "--bottom-mlp", "16,8", "--no-progress",
            "--threads", "1"]
    if checkpoints:
        argv += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
    capsys.readouterr()
    assert run_cli.main(argv) == ExitCode.INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dlrm-run: interrupted during step 4; ")
    if checkpoints:
        assert f"the last checkpoint is step 2 in {ckpt}" in err
        assert err.endswith(f"resume with: dlrm-run --plan {plan} --steps 6 --bottom-mlp 16,8 "
                            f"--no-progress --threads 1 --checkpoint-dir '{ckpt}' "
                            f"--checkpoint-every 2 --resume")
    else:
        assert "no checkpoint was written" in err


# ---------------------------------------------------------------- calibrate


def _calibration(scale: float):
    from dlrm_runtime.calibrate import Calibration

    return Calibration("cpu", 1.0 * scale, 2.0, 3.0, 0.5, 0.25, None, "none",
                       "2026-01-01T00:00:00+00:00", dense_gflops=10.0 * scale,
                       dense_gbps=1.0, dense_step_ms=0.5)


@pytest.mark.parametrize("scales, warned", [((1.0, 1.1, 0.95), False),
                                            ((1.0, 1.5, 0.9), True)])
def test_calibrate_shows_the_spread_and_warns(tmp_path: Path, capsys, monkeypatch,
                                              scales: tuple[float, ...], warned: bool) -> None:
    from dlrm_runtime import calibrate

    rounds = iter(scales)
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: _calibration(next(rounds)))
    out = tmp_path / "topology.json"
    code = plan_cli.main(["calibrate", "-o", str(out), "--rounds", "3", "--no-network",
                          "--hbm-gb", "1", "--dram-gb", "2"])
    err = capsys.readouterr().err
    assert code == ExitCode.OK, err
    assert "round 3 of 3" in err
    low, high = min(scales), max(scales)
    assert f"device_gbps: {low:.4g} / 1 / {high:.4g} ({(high - low):.0%})" in err
    assert ("warning: the rounds disagree by more than 20 % on device_gbps" in err) is warned
    assert json.loads(out.read_text())["device"]["hbm_gbps"] == 1.0


def test_spread_of_figures() -> None:
    from dlrm_runtime.calibrate import spreads

    found = {s.figure: s for s in spreads([_calibration(1.0), _calibration(1.3),
                                           _calibration(1.0)])}
    assert found["device_gbps"].relative == pytest.approx(0.3)
    assert found["device_gbps"].disagrees and not found["h2d_gbps"].disagrees
    assert "all_to_all_gbps" not in found  # not measured
    assert dataclasses.is_dataclass(found["h2d_gbps"])
