"""The README's commands, run as written: its quick-start targets exist, and the
pipeline block runs from data to a plan, training and the measured step on the
built-in sample."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _fenced_blocks(text: str, after: str) -> list[str]:
    """The ``sh`` code blocks of the section whose heading is ``after``."""
    section = text.split(after, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """Each command of a shell block, backslash continuations joined."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def test_quick_start_names_the_two_make_targets() -> None:
    blocks = _fenced_blocks(README.read_text(encoding="utf-8"), "## Quick start")
    commands = [c[:2] for c in _commands(blocks[0])]
    assert ["make", "demo"] in commands and ["make", "test"] in commands
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)


def test_the_pipeline_runs_as_written_on_the_sample(tmp_path: Path) -> None:
    block = _fenced_blocks(README.read_text(encoding="utf-8"), "## The pipeline")[0]
    commands = _commands(block)
    assert [c[0] for c in commands] == ["dlrm-plan"] * 4 + ["dlrm-run", "dlrm-plan"]
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for command in commands:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    out = tmp_path / "build" / "sample"
    profiled = json.loads((out / "profiled.json").read_text())
    assert len(profiled["tables"]) == 26 and all("access" in t for t in profiled["tables"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["objective_ms"] > 0 and plan["lower_bound_ms"] <= plan["objective_ms"]
    assert (out / "plan.png").stat().st_size > 0
    records = [json.loads(line) for line in (out / "run.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "timing" for r in records)
    assert "measured by dlrm-run at step 100" in done.stdout
