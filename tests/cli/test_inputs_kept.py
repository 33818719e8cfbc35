"""No output of a command may be one of its inputs (exit 2, nothing written), and the
checks come before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import plan as plan_cli
from cli import run as run_cli
from cli.errors import ExitCode
from tests.cli.test_cli import _plan_file

ROOT = Path(__file__).resolve().parents[2]


def _refused(capsys, main, argv, kept: list[Path], words: str) -> None:
    before = {p: p.read_bytes() for p in kept}
    assert main(argv) == ExitCode.BAD_INPUT
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], captured.err
    assert captured.out == ""
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was overwritten"


def test_outputs_never_overwrite_inputs(tmp_path: Path, tables_file: Path,
                                        topology_file: Path, capsys) -> None:
    plan = _plan_file(tmp_path, tables_file, topology_file)
    capsys.readouterr()
    link = tmp_path / "link.json"
    os.symlink(tables_file, link)
    kept = [tables_file, topology_file, plan]
    for argv, words in [
        (["--tables", str(tables_file), "--topology", str(topology_file), "-o",
          str(tables_file)], "also the input --tables"),
        (["--tables", str(tables_file), "--topology", str(topology_file), "-o",
          str(link)], "also the input --tables"),
        (["--tables", str(tables_file), "--topology", str(topology_file), "-o",
          str(topology_file)], "also the input --topology"),
        (["--tables", str(tables_file), "--topology", str(topology_file), "-o",
          str(plan), "--from", str(plan)], "also the input --from"),
        (["export", str(plan), "-o", str(plan)], "also the input PLAN"),
        (["evaluate", str(plan), "-o", str(plan)], "also the input PLAN"),
        (["diff", str(plan), str(plan), "-o", str(plan)], "also the input A"),
        (["show", str(plan), "--chart", str(plan)], "also the input PLAN"),
        (["capacity", "--tables", str(tables_file), "--topology", str(topology_file),
          "--global-batch", "64", "--target-ms", "1", "-o", str(tmp_path / "k.json"),
          "--plan", str(tmp_path / "k.json")], "both"),
        (["capacity", "--tables", str(tables_file), "--topology", str(topology_file),
          "--global-batch", "64", "--target-ms", "1", "-o", str(tables_file)],
         "also the input --tables"),
    ]:
        _refused(capsys, plan_cli.main, argv, kept, words)
    _refused(capsys, run_cli.main, ["--plan", str(plan), "--metrics-log", str(plan)], kept,
             "also the input --plan")
    assert not (tmp_path / "k.json").exists()


def test_capacity_checks_the_chart_before_the_search(tmp_path: Path, tables_file: Path,
                                                     topology_file: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    assert plan_cli.main(["capacity", "--tables", str(tables_file), "--topology",
                          str(topology_file), "--global-batch", "64", "--target-ms", "1",
                          "-o", str(tmp_path / "k.json"), "--sweep", "--chart",
                          str(afile / "k.png")]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--chart" in err[0]


def test_capacity_without_a_feasible_host_count_draws_no_chart(
        tmp_path: Path, tables_file: Path, topology_file: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "k.png"
    code = plan_cli.main(["capacity", "--tables", str(tables_file), "--topology",
                          str(topology_file), "--global-batch", "64", "--target-ms", "1e-9",
                          "--max-hosts", "2", "-o", str(tmp_path / "k.json"), "--sweep",
                          "--chart", str(chart), "--time-limit", "5"])
    assert code == ExitCode.INFEASIBLE
    assert not chart.exists() and not (tmp_path / "k.json").exists()


def test_show_measured_of_another_plan_prints_no_report(tmp_path: Path, tables_file: Path,
                                                        topology_file: Path, capsys) -> None:
    plan = _plan_file(tmp_path, tables_file, topology_file)
    log = tmp_path / "run.jsonl"
    log.write_text('{"event": "timing", "plan_sha256": "other", "step": 1}\n')
    capsys.readouterr()
    assert plan_cli.main(["show", str(plan), "--measured", str(log)]) == ExitCode.BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == "" and "measured on another plan" in captured.err


def test_show_into_a_closed_pipe_is_quiet(tmp_path: Path, tables_file: Path,
                                          topology_file: Path) -> None:
    plan = _plan_file(tmp_path, tables_file, topology_file)
    show = subprocess.Popen([sys.executable, "-m", "cli.plan", "show", str(plan)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert show.stdout is not None and show.stderr is not None
    show.stdout.readline()
    show.stdout.close()  # as `| head -1` does
    err = show.stderr.read().decode()
    show.stderr.close()
    assert show.wait(timeout=120) == ExitCode.OK, err
    assert "BrokenPipe" not in err and "error" not in err
