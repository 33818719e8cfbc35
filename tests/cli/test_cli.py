"""The CLIs called in-process through main(argv): outputs, exit codes, nothing written on error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import plan as plan_cli
from cli import run as run_cli
from cli.errors import ExitCode
from tests.conftest import small_tables_doc, small_topology_doc, write_json


def _plan_file(tmp_path: Path, tables_file: Path, topology_file: Path) -> Path:
    out = tmp_path / "plan.json"
    code = plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                          "-o", str(out), "-q"])
    assert code == ExitCode.OK
    return out


def test_plan_writes_file_and_prints_devices(tmp_path: Path, tables_file: Path,
                                             topology_file: Path, capsys) -> None:
    out = tmp_path / "out" / "plan.json"
    code = plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                          "-o", str(out), "--time-limit", "60"])  # a loaded machine slows CBC
    assert code == ExitCode.OK
    printed = capsys.readouterr().out
    assert "load ms" in printed and "gap 0.00%" in printed and str(out) in printed
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1 and len(doc["devices"]) == 2


def test_show(tmp_path: Path, tables_file: Path, topology_file: Path, capsys) -> None:
    path = _plan_file(tmp_path, tables_file, topology_file)
    capsys.readouterr()
    assert plan_cli.main(["show", str(path)]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert "load imbalance" in printed and "table_wise" in printed and "t3" in printed


def test_bad_spec_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, topology_file: Path,
                                                           capsys) -> None:
    doc = small_tables_doc()
    doc["tables"][1]["num_embeddings"] = -3
    bad = write_json(tmp_path / "bad.json", doc)
    out = tmp_path / "plan.json"
    code = plan_cli.main(["--tables", str(bad), "--topology", str(topology_file), "-o", str(out)])
    assert code == ExitCode.BAD_INPUT == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"dlrm-plan: error: {bad}: tables[1].num_embeddings: must be >= 1, got -3")
    assert "Traceback" not in "".join(err)
    assert not out.exists()


def test_infeasible_exits_3(tmp_path: Path, tables_file: Path, capsys) -> None:
    tiny = write_json(tmp_path / "tiny.json", small_topology_doc(hbm_gb=1e-7))
    out = tmp_path / "plan.json"
    code = plan_cli.main(["--tables", str(tables_file), "--topology", str(tiny), "-o", str(out)])
    assert code == ExitCode.INFEASIBLE == 3
    assert "infeasible: hbm short by" in capsys.readouterr().err
    assert not out.exists()


def test_bad_cost_model_exits_2(tmp_path: Path, tables_file: Path, topology_file: Path,
                                capsys) -> None:
    code = plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                          "-o", str(tmp_path / "p.json"), "--cost-model", "nope"])
    assert code == ExitCode.BAD_INPUT
    assert "must look like module:Class" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["show", "--help"]])
def test_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        plan_cli.main(argv)
    assert info.value.code == 0
    assert "exit codes:" in capsys.readouterr().out


def test_bad_flags_exit_2(tables_file: Path, topology_file: Path) -> None:
    with pytest.raises(SystemExit) as info:
        plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                       "-o", "x.json", "--time-limit", "-1"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        run_cli.main(["--plan", "p.json", "--bottom-mlp", "a,b"])
    assert info.value.code == 2


def test_run_trains_and_reports(tmp_path: Path, tables_file: Path, topology_file: Path,
                                capsys) -> None:
    path = _plan_file(tmp_path, tables_file, topology_file)
    log = tmp_path / "metrics.jsonl"
    code = run_cli.main(["--plan", str(path), "--tables", str(tables_file), "--steps", "20",
                         "--eval-batches", "2", "--log-every", "10", "--no-progress",
                         "--bottom-mlp", "16,8", "--metrics-log", str(log)])
    assert code == ExitCode.OK
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "AUC" in printed and "teacher's AUC" in printed
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events == ["train", "train", "timing", "eval"]
    assert "time per step" in printed and "embedding memory" in printed


def test_run_rejects_other_tables(tmp_path: Path, tables_file: Path, topology_file: Path,
                                  capsys) -> None:
    path = _plan_file(tmp_path, tables_file, topology_file)
    other = write_json(tmp_path / "other.json", small_tables_doc(num_tables=3))
    code = run_cli.main(["--plan", str(path), "--tables", str(other), "--steps", "1"])
    assert code == ExitCode.BAD_INPUT
    assert "plan.json was made for other tables than" in capsys.readouterr().err


def test_run_missing_plan_and_bad_config(tmp_path: Path, tables_file: Path, topology_file: Path,
                                         capsys) -> None:
    assert run_cli.main(["--plan", str(tmp_path / "none.json")]) == ExitCode.BAD_INPUT
    assert "no such file" in capsys.readouterr().err
    path = _plan_file(tmp_path, tables_file, topology_file)
    code = run_cli.main(["--plan", str(path), "--bottom-mlp", "16,9", "--steps", "1"])
    assert code == ExitCode.BAD_INPUT
    assert "dot interaction needs one width" in capsys.readouterr().err


def test_plan_flags_baseline_and_restrictions(tmp_path: Path, tables_file: Path,
                                              topology_file: Path) -> None:
    out = tmp_path / "p.json"
    base = ["--tables", str(tables_file), "--topology", str(topology_file), "-o", str(out), "-q"]
    assert plan_cli.main([*base, "--baseline", "size"]) == ExitCode.OK
    assert json.loads(out.read_text())["method"] == "baseline:size"
    assert plan_cli.main([*base, "--sharding", "row_wise", "--tiers", "hbm,dram_cache",
                          "--cache-fractions", "0.1,0.3"]) == ExitCode.OK
    doc = json.loads(out.read_text())
    assert {t["sharding"] for t in doc["tables"]} == {"row_wise"}
    for argv in (["--sharding", "diagonal"], ["--tiers", ""], ["--cache-fractions", "1.5"],
                 ["--baseline", "best"]):
        with pytest.raises(SystemExit) as info:
            plan_cli.main([*base, *argv])
        assert info.value.code == 2


def test_evaluate_command(tmp_path: Path, tables_file: Path, topology_file: Path, capsys) -> None:
    path = _plan_file(tmp_path, tables_file, topology_file)
    capsys.readouterr()
    out = tmp_path / "recosted.json"
    code = plan_cli.main(["evaluate", str(path), "--cost-model", "planner.cost:AnalyticCostModel",
                          "-o", str(out)])
    assert code == ExitCode.OK
    assert "re-costed under planner:AnalyticCostModel" in capsys.readouterr().out
    assert json.loads(out.read_text())["method"] == "evaluate"
    small = write_json(tmp_path / "one.json", small_topology_doc(devices=1))
    assert plan_cli.main(["evaluate", str(path), "--topology", str(small)]) == ExitCode.BAD_INPUT
    assert "plan.json places shards on 2 devices but --topology" in capsys.readouterr().err


def test_show_chart(tmp_path: Path, tables_file: Path, topology_file: Path) -> None:
    path = _plan_file(tmp_path, tables_file, topology_file)
    chart = tmp_path / "charts" / "plan.png"
    assert plan_cli.main(["show", str(path), "--chart", str(chart)]) == ExitCode.OK
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_writes_a_topology_the_planner_uses(tmp_path: Path, tables_file: Path,
                                                      capsys) -> None:
    from planner import load_topology

    out = tmp_path / "calibrated.json"
    code = plan_cli.main(["calibrate", "-o", str(out), "--quick", "--hbm-gb", "0.002",
                          "--devices", "2", "--batch-size-per-device", "64",
                          "--store-dir", str(tmp_path)])
    assert code == ExitCode.OK
    err = capsys.readouterr().err
    assert "device gather" in err and "store: read" in err and "all-to-all (gloo" in err
    assert "[1/7] device gather" in err and "[7/7] all-to-all" in err  # progress
    topology = load_topology(out)
    assert topology.world_size == 2 and topology.device.hbm_gb == 0.002
    assert dict(topology.calibration)["date"].startswith("20")
    assert topology.store.read_gbps > 0 and topology.network.intra_host_gbps > 0
    assert topology.device.dense_gflops > 0 and "training runs" in err
    assert topology.device.optimizer_ns_per_id >= 0
    assert "per extra shard" in err and topology.device.shard_overhead_ms >= 0
    assert topology.device.cache_ns_per_miss >= 0
    plan_file = tmp_path / "plan.json"
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(out), "-o",
                          str(plan_file), "-q"]) == ExitCode.OK


def test_calibrate_refuses_zero_rounds(tmp_path: Path, capsys) -> None:
    out = tmp_path / "calibrated.json"
    assert plan_cli.main(["calibrate", "-o", str(out), "--rounds", "0"]) == ExitCode.BAD_INPUT
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def _criteo_lines(n: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    lines = []
    for i in range(n):
        dense = [str(rng.randint(0, 50)) if rng.random() > 0.1 else "" for _ in range(13)]
        cats = [format(min(int(rng.paretovariate(1.2)), 10_000), "08x") for _ in range(26)]
        lines.append("\t".join([str(i % 2), *dense, *cats]))
    lines.insert(5, "not\ta\tcriteo\tline")
    return "\n".join(lines) + "\n"


def test_profile_data_then_plan(tmp_path: Path, capsys) -> None:
    from planner import load_tables

    data = tmp_path / "day.tsv"
    data.write_text(_criteo_lines(400))
    tables = tmp_path / "kaggle.json"
    doc = json.loads((Path(__file__).resolve().parents[2] / "examples"
                      / "criteo_kaggle.tables.json").read_text())
    for table in doc["tables"]:
        table["num_embeddings"] = min(table["num_embeddings"], 5000)
    write_json(tables, doc)
    out = tmp_path / "profiled.json"
    code = plan_cli.main(["profile", str(data), "--tables", str(tables), "-o", str(out)])
    assert code == ExitCode.OK
    assert "1 malformed lines skipped" in capsys.readouterr().err
    profiled = load_tables(out)
    assert all(t.access.hot_rows and t.pooling_factor == 1.0 for t in profiled.tables)
    assert (tmp_path / "day.tsv.cache").exists()
    plan_out = tmp_path / "plan.json"
    assert plan_cli.main(["--tables", str(out), "--topology",
                          str(Path(__file__).resolve().parents[2] / "examples"
                              / "criteo_kaggle.topology.json"),
                          "-o", str(plan_out), "-q", "--time-limit", "5"]) == ExitCode.OK
    assert plan_cli.main(["profile", str(data), "--tables", str(tables), "-o", str(out),
                          "--strict", "--cache", str(tmp_path / "strict.cache")]) == 2
    assert "line 6" in capsys.readouterr().err


def test_resume_without_checkpoint_starts_from_step_0(tmp_path: Path, tables_file: Path,
                                                      topology_file: Path, capsys) -> None:
    """Resume-if-present: nothing committed yet, so the run starts and says so."""
    path = _plan_file(tmp_path, tables_file, topology_file)
    capsys.readouterr()
    common = ["--plan", str(path), "--steps", "2", "--bottom-mlp", "16,8",
              "--checkpoint-dir", str(tmp_path / "none"), "--no-progress"]
    assert run_cli.main([*common, "--resume"]) == ExitCode.OK
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"nothing committed in {tmp_path / 'none'}: starting from step 0"
    assert run_cli.main(common) == ExitCode.BAD_INPUT  # without --resume: not over a run
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "Traceback" not in err
