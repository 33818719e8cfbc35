"""Data to plan to measurement through the CLIs: Criteo data in dlrm-run, the measured
time split beside the prediction, and `dlrm-plan show --measured`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import plan as plan_cli
from cli import run as run_cli
from cli.errors import ExitCode
from tests.cli.test_cli import _criteo_lines, _plan_file
from tests.conftest import small_topology_doc, write_json

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def criteo(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A Criteo TSV of 600 lines (one malformed), 26 small tables, and a plan for them."""
    data = tmp_path / "day.tsv"
    data.write_text(_criteo_lines(600))
    doc = json.loads((ROOT / "examples" / "criteo_kaggle.tables.json").read_text())
    for table in doc["tables"]:
        table["num_embeddings"] = min(table["num_embeddings"], 300)
    tables = write_json(tmp_path / "tables.json", doc)
    topology = write_json(tmp_path / "topology.json", small_topology_doc(hbm_gb=0.01))
    return data, tables, _plan_file(tmp_path, tables, topology)


def test_run_trains_on_criteo_line_ranges(tmp_path: Path, criteo, capsys) -> None:
    data, tables, plan = criteo
    log = tmp_path / "run.jsonl"
    argv = ["--plan", str(plan), "--tables", str(tables), "--data", str(data),
            "--train-lines", "0:500", "--validation-lines", "500:", "--steps", "6",
            "--batch-size", "64", "--bottom-mlp", "16,16", "--no-progress", "--metrics-log",
            str(log)]
    assert run_cli.main(argv) == ExitCode.OK
    captured = capsys.readouterr()
    assert "train: 499 samples from lines 0:500" in captured.err
    assert "1 malformed lines skipped" in captured.err
    assert "validation: 101 samples" in captured.err
    # one whole batch of validation samples exists: evaluation is capped to it
    assert "validation (64 samples)" in captured.out and "teacher" not in captured.out
    assert (tmp_path / "day.tsv.0-500.cache").exists()
    assert (tmp_path / "day.tsv.500-end.cache").exists()
    evals = [json.loads(line) for line in log.read_text().splitlines() if '"eval"' in line]
    assert evals[0]["teacher_auc"] is None
    # the second run reuses the caches; without validation lines evaluation is skipped
    assert run_cli.main(argv[:8] + argv[10:]) == ExitCode.OK
    captured = capsys.readouterr()
    assert "no validation data" in captured.out and "parse" not in captured.err.lower()


def test_run_data_errors(tmp_path: Path, criteo, capsys) -> None:
    data, _, plan = criteo
    base = ["--plan", str(plan), "--steps", "1", "--bottom-mlp", "16,16", "--no-progress"]
    assert run_cli.main([*base, "--train-lines", "0:10"]) == ExitCode.BAD_INPUT
    assert "need --data" in capsys.readouterr().err
    assert run_cli.main([*base, "--data", str(data), "--strict"]) == ExitCode.BAD_INPUT
    assert "line 6" in capsys.readouterr().err
    assert run_cli.main([*base, "--data", str(data), "--batch-size", "200",
                         "--validation-lines", "500:600"]) == ExitCode.BAD_INPUT
    assert "fewer than one batch of 200" in capsys.readouterr().err
    for bad in ("10", "5:5", "a:b", "-1:4"):
        with pytest.raises(SystemExit) as info:
            run_cli.main([*base, "--data", str(data), "--train-lines", bad])
        assert info.value.code == 2


def test_show_measured_puts_the_run_beside_the_plan(tmp_path: Path, tables_file: Path,
                                                    topology_file: Path, capsys) -> None:
    plan = _plan_file(tmp_path, tables_file, topology_file)
    log = tmp_path / "run.jsonl"
    assert run_cli.main(["--plan", str(plan), "--steps", "5", "--bottom-mlp", "16,8",
                         "--no-progress", "--metrics-log", str(log)]) == ExitCode.OK
    record = [json.loads(line) for line in log.read_text().splitlines()
              if '"timing"' in line][0]
    measured, predicted = record["measured"], record["predicted"]
    assert measured["steps"] == 5 and measured["step_ms"] > 0
    assert measured["step_ms"] == pytest.approx(measured["lookup_ms"] + measured["dense_ms"]
                                                + measured["update_ms"]
                                                + measured["communication_ms"])
    assert 0 < measured["median_step_ms"] <= 5 * measured["step_ms"]  # 5 steps: mean >= median / 5
    assert measured["steal_share"] is None or 0 <= measured["steal_share"] <= 1
    assert predicted["devices"] == [0, 1] and predicted["dense_ms"] is None
    # all of the plan's devices run on this process's CPU: nothing is communicated
    assert measured["communication_ms"] == 0 and predicted["communication_ms"] == 0
    assert measured["embedding_bytes"] <= predicted["hbm_bytes"] + predicted["dram_bytes"]
    capsys.readouterr()
    assert plan_cli.main(["show", str(plan), "--measured", str(log)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "measured by dlrm-run at step 5" in out and "update (emb. backward+optimizer)" in out
    step = [line for line in out.splitlines() if line.strip().startswith("step")][0]
    assert float(step.split()[2]) == pytest.approx(measured["median_step_ms"], abs=1e-3)
    assert len(measured["median_phase_ms"]) == 4 and "median" in out
    assert "no dense prediction" in out and "not calibrated" in out

    other = tmp_path / "other.json"
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                          "-o", str(other), "-q", "--baseline", "random"]) == ExitCode.OK
    assert plan_cli.main(["show", str(other), "--measured", str(log)]) == ExitCode.BAD_INPUT
    assert "measured on another plan" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"event": "train"}\n')
    assert plan_cli.main(["show", str(plan), "--measured", str(empty)]) == ExitCode.BAD_INPUT
    assert "no timing record" in capsys.readouterr().err
    assert plan_cli.main(["show", str(plan), "--measured",
                          str(tmp_path / "none.jsonl")]) == ExitCode.BAD_INPUT


def test_calibrated_dense_rate_gives_a_full_prediction(tmp_path: Path, tables_file: Path,
                                                       capsys) -> None:
    doc = small_topology_doc()
    doc["device"]["dense_gflops"] = 50.0
    topology = write_json(tmp_path / "cal.json", doc)
    plan = _plan_file(tmp_path, tables_file, topology)
    capsys.readouterr()
    assert run_cli.main(["--plan", str(plan), "--steps", "3", "--bottom-mlp", "16,8",
                         "--no-progress"]) == ExitCode.OK
    out = capsys.readouterr().out
    step = [line for line in out.splitlines() if line.strip().startswith("step")][0]
    assert "unknown" not in step and float(step.split()[2]) > 0


def test_dlrm_run_under_torchrun(tmp_path: Path, tables_file: Path, topology_file: Path) -> None:
    import subprocess
    import sys

    plan = _plan_file(tmp_path, tables_file, topology_file)  # 2 devices: 2 processes
    log = tmp_path / "run.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cli.run", "--plan", str(plan), "--steps", "4", "--batch-size", "32",
         "--bottom-mlp", "16,8", "--threads", "1", "--eval-batches", "1", "--no-progress",
         "--metrics-log", str(log)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr}"
    assert "on 2 processes" in done.stderr and done.stdout.count("trained 4 steps") == 1
    ranks = [json.loads(line).get("rank") for line in log.read_text().splitlines()
             if '"timing"' in line]
    assert ranks == [0, 1]
    three = write_json(tmp_path / "three.json", small_topology_doc(devices=3))
    other = tmp_path / "plan3.json"
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(three), "-o",
                          str(other), "-q"]) == ExitCode.OK
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cli.run", "--plan", str(other), "--steps", "1", "--bottom-mlp", "16,8",
         "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode != 0
    assert "has 3 devices but torchrun started 2 processes" in done.stderr
