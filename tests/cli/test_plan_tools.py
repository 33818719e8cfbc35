"""``dlrm-plan capacity``, ``diff`` and ``--from``/``--max-migrate-gb`` in-process: outputs,
exit codes, nothing written on error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from cli import plan as plan_cli
from cli.errors import ExitCode
from planner import read_plan
from tests.conftest import small_tables_doc, small_topology_doc, write_json

TABLES_DOC = small_tables_doc(num_tables=6, rows=2000, dim=16)


@pytest.fixture
def specs(tmp_path: Path) -> tuple[Path, Path]:
    return (write_json(tmp_path / "tables.json", TABLES_DOC),
            write_json(tmp_path / "topology.json", small_topology_doc(devices=2, hbm_gb=0.01)))


def _capacity(specs, out: Path, *extra: str) -> int:
    tables, topology = specs
    return plan_cli.main(["capacity", "--tables", str(tables), "--topology", str(topology),
                          "--global-batch", "512", "-o", str(out), "--time-limit", "60",
                          *extra])


def test_capacity_writes_report_and_plan(tmp_path: Path, specs, capsys) -> None:
    out = tmp_path / "cap.json"
    assert _capacity(specs, out, "--target-ms", "0.0105", "--max-hosts", "4") == ExitCode.OK
    doc = json.loads(out.read_text())
    # One host takes 0.01499 ms, two and three hosts are bounded above 0.0105 ms.
    assert doc["hosts"] == 4 and doc["devices"] == 8 and doc["status"] == "proven"
    assert doc["objective_ms"] <= 0.0105 < doc["lower_bound_ms_with_fewer"]
    assert doc["batch_size_per_device"] == 64
    plan = read_plan(doc["plan"])
    assert doc["plan"] == str(tmp_path / "cap.plan.json")
    assert plan.topology.world_size == 8 and plan.solve.objective_ms == doc["objective_ms"]
    printed = capsys.readouterr().out
    assert "proven:" in printed and "8 devices" in printed


def test_capacity_sweep_and_chart(tmp_path: Path, specs, capsys) -> None:
    pytest.importorskip("matplotlib")
    out, chart, plan = tmp_path / "cap.json", tmp_path / "sweep.png", tmp_path / "p.json"
    code = _capacity(specs, out, "--target-ms", "0.0152", "--sweep", "--chart", str(chart),
                     "--plan", str(plan), "-q")
    assert code == ExitCode.OK
    doc = json.loads(out.read_text())
    assert doc["hosts"] == 1 and doc["plan"] == str(plan) and plan.exists()
    assert [row["hosts"] for row in doc["sweep"]] == [1, 2]
    assert all(row["samples_per_s"] > 0 for row in doc["sweep"])
    assert chart.stat().st_size > 0
    assert capsys.readouterr().out == ""


def test_capacity_unreachable_exits_3_and_writes_nothing(tmp_path: Path, specs, capsys) -> None:
    out = tmp_path / "cap.json"
    code = _capacity(specs, out, "--target-ms", "0.001", "--max-hosts", "2")
    assert code == ExitCode.INFEASIBLE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dlrm-plan: error: no host count from 1 to 2")
    assert not out.exists() and not (tmp_path / "cap.plan.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--target-ms", "0"], "--target-ms must be"),
    (["--target-ms", "nan"], "--target-ms must be"),
    (["--target-ms", "1", "--max-hosts", "0"], "--max-hosts must be"),
    (["--target-ms", "1", "--chart", "x.png"], "--chart draws the sweep"),
    (["--target-ms", "1", "--time-limit", "-1"], "--time-limit must be"),
])
def test_capacity_bad_flags_exit_2(tmp_path: Path, specs, capsys, flags, message) -> None:
    out = tmp_path / "cap.json"
    assert _capacity(specs, out, *flags) == ExitCode.BAD_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_capacity_bad_global_batch_exits_2(tmp_path: Path, specs, capsys) -> None:
    tables, topology = specs
    code = plan_cli.main(["capacity", "--tables", str(tables), "--topology", str(topology),
                          "--global-batch", "0", "--target-ms", "1", "-o", str(tmp_path / "c")])
    assert code == ExitCode.BAD_INPUT and "--global-batch must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:
        plan_cli.main(["capacity", "--tables", str(tables), "--topology", str(topology),
                       "--global-batch", "64", "-o", str(tmp_path / "c")])
    assert missing.value.code == 2


def _plan(tables: Path, topology: Path, out: Path, *extra: str) -> int:
    return plan_cli.main(["--tables", str(tables), "--topology", str(topology), "-o", str(out),
                          "--time-limit", "5", *extra])


def test_diff_of_a_replan(tmp_path: Path, capsys) -> None:
    topology = write_json(tmp_path / "topo.json", small_topology_doc(devices=2, hosts=2,
                                                                      hbm_gb=0.01))
    tables = write_json(tmp_path / "tables.json", TABLES_DOC)
    drifted_doc = copy.deepcopy(TABLES_DOC)
    for table, pooling in zip(drifted_doc["tables"], (8.0, 0.5, 4.0, 1.0, 0.25, 6.0)):
        table["pooling_factor"] = pooling
    drifted = write_json(tmp_path / "drifted.json", drifted_doc)
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    assert _plan(tables, topology, old, "-q") == ExitCode.OK
    capsys.readouterr()
    assert _plan(drifted, topology, new, "--from", str(old), "--max-migrate-gb", "1") == 0
    printed = capsys.readouterr().out
    assert "staying (old placement under the new specs)" in printed
    assert "gain against staying" in printed and str(new) in printed
    out = tmp_path / "diff.json"
    assert plan_cli.main(["diff", str(old), str(new), "-o", str(out)]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert "slowest device:" in printed and "MB to migrate" in printed
    assert "the plans differ in tables spec" in printed
    doc = json.loads(out.read_text())
    assert 0 < doc["migrated_bytes"] <= 1e9
    assert doc["new_objective_ms"] == read_plan(new).solve.objective_ms
    # Budget 0: the old placement, nothing moves.
    kept = tmp_path / "kept.json"
    assert _plan(drifted, topology, kept, "--from", str(old), "--max-migrate-gb", "0", "-q") == 0
    assert plan_cli.main(["diff", str(old), str(kept), "-o", str(out)]) == ExitCode.OK
    assert json.loads(out.read_text())["migrated_bytes"] == 0


@pytest.mark.parametrize("flags, message", [
    (["--max-migrate-gb", "1"], "--max-migrate-gb needs --from"),
    (["--from", "old.json", "--max-migrate-gb", "-1"], "--max-migrate-gb must be"),
    (["--from", "old.json", "--baseline", "greedy"], "drop --baseline"),
])
def test_replan_bad_flags_exit_2(tmp_path: Path, specs, capsys, flags, message) -> None:
    tables, topology = specs
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as exited:
        _plan(tables, topology, out, *flags)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_replan_missing_old_plan_and_other_devices_exit_2(tmp_path: Path, specs, capsys) -> None:
    tables, topology = specs
    out = tmp_path / "plan.json"
    assert _plan(tables, topology, out, "--from", str(tmp_path / "none.json")) == 2
    assert "no such file" in capsys.readouterr().err and not out.exists()
    old = tmp_path / "old.json"
    assert _plan(tables, topology, old, "-q") == ExitCode.OK
    bigger = write_json(tmp_path / "big.json", small_topology_doc(devices=4, hbm_gb=0.01))
    assert _plan(tables, bigger, out, "--from", str(old)) == ExitCode.BAD_INPUT
    assert "keeps the devices" in capsys.readouterr().err and not out.exists()


def test_diff_missing_file_exits_2(tmp_path: Path, capsys) -> None:
    assert plan_cli.main(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "no such file" in capsys.readouterr().err
