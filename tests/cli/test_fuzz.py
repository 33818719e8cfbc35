"""A corpus of malformed specs, plans, constraints, stores, paths and flags: every one
must exit 2 with one line on stderr that names the file or flag (no traceback, no
Python exception name) and leave every file as it was.

Hypothesis draws the malformed values (derandomized: the same examples every run);
the fixed cases cover each path the issue lists.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import plan as plan_cli
from cli import run as run_cli
from cli.errors import ExitCode
from tests.conftest import small_tables_doc, small_topology_doc, write_json

FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback")


# ---------------------------------------------------------------- the workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Valid inputs (tables, topology, a plan of them), an existing file, a checkpoint
    directory and an unrelated non-empty directory."""
    root = tmp_path_factory.mktemp("fuzz")
    write_json(root / "tables.json", small_tables_doc())
    write_json(root / "topology.json", small_topology_doc())
    assert plan_cli.main(["--tables", str(root / "tables.json"), "--topology",
                          str(root / "topology.json"), "-o", str(root / "plan.json"), "-q",
                          "--time-limit", "10"]) == ExitCode.OK
    (root / "afile").write_text("not a directory\n")
    (root / "adir").mkdir()
    (root / "adir" / "notes.txt").write_text("someone's files\n")
    (root / "ckpts" / "ckpt-0000000002").mkdir(parents=True)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and directory under ``root``: kind, size, mtime and content hash."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        info = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        out[str(path.relative_to(root))] = (path.is_dir(), info.st_size, info.st_mtime_ns,
                                            digest)
    out["."] = (True, 0, root.stat().st_mtime_ns, "")
    return out


def assert_rejected(capsys, main: Callable[[list[str]], int], argv: list[str], root: Path,
                    *names: str) -> str:
    """``main(argv)`` exits 2 with one line naming one of ``names``; nothing under
    ``root`` changed. Returns the line."""
    capsys.readouterr()
    before = snapshot(root)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == ExitCode.BAD_INPUT == 2, captured.err
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert re.match(r"dlrm-(plan|run): error: ", line), line
    assert not EXCEPTION_NAME.search(line), line
    assert not names or any(name in line for name in names), (names, line)
    assert snapshot(root) == before, line
    return line


def _plan(root: Path, *extra: str) -> list[str]:
    return ["--tables", str(root / "tables.json"), "--topology", str(root / "topology.json"),
            "-o", str(root / "out" / "plan.json"), "--time-limit", "5", *extra]


def _run(root: Path, *extra: str) -> list[str]:
    return ["--plan", str(root / "plan.json"), "--steps", "2", "--bottom-mlp", "16,8",
            "--no-progress", "--threads", "1", *extra]


# ---------------------------------------------------------------- output paths


@pytest.mark.parametrize("output, named", [
    ("adir", "-o/--output"),                      # a directory
    ("afile/plan.json", "-o/--output"),           # under a file
    ("afile/deeper/plan.json", "-o/--output"),    # a missing directory under a file
])
def test_plan_output_paths(workspace: Path, capsys, output: str, named: str) -> None:
    argv = _plan(workspace)
    argv[argv.index("-o") + 1] = str(workspace / output)
    assert_rejected(capsys, plan_cli.main, argv, workspace, named)


def test_unwritable_output_on_a_pseudo_filesystem(workspace: Path, capsys) -> None:
    """/proc refuses new files even to root: the write fails after planning, and is
    still one line naming the flag."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    argv = _plan(workspace, "-q")  # without: the planning line, then the error
    argv[argv.index("-o") + 1] = "/proc/plan.json"
    assert_rejected(capsys, plan_cli.main, argv, workspace, "-o/--output /proc/plan.json")


@pytest.fixture
def read_only(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    """A read-only directory and file: by permissions, and (as root ignores them)
    as ``os.access`` reports them."""
    ro_dir = workspace / "ro"
    ro_file = workspace / "ro-file.json"
    if not ro_dir.exists():
        ro_dir.mkdir()
        ro_file.write_text("{}\n")
    os.chmod(ro_dir, 0o555)
    os.chmod(ro_file, 0o444)
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).absolute() in (ro_dir.absolute(), ro_file.absolute()):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    yield ro_dir, ro_file
    os.chmod(ro_dir, 0o755)
    os.chmod(ro_file, 0o644)


def test_read_only_outputs(workspace: Path, read_only, capsys) -> None:
    ro_dir, ro_file = read_only
    for output in (ro_dir / "plan.json", ro_dir / "sub" / "plan.json", ro_file):
        argv = _plan(workspace)
        argv[argv.index("-o") + 1] = str(output)
        line = assert_rejected(capsys, plan_cli.main, argv, workspace, "-o/--output")
        assert "read-only" in line
    assert_rejected(capsys, run_cli.main, _run(workspace, "--metrics-log", str(ro_file)),
                    workspace, "--metrics-log")
    assert_rejected(capsys, run_cli.main, _run(workspace, "--checkpoint-dir", str(ro_dir)),
                    workspace, "--checkpoint-dir")
    assert_rejected(capsys, plan_cli.main, ["calibrate", "-o", str(ro_dir / "t.json")],
                    workspace, "-o/--output")


def test_missing_output_directories_are_created_and_said(workspace: Path, tmp_path: Path,
                                                          capsys) -> None:
    out = tmp_path / "new" / "deeper" / "plan.json"
    argv = _plan(workspace)
    argv[argv.index("-o") + 1] = str(out)
    assert plan_cli.main(argv) == ExitCode.OK
    assert out.is_file()
    assert f"created directory {out.parent}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, named", [
    (["--metrics-log", "adir"], "--metrics-log"),
    (["--metrics-log", "afile/m.jsonl"], "--metrics-log"),
    (["--checkpoint-dir", "afile"], "--checkpoint-dir"),
    (["--checkpoint-dir", "afile/ckpts"], "--checkpoint-dir"),
    (["--store-dir", "afile"], "--store-dir"),
    (["--store-dir", "adir"], "--store-dir"),           # someone's files, not a store
    (["--store-dir", "ckpts"], "--store-dir"),          # checkpoints, not a store
    (["--checkpoint-dir", "ckpts", "--store-dir", "ckpts"], "--store-dir"),
    (["--data", "missing.tsv"], "--data"),
    (["--data", "adir"], "--data"),
])
def test_run_paths(workspace: Path, capsys, extra: list[str], named: str) -> None:
    extra = [str(workspace / x) if not x.startswith("--") else x for x in extra]
    assert_rejected(capsys, run_cli.main, _run(workspace, *extra), workspace, named)


def test_checkpoint_dir_that_is_a_store(workspace: Path, tmp_path: Path, capsys) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    line = assert_rejected(capsys, run_cli.main,
                           _run(workspace, "--checkpoint-dir", str(store)), tmp_path,
                           "--checkpoint-dir")
    assert "table store" in line


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("extra, named", [
    (["--batch-size", "0"], "--batch-size"),
    (["--threads", "0"], "--threads"),
    (["--checkpoint-every", "0", "--checkpoint-dir", "ck"], "--checkpoint-every"),
    (["--checkpoint-every", "5"], "--checkpoint-every"),
    (["--steps", "0"], "--steps"),
    (["--eval-batches", "0"], "--eval-batches"),
    (["--log-every", "-1"], "--log-every"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--embedding-lr", "-1"], "--embedding-lr"),
    (["--dense-features", "0"], "--dense-features"),
    (["--top-mlp", "8,2"], "--top-mlp"),
    (["--bottom-mlp", "16,0"], "--bottom-mlp"),
    (["--bottom-mlp", "16,4"], "--bottom-mlp"),
    (["--train-lines", "5:3"], "--train-lines"),
    (["--validation-lines", "0:10"], "--validation-lines"),
    (["--resume"], "--resume"),
    (["--interaction", "sum"], "--interaction"),
    (["--steps", "many"], "--steps"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_run_flags(workspace: Path, capsys, extra: list[str], named: str) -> None:
    extra = [str(workspace / x) if x == "ck" else x for x in extra]
    assert_rejected(capsys, run_cli.main, _run(workspace, *extra), workspace, named)


@FUZZ
@given(flag=st.sampled_from(["--batch-size", "--threads", "--steps", "--eval-batches",
                             "--log-every", "--dense-features"]),
       value=st.integers(max_value=0))
def test_run_counts_below_one(workspace: Path, capsys, flag: str, value: int) -> None:
    assert_rejected(capsys, run_cli.main, _run(workspace, flag, str(value)), workspace, flag)


@pytest.mark.parametrize("extra, named", [
    (["--time-limit", "0"], "--time-limit"),
    (["--threads", "0"], "--threads"),
    (["--sharding", "diagonal"], "--sharding"),
    (["--tiers", ""], "--tiers"),
    (["--cache-fractions", "2"], "--cache-fractions"),
    (["--solver", "gurobi"], "--solver"),
    (["--cost-model", "nope"], "nope"),
    (["--cost-model", "no_such_module_here:Model"], "no_such_module_here"),
    (["--constraints", "missing.json"], "missing.json"),
])
def test_plan_flags(workspace: Path, capsys, extra: list[str], named: str) -> None:
    extra = [str(workspace / x) if x.endswith(".json") else x for x in extra]
    assert_rejected(capsys, plan_cli.main, _plan(workspace, *extra), workspace, named)


@pytest.mark.parametrize("extra, named", [
    (["--rounds", "0"], "--rounds"),
    (["--threads", "0"], "--threads"),
    (["--devices", "0"], "--devices"),
    (["--hbm-gb", "0"], "--hbm-gb"),
    (["--dram-gb", "-1"], "--dram-gb"),
    (["--inter-host-gbps", "inf"], "--inter-host-gbps"),
    (["--batch-size-per-device", "0"], "--batch-size-per-device"),
    (["--reserved-hbm-gb", "8", "--hbm-gb", "4"], "--reserved-hbm-gb"),
    (["--store-dir", "afile"], "--store-dir"),
    (["-o", "adir"], "-o/--output"),
])
def test_calibrate_checks_before_measuring(workspace: Path, capsys,
                                           monkeypatch: pytest.MonkeyPatch, extra: list[str],
                                           named: str) -> None:
    from dlrm_runtime import calibrate

    def measure(*args, **kwargs):
        raise AssertionError("calibrate measured before checking its flags")

    monkeypatch.setattr(calibrate, "measure", measure)
    extra = [str(workspace / x) if x in ("afile", "adir") else x for x in extra]
    argv = ["calibrate", "-o", str(workspace / "out" / "topology.json"), *extra]
    assert_rejected(capsys, plan_cli.main, argv, workspace, named)


# ---------------------------------------------------------------- specs

NOT_A_COUNT = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True),
                        st.text(max_size=4), st.none(), st.booleans(),
                        st.lists(st.integers(), max_size=2))
NOT_POSITIVE = st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf")),
                         st.text(max_size=4), st.none(), st.booleans())
UNSAFE_NAMES = st.one_of(
    st.sampled_from(["../escape", "..", ".", ".hidden", "_txn", "-x", "a/b", "a\\b", "", " ",
                     "a b", "x" * 97, "tab\tname", "nul\x00", "é"]),
    st.text(min_size=1, max_size=8).map(lambda s: "../" + s),
    st.text(alphabet="/\\:*?\"<>| ", min_size=1, max_size=4).map(lambda s: "t" + s))


@FUZZ
@given(table=st.integers(0, 3),
       field_value=st.one_of(
           st.tuples(st.just("num_embeddings"), NOT_A_COUNT),
           st.tuples(st.just("embedding_dim"), NOT_A_COUNT),
           st.tuples(st.just("pooling_factor"), NOT_POSITIVE),
           st.tuples(st.just("dtype"), st.text(max_size=5).filter(
               lambda s: s not in ("fp32", "fp16", "bf16"))),
           st.tuples(st.just("optimizer"), st.integers()),
           st.tuples(st.just("access"), st.one_of(st.just({}), st.just({"zipf": -1}),
                                                   st.just({"hot_rows": [5], "share": []}))),
           st.tuples(st.just("name"), UNSAFE_NAMES),
           st.tuples(st.text(min_size=1, max_size=6).filter(lambda k: k not in (
               "name", "num_embeddings", "embedding_dim", "pooling_factor", "dtype",
               "optimizer", "access")), st.integers())))
def test_malformed_tables_spec(workspace: Path, tmp_path_factory, capsys, table: int,
                               field_value: tuple[str, object]) -> None:
    field, value = field_value
    doc = small_tables_doc()
    doc["tables"][table][field] = value
    spec = write_json(tmp_path_factory.mktemp("spec") / "tables.json", doc)
    argv = _plan(workspace)
    argv[argv.index("--tables") + 1] = str(spec)
    line = assert_rejected(capsys, plan_cli.main, argv, workspace, str(spec))
    assert f"tables[{table}]" in line


@FUZZ
@given(doc=st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5),
                     st.just({}), st.just({"tables": {}}), st.just({"tables": [1]}),
                     st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)))
def test_tables_spec_of_the_wrong_shape(workspace: Path, tmp_path_factory, capsys,
                                        doc: object) -> None:
    spec = write_json(tmp_path_factory.mktemp("spec") / "tables.json", doc)
    argv = _plan(workspace)
    argv[argv.index("--tables") + 1] = str(spec)
    assert_rejected(capsys, plan_cli.main, argv, workspace, str(spec))


def test_duplicate_and_unsafe_names_name_the_table(workspace: Path, tmp_path: Path,
                                                   capsys) -> None:
    doc = small_tables_doc()
    doc["tables"][2]["name"] = "../escape"
    spec = write_json(tmp_path / "escape.json", doc)
    argv = _plan(workspace)
    argv[argv.index("--tables") + 1] = str(spec)
    line = assert_rejected(capsys, plan_cli.main, argv, workspace)
    assert "tables[2].name" in line and "'../escape'" in line and str(spec) in line


@pytest.mark.parametrize("which, other", [("--tables", "topology.json"),
                                          ("--tables", "plan.json"),
                                          ("--topology", "tables.json")])
def test_a_spec_of_another_kind_says_what_it_is(workspace: Path, capsys, which: str,
                                                other: str) -> None:
    argv = _plan(workspace)
    argv[argv.index(which) + 1] = str(workspace / other)
    line = assert_rejected(capsys, plan_cli.main, argv, workspace, other)
    assert "this is a" in line and ", not a" in line


@FUZZ
@given(section=st.sampled_from(["device", "host", "store", "network"]), value=NOT_POSITIVE)
def test_malformed_topology(workspace: Path, tmp_path_factory, capsys, section: str,
                            value: object) -> None:
    doc = small_topology_doc()
    key = next(iter(doc[section]))
    doc[section][key] = value
    path = write_json(tmp_path_factory.mktemp("topo") / "topology.json", doc)
    argv = _plan(workspace)
    argv[argv.index("--topology") + 1] = str(path)
    line = assert_rejected(capsys, plan_cli.main, argv, workspace, str(path))
    assert f"{section}.{key}" in line


# ---------------------------------------------------------------- constraints


@pytest.mark.parametrize("doc, fragment", [
    ({"tables": {"t0": {"device": 0}, "t1": {"device": 1}}, "colocate": [["t0", "t1"]]},
     "contradictory pins"),
    ({"tables": {"t0": {"device": 0}, "t2": {"device": 1}},
      "colocate": [["t0", "t1"], ["t1", "t2"]]}, "contradictory pins"),
    ({"tables": {"t0": {"device": 1}, "t1": {"device": 1}}, "separate": [["t0", "t1"]]},
     "contradictory pins"),
    ({"tables": {"t0": {"device": 1}}, "colocate": [["t0", "t1"]],
      "separate": [["t1", "t2"]], "description": "x"}, None),
    ({"tables": {"t0": {"device": 0, "shardings": ["row_wise"]}}}, "pin to device 0"),
    ({"tables": {"t0": {"shardings": ["row_wise"]}}, "separate": [["t0", "t1"]]},
     "contradicts 'separate'"),
    ({"colocate": [["t0", "t1"], ["t1", "t2"]], "separate": [["t0", "t2"]]}, "co-located"),
    ({"tables": {"nope": {"device": 0}}}, "no such table"),
    ({"tables": {"t0": {"device": 9}}}, "device"),
    ({"tables": {"t0": {"host": 0, "device": 0, "tiers": ["disk"]}}}, "tiers"),
    ({"colocate": [["t0"]]}, "colocate"),
    ({"separate": "t0,t1"}, "separate"),
    ([], "<root>"),
])
def test_constraints(workspace: Path, tmp_path: Path, capsys, doc: object,
                     fragment: str | None) -> None:
    path = write_json(tmp_path / "constraints.json", doc)
    argv = _plan(workspace, "--constraints", str(path))
    if fragment is None:  # consistent: plans
        assert plan_cli.main(argv) == ExitCode.OK
        shutil.rmtree(workspace / "out")
        return
    line = assert_rejected(capsys, plan_cli.main, argv, workspace, str(path))
    assert fragment in line
    assert "short by" not in line


# ---------------------------------------------------------------- plans


def _plan_doc(workspace: Path) -> dict:
    return json.loads((workspace / "plan.json").read_text())


PLAN_EDITS: dict[str, Callable[[dict], object]] = {
    "no schema_version": lambda d: d.pop("schema_version"),
    "future schema": lambda d: d.update(schema_version=99),
    "no tables": lambda d: d.pop("tables"),
    "no topology": lambda d: d.pop("topology"),
    "device out of range": lambda d: d["tables"][0]["shards"][0].update(device=7),
    "bad tier": lambda d: d["tables"][0]["shards"][0].update(tier="floppy"),
    "rows beyond the table": lambda d: d["tables"][0]["shards"][0].update(rows=[0, 10 ** 9]),
    "edited spec": lambda d: d["tables_spec"]["tables"][0].update(num_embeddings=7),
    "unsafe embedded name": lambda d: d["tables_spec"]["tables"][0].update(name="../x"),
    "string objective": lambda d: d.update(objective_ms="fast"),
}


@pytest.mark.parametrize("edit", sorted(PLAN_EDITS))
def test_malformed_plans(workspace: Path, tmp_path: Path, capsys, edit: str) -> None:
    doc = _plan_doc(workspace)
    PLAN_EDITS[edit](doc)
    path = write_json(tmp_path / "plan.json", doc)
    assert_rejected(capsys, plan_cli.main, ["show", str(path)], tmp_path, str(path))
    assert_rejected(capsys, run_cli.main, ["--plan", str(path), "--no-progress"], tmp_path,
                    str(path))


@FUZZ
@given(data=st.data())
def test_fuzzed_plan_values(workspace: Path, tmp_path_factory, capsys, data) -> None:
    """Replace one value anywhere in a valid plan's shards or devices with junk."""
    doc = _plan_doc(workspace)
    table = data.draw(st.integers(0, len(doc["tables"]) - 1))
    shard = doc["tables"][table]["shards"][0]
    key = data.draw(st.sampled_from(sorted(shard)))
    shard[key] = data.draw(st.one_of(st.none(), st.text(max_size=3), st.integers(-5, -1),
                                     st.just([]), st.just({})))
    path = write_json(tmp_path_factory.mktemp("plan") / "plan.json", doc)
    assert_rejected(capsys, plan_cli.main, ["show", str(path)], workspace, str(path))


@pytest.mark.parametrize("content, fragment", [
    ("", "not a readable JSON plan"),
    ("{", "not a readable JSON plan"),
    ('{"event": "train"}\n{"event": "eval"}\n', "metrics log"),
    ("[1, 2]", "must be a JSON object"),
    ('{"hosts": 1}', "topology spec, not a plan"),
    ('{"tables": {"t0": {"device": 0}}}', "constraints file, not a plan"),
    ('{"x": 1}', "no schema_version"),
])
def test_files_that_are_not_plans(tmp_path: Path, capsys, content: str, fragment: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    line = assert_rejected(capsys, plan_cli.main, ["show", str(path)], tmp_path, str(path))
    assert fragment in line


def test_plan_that_is_a_directory(workspace: Path, capsys) -> None:
    assert_rejected(capsys, plan_cli.main, ["show", str(workspace / "adir")], workspace, "adir")
    assert_rejected(capsys, run_cli.main, ["--plan", str(workspace / "adir")], workspace, "adir")


def test_plan_and_tables_mismatch_names_both_files(workspace: Path, tmp_path: Path,
                                                   capsys) -> None:
    other = write_json(tmp_path / "other.json", small_tables_doc(num_tables=3))
    line = assert_rejected(capsys, run_cli.main, _run(workspace, "--tables", str(other)),
                           workspace)
    assert str(workspace / "plan.json") in line and str(other) in line


def test_evaluate_on_a_smaller_topology_names_both_files(workspace: Path, tmp_path: Path,
                                                         capsys) -> None:
    one = write_json(tmp_path / "one.json", small_topology_doc(devices=1))
    line = assert_rejected(capsys, plan_cli.main,
                           ["evaluate", str(workspace / "plan.json"), "--topology", str(one)],
                           workspace)
    assert "plan.json" in line and str(one) in line


# ---------------------------------------------------------------- stores


def _store_plan(root: Path, tables: dict, name: str) -> Path:
    write_json(root / f"{name}.tables.json", tables)
    out = root / f"{name}.plan.json"
    assert plan_cli.main(["--tables", str(root / f"{name}.tables.json"), "--topology",
                          str(root / "topology.json"), "-o", str(out), "-q", "--tiers",
                          "store_cache", "--time-limit", "10"]) == ExitCode.OK
    return out


def test_store_of_other_tables_is_left_untouched(workspace: Path, tmp_path: Path,
                                                 capsys) -> None:
    shutil.copy(workspace / "topology.json", tmp_path / "topology.json")
    ours = _store_plan(tmp_path, small_tables_doc(num_tables=2), "ours")
    other_doc = small_tables_doc(num_tables=2)
    for table in other_doc["tables"]:
        table["name"] = "other_" + table["name"]
    theirs = _store_plan(tmp_path, other_doc, "theirs")
    store = tmp_path / "store"
    assert run_cli.main(["--plan", str(ours), "--steps", "2", "--batch-size", "16",
                         "--bottom-mlp", "16,8", "--no-progress", "--threads", "1",
                         "--store-dir", str(store)]) == ExitCode.OK
    line = assert_rejected(capsys, run_cli.main,
                           ["--plan", str(theirs), "--steps", "2", "--batch-size", "16",
                            "--bottom-mlp", "16,8", "--no-progress", "--threads", "1",
                            "--store-dir", str(store)], tmp_path, str(store))
    assert "other tables" in line


def test_corrupted_store_metadata(workspace: Path, tmp_path: Path, capsys) -> None:
    shutil.copy(workspace / "topology.json", tmp_path / "topology.json")
    ours = _store_plan(tmp_path, small_tables_doc(num_tables=2), "ours")
    store = tmp_path / "store"
    store.mkdir()
    (store / "zarr.json").write_text("{ not json")
    assert_rejected(capsys, run_cli.main,
                    ["--plan", str(ours), "--steps", "2", "--batch-size", "16",
                     "--bottom-mlp", "16,8", "--no-progress", "--store-dir", str(store)],
                    tmp_path, str(store))
