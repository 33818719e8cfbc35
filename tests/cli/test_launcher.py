"""``dlrm-run --nproc-per-node``: the workers started by dlrm-run itself (torch's
elastic launcher), in subprocesses: a cached plan trains on 2 workers; a SIGKILL of
the launcher leaves no worker behind and the same command with --resume ends bit for
bit like an uninterrupted run; a bad input is exit 2 and one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli import plan as plan_cli
from cli.errors import ExitCode
from tests.conftest import small_topology_doc, write_json

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cached_plan(tmp_path: Path, tables_file: Path) -> Path:
    topology = write_json(tmp_path / "topology.json", small_topology_doc(devices=2))
    out = tmp_path / "cached.plan.json"
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(topology), "-o",
                          str(out), "-q", "--tiers", "store_cache"]) == ExitCode.OK
    return out


def _command(plan: Path, where: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.run", "--nproc-per-node", "2", "--plan", str(plan),
            "--steps", str(steps), "--batch-size", "32", "--bottom-mlp", "16,8",
            "--threads", "1", "--eval-batches", "1", "--no-progress",
            "--store-dir", str(where / "stores"), "--checkpoint-dir", str(where / "ckpt"),
            *extra]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _workers_after_first_checkpoint(launcher: subprocess.Popen, where: Path) -> list[int]:
    """Wait until the run in ``where`` committed a checkpoint; its worker processes."""
    deadline = time.monotonic() + 300
    while not (where / "ckpt" / "committed.json").exists():
        assert launcher.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return _children(launcher.pid)


def _until_gone(workers: list[int]) -> None:
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived the stopped launcher"
        time.sleep(0.1)


def _final_state(where: Path) -> dict:
    (newest,) = sorted((where / "ckpt").glob("ckpt-*"))
    return torch.load(newest / "state.pt", map_location="cpu", weights_only=False)


def _assert_same(a, b, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_launcher_trains_and_resumes_after_sigkill(tmp_path: Path, cached_plan: Path) -> None:
    steps = 300
    whole = tmp_path / "whole"
    done = subprocess.run(_command(cached_plan, whole, steps, "--checkpoint-every", "10"),
                          capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(f"trained {steps} steps") == 1
    assert "on 2 processes" in done.stderr

    cut = tmp_path / "cut"
    command = _command(cached_plan, cut, steps, "--checkpoint-every", "10")
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    workers = _workers_after_first_checkpoint(launcher, cut)
    assert workers, "no worker processes"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=60)
    _until_gone(workers)
    assert len(sorted((cut / "ckpt").glob("ckpt-*"))) >= 1
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, cwd=ROOT,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stderr
    assert "resumed from step" in again.stdout
    _assert_same(_final_state(whole), _final_state(cut))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_every_worker_and_says_how_to_resume(tmp_path: Path,
                                                           cached_plan: Path) -> None:
    command = _command(cached_plan, tmp_path, 100_000, "--checkpoint-every", "10")
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    workers = _workers_after_first_checkpoint(launcher, tmp_path)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == ExitCode.INTERRUPTED, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dlrm-run: interrupted during step") and last.endswith("--resume"), err
    assert "Traceback" not in err and "signal" not in err, err
    _until_gone(workers)


def test_a_refusal_of_rank_0_stops_every_rank_writing_nothing(tmp_path: Path,
                                                               cached_plan: Path) -> None:
    done = subprocess.run(_command(cached_plan, tmp_path, 4, "--checkpoint-every", "2"),
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    again = subprocess.run(_command(cached_plan, tmp_path, 8, "--resume", "--bottom-mlp", "32,8"),
                           capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert again.returncode == ExitCode.BAD_INPUT, again.stderr
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "comes from another run" in lines[0], again.stderr
    assert "rank 0 refused" not in again.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_two_hosts_meet_at_the_rendezvous(tmp_path: Path, cached_plan: Path) -> None:
    from dlrm_runtime.distributed import free_port

    endpoint = f"localhost:{free_port()}"
    command = _command(cached_plan, tmp_path, 6, "--checkpoint-every", "3")
    command[command.index("--nproc-per-node") + 1] = "1"
    hosts = [subprocess.Popen([*command, "--nnodes", "2", "--rdzv-endpoint", endpoint],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [host.communicate(timeout=300) for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0], outputs
    printed = "".join(out for out, _ in outputs)
    assert printed.count("trained 6 steps") == 1  # rank 0's host reports
    assert "rank 0:" in printed and "rank 1:" in printed
    assert (tmp_path / "stores" / "device-0").is_dir() and (tmp_path / "stores" / "device-1").is_dir()


def test_launcher_bad_input_is_one_line(tmp_path: Path, tables_file: Path) -> None:
    three = write_json(tmp_path / "three.json", small_topology_doc(devices=3))
    plan = tmp_path / "plan3.json"
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(three), "-o",
                          str(plan), "-q"]) == ExitCode.OK
    done = subprocess.run(
        [sys.executable, "-m", "cli.run", "--nproc-per-node", "2", "--plan", str(plan),
         "--steps", "1", "--bottom-mlp", "16,8", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == ExitCode.BAD_INPUT
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlrm-run: error: the plan has 3 devices")


def test_a_failing_worker_is_one_line_with_its_exit_code(tmp_path: Path,
                                                         cached_plan: Path) -> None:
    done = subprocess.run(_command(cached_plan, tmp_path, 20, "--lr", "1e30",
                                   "--embedding-lr", "1e30"),
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == ExitCode.DIVERGED, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("dlrm-run: error: loss is nan"), \
        done.stderr
    assert "Traceback" not in done.stderr and "W1" not in done.stderr


@pytest.mark.parametrize("flags, flag", [
    (["--nnodes", "2"], "--nnodes"),
    (["--nproc-per-node", "2", "--nnodes", "2"], "--rdzv-endpoint"),
    (["--nproc-per-node", "0"], "--nproc-per-node"),
    (["--nproc-per-node", "2", "--nnodes", "2", "--rdzv-endpoint", "nohost"],
     "--rdzv-endpoint"),
])
def test_launcher_flags_are_checked(tmp_path: Path, cached_plan: Path, flags: list[str],
                                    flag: str, capsys) -> None:
    from cli import run as run_cli

    code = run_cli.main(["--plan", str(cached_plan), "--steps", "1", *flags])
    assert code == ExitCode.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_worker_argv_drops_the_launcher_flags() -> None:
    from cli.run import worker_argv

    assert worker_argv(["--nproc-per-node", "2", "--plan", "p", "--nnodes=1",
                        "--rdzv-endpoint", "h:1", "--steps", "3"]) == [
        "--plan", "p", "--steps", "3"]
