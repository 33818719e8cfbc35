"""What a new user meets when something is wrong: a failing command leaves exactly its
error line on stderr (no progress or info lines before it), the message says what is
wrong, and tier changes and the limits behind a tier are shown."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest

from cli import plan as plan_cli
from cli import run as run_cli
from cli.errors import ExitCode
from cli.run import format_result
from dlrm_runtime import TrainResult
from planner import read_plan
from tests.conftest import small_tables_doc, small_topology_doc, write_json

CRITEO_SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "criteo_sample"


def _only_error(capsys, main, argv: list[str], code: int, words: str) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(("dlrm-plan: error: ", "dlrm-run: error: ")), err
    assert words in err[0], err


def _plan(tmp_path: Path, name: str, tables: Path, topology: Path, *extra: str) -> Path:
    out = tmp_path / name
    assert plan_cli.main(["--tables", str(tables), "--topology", str(topology), "-o", str(out),
                          "-q", *extra]) == ExitCode.OK
    return out


@pytest.fixture
def planned(tmp_path: Path, tables_file: Path, topology_file: Path) -> Path:
    return _plan(tmp_path, "plan.json", tables_file, topology_file)


def test_replanning_checks_come_before_the_planning_line(tmp_path: Path, tables_file: Path,
                                                         topology_file: Path, planned: Path,
                                                         capsys) -> None:
    fewer = write_json(tmp_path / "fewer.json", small_tables_doc(num_tables=3))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json")
    pins = write_json(tmp_path / "pins.json", {"tables": {"t0": {"device": 1}}})
    out = tmp_path / "new.json"
    base = ["--topology", str(topology_file), "-o", str(out)]
    for argv, words in [
        (["--tables", str(fewer), *base, "--from", str(planned)], "re-planning keeps the tables"),
        (["--tables", str(tables_file), *base, "--from", str(garbage)], "not a readable JSON"),
        (["--tables", str(tables_file), *base, "--from", str(planned), "--constraints",
          str(pins)], "does not take device or host pins"),
    ]:
        _only_error(capsys, plan_cli.main, argv, ExitCode.BAD_INPUT, words)
        assert not out.exists()


def test_a_contradictory_tier_constraint_names_the_table_and_flag(
        tmp_path: Path, tables_file: Path, topology_file: Path, capsys) -> None:
    host_only = write_json(tmp_path / "c.json", {"tables": {"t1": {"tiers": ["host"]}}})
    _only_error(capsys, plan_cli.main,
                ["--tables", str(tables_file), "--topology", str(topology_file), "-o",
                 str(tmp_path / "p.json"), "--constraints", str(host_only), "--tiers", "hbm"],
                ExitCode.BAD_INPUT, "table 't1': its constraint allows tiers ['host'], the "
                                    "planner's tiers (--tiers) are ['hbm']")


def test_resume_of_another_run_is_refused_before_the_training_line(
        tmp_path: Path, planned: Path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    common = ["--plan", str(planned), "--batch-size", "32", "--threads", "1", "--no-progress",
              "--eval-batches", "1", "--checkpoint-dir", str(ckpt)]
    assert run_cli.main([*common, "--steps", "4", "--checkpoint-every", "2"]) == ExitCode.OK
    capsys.readouterr()
    files = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    _only_error(capsys, run_cli.main, [*common, "--steps", "8", "--resume", "--bottom-mlp",
                                       "32,8"], ExitCode.BAD_INPUT, "comes from another run")
    _only_error(capsys, run_cli.main, [*common, "--steps", "2", "--resume"], ExitCode.BAD_INPUT,
                "past the 2 steps asked for")
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == files


def test_unreachable_capacity_prints_only_its_error(tmp_path: Path, capsys) -> None:
    tables = write_json(tmp_path / "t.json", small_tables_doc(num_tables=6, rows=2000, dim=16))
    topology = write_json(tmp_path / "p.json", small_topology_doc(devices=2, hbm_gb=0.01))
    out = tmp_path / "k.json"
    _only_error(capsys, plan_cli.main,
                ["capacity", "--tables", str(tables), "--topology", str(topology),
                 "--global-batch", "512", "--target-ms", "0.000001", "--max-hosts", "3",
                 "-o", str(out), "--time-limit", "60"], ExitCode.INFEASIBLE, "")
    assert not out.exists()


def test_export_refuses_a_module_path_no_model_has(tmp_path: Path, planned: Path,
                                                   capsys) -> None:
    out = tmp_path / "tr.json"
    _only_error(capsys, plan_cli.main, ["export", str(planned), "-o", str(out), "--module-path",
                                        "a b/.."], ExitCode.BAD_INPUT, "module path 'a b/..'")
    assert not out.exists()
    assert plan_cli.main(["export", str(planned), "-o", str(out), "--module-path",
                          "model.sparse.0.ebc"]) == ExitCode.OK
    assert list(json.loads(out.read_text())["plan"]) == ["model.sparse.0.ebc"]


def test_torchrec_import_checks_placements_and_world_size(tmp_path: Path, tables_file: Path,
                                                          topology_file: Path, planned: Path,
                                                          capsys) -> None:
    exported = tmp_path / "tr.json"
    assert plan_cli.main(["export", str(planned), "-o", str(exported)]) == ExitCode.OK
    doc = json.loads(exported.read_text())
    bad_rank = copy.deepcopy(doc)
    first = next(iter(bad_rank["plan"][""].values()))
    first["sharding_spec"]["shards"][0]["placement"] = "rank:x/cuda:0"
    wider = dict(copy.deepcopy(doc), world_size=8)
    for name, broken, words in [("rank.json", bad_rank, "placement 'rank:x/cuda:0'"),
                                ("wide.json", wider, "world size 8, the topology has 2")]:
        path = write_json(tmp_path / name, broken)
        capsys.readouterr()
        _only_error(capsys, plan_cli.main, ["evaluate", str(path), "--format", "torchrec",
                                            "--tables", str(tables_file), "--topology",
                                            str(topology_file)], ExitCode.BAD_INPUT, words)
    _only_error(capsys, plan_cli.main, ["evaluate", str(exported)], ExitCode.BAD_INPUT,
                "this is a TorchRec plan (dlrm-plan export); read it with --format torchrec")


def test_a_replicated_plan_on_another_device_count_says_why(tmp_path: Path, capsys) -> None:
    tables = write_json(tmp_path / "t.json", small_tables_doc(num_tables=4, rows=50))
    two = write_json(tmp_path / "two.json", small_topology_doc(devices=2, hbm_gb=0.01))
    four = write_json(tmp_path / "four.json", small_topology_doc(devices=4, hbm_gb=0.01))
    plan = _plan(tmp_path, "dp.json", tables, two, "--sharding", "data_parallel")
    assert {t.sharding.value for t in read_plan(plan).tables} == {"data_parallel"}
    _only_error(capsys, plan_cli.main, ["evaluate", str(plan), "--topology", str(four)],
                ExitCode.BAD_INPUT, f"{plan}: the plan replicates data-parallel table 't0' on "
                                    f"its 2 devices, the topology has 4")


def test_criteo_input_problems_are_named(tmp_path: Path, capsys) -> None:
    tables = CRITEO_SAMPLE / "tables.json"
    data = CRITEO_SAMPLE / "day_0.tsv"
    packed = tmp_path / "day.tsv.gz"
    packed.write_bytes(gzip.compress(data.read_bytes()[:20000]))
    _only_error(capsys, plan_cli.main, ["profile", str(packed), "--tables", str(tables), "-o",
                                        str(tmp_path / "o.json")],
                ExitCode.BAD_INPUT, "is gzip-compressed; decompress it first")
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    _only_error(capsys, plan_cli.main, ["profile", str(empty), "--tables", str(tables), "-o",
                                        str(tmp_path / "o.json")],
                ExitCode.BAD_INPUT, "no samples to profile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day.tsv.gz", "empty.tsv"]
    marked = tmp_path / "marked.tsv"
    lines = data.read_bytes().splitlines(keepends=True)[:50]
    marked.write_bytes(b"\xef\xbb\xbf" + b"".join(lines))
    out = tmp_path / "profiled.json"
    assert plan_cli.main(["profile", str(marked), "--tables", str(tables), "-o",
                          str(out)]) == ExitCode.OK
    err = capsys.readouterr().err
    assert "50 samples in" in err and "malformed" not in err


def test_diff_shows_tier_changes(tmp_path: Path, tables_file: Path, topology_file: Path,
                                 planned: Path, capsys) -> None:
    cached = _plan(tmp_path, "cached.json", tables_file, topology_file, "--tiers", "dram_cache")
    capsys.readouterr()
    out = tmp_path / "diff.json"
    assert plan_cli.main(["diff", str(planned), str(cached), "-o", str(out)]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert "tier" in printed.splitlines()[next(i for i, line in enumerate(printed.splitlines())
                                               if line.startswith("table "))]
    assert "hbm -> dram_cache" in printed
    doc = json.loads(out.read_text())
    assert all(t["old_tiers"] == ["hbm"] and t["new_tiers"] == ["dram_cache"]
               for t in doc["tables"])


def test_show_names_the_constraint_behind_a_tier(tmp_path: Path, tables_file: Path,
                                                 topology_file: Path, capsys) -> None:
    host = write_json(tmp_path / "c.json", {"tables": {"t2": {"tiers": ["host"]}}})
    plan = _plan(tmp_path, "p.json", tables_file, topology_file, "--constraints", str(host))
    assert read_plan(plan).table("t2").limited_by == "constraint tiers ['host']"
    assert read_plan(plan).table("t1").limited_by is None
    capsys.readouterr()
    assert plan_cli.main(["show", str(plan)]) == ExitCode.OK
    (line,) = [row for row in capsys.readouterr().out.splitlines() if row.startswith("t2 ")]
    assert "limited by constraint tiers ['host']" in line and "the limits chose it" in line


def _timing(rank: int, step_ms: float) -> dict:
    phases = {"lookup_ms": 0.1, "communication_ms": 0.2, "dense_ms": 0.3, "update_ms": 0.4}
    return {"measured": {**phases, "step_ms": step_ms, "steps": 10, "data_ms": 0.0,
                         "embedding_bytes": 1000},
            "predicted": {**phases, "step_ms": 1.0, "hbm_bytes": 900, "dram_bytes": 0,
                          "devices": [rank], "cost_model": "planner:AnalyticCostModel"}}


def test_a_run_of_several_processes_reports_every_rank() -> None:
    result = TrainResult(10, 32, 0.5, 100.0, 1.0, None,
                         rank_timings=(_timing(0, 1.1), _timing(1, 1.3)))
    text = format_result(result)
    assert "rank 0:" in text and "rank 1:" in text
    assert "predicted for plan devices [0]" in text and "predicted for plan devices [1]" in text


def test_show_measured_says_when_the_batches_differ(tmp_path: Path, planned: Path,
                                                    capsys) -> None:
    log = tmp_path / "m.jsonl"
    assert run_cli.main(["--plan", str(planned), "--steps", "3", "--batch-size", "16",
                         "--threads", "1", "--no-progress", "--eval-batches", "1",
                         "--metrics-log", str(log)]) == ExitCode.OK
    capsys.readouterr()
    assert plan_cli.main(["show", str(planned), "--measured", str(log)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "predicted at the run's batch of 16; the plan's" in out
    assert "at the topology's global batch of 64" in out
