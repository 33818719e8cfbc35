"""The host tier from the command line: plan it, show it, train from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import plan as plan_cli
from cli import run as run_cli
from cli.errors import ExitCode


def test_plan_show_and_train_a_host_tier_plan(tmp_path: Path, tables_file: Path,
                                              topology_file: Path, capsys) -> None:
    out = tmp_path / "plan.json"
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                          "-o", str(out), "-q", "--tiers", "host"]) == ExitCode.OK
    doc = json.loads(out.read_text())
    assert {s["tier"] for t in doc["tables"] for s in t["shards"]} == {"host"}
    assert all(t["predicted"]["dram_bytes"] > 0 for t in doc["tables"])
    capsys.readouterr()
    assert plan_cli.main(["show", str(out)]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert " host " in printed and "read over the host link" in printed
    code = run_cli.main(["--plan", str(out), "--tables", str(tables_file), "--steps", "4",
                         "--eval-batches", "1", "--no-progress", "--bottom-mlp", "16,8"])
    assert code == ExitCode.OK
    assert "samples/s" in capsys.readouterr().out


def test_tiers_help_lists_host(capsys) -> None:
    with pytest.raises(SystemExit):
        plan_cli.main(["--help"])
    assert "host (rows in host DRAM" in " ".join(capsys.readouterr().out.split())
