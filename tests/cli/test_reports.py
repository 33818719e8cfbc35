"""Truthful reports: no bound where nothing is proven, "Optimal" only with a proof,
strict JSON, per-shard caches, documented size limits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cli import plan as plan_cli
from cli.errors import ExitCode
from cli.report import solve_summary, table_choices
from planner import (
    PlanOptions,
    Shard,
    Sharding,
    SpecError,
    StopReason,
    Tier,
    explain,
    parse_tables,
    parse_topology,
    plan,
    plan_to_json,
    read_plan,
    write_json_atomic,
    write_plan,
)
from planner.inputs import MAX_DEVICES, MAX_TABLE_BYTES, check_limits
from tests.conftest import small_tables_doc, small_topology_doc, write_json


def _strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def _small_plan(**options):
    return plan(parse_tables(small_tables_doc()), parse_topology(small_topology_doc()),
                options=PlanOptions(**options))


def test_baselines_report_no_bound(tmp_path: Path) -> None:
    result = _small_plan(baseline="greedy")
    assert result.solve.lower_bound_ms is None and result.solve.gap is None
    summary = solve_summary(result)
    assert "no lower bound" in summary and "gap" not in summary.split("no lower bound")[0]
    assert "Optimal" not in summary
    out = tmp_path / "baseline.json"
    write_plan(result, out)
    doc = _strict(out.read_text())
    assert doc["lower_bound_ms"] is None and doc["gap"] is None and doc["stop_reason"] is None
    assert read_plan(out).solve.lower_bound_ms is None


def test_optimal_only_with_a_proof() -> None:
    proven = _small_plan(gap=0.0)
    assert proven.solve.proven_optimal
    assert "Optimal (proven)" in solve_summary(proven)
    # A plan whose bound is below its objective is not optimal, whatever its status
    # field says (older plan files wrote the solver's status of a sub-problem).
    loose = replace(proven, solve=replace(proven.solve, status="Optimal",
                                          lower_bound_ms=proven.solve.objective_ms * 0.9,
                                          stop_reason=StopReason.GAP_REACHED))
    summary = solve_summary(loose)
    assert "Optimal" not in summary and "Feasible" in summary
    assert "gap 11.11%" in summary and "stopped: gap reached" in summary


def test_ilp_status_is_feasible_when_stopped_at_the_gap() -> None:
    result = _small_plan(gap=0.0)
    assert result.solve.status == "Optimal"
    forced = plan(parse_tables(small_tables_doc(num_tables=6)),
                  parse_topology(small_topology_doc(devices=3)),
                  options=PlanOptions(gap=10.0))
    s = forced.solve
    assert s.stop_reason in (StopReason.GAP_REACHED, StopReason.OPTIMAL)
    assert (s.status == "Optimal") == (s.stop_reason is StopReason.OPTIMAL) == s.proven_optimal


def test_plan_json_never_holds_infinity_or_nan(tmp_path: Path) -> None:
    result = _small_plan()
    unknown = replace(result, solve=replace(result.solve, lower_bound_ms=0.0))
    assert unknown.solve.gap is None  # no bound: the gap is unknown, not infinite
    nan = replace(result, solve=replace(result.solve, lower_bound_ms=float("nan"),
                                        solve_seconds=float("inf")))
    for i, case in enumerate((unknown, nan)):
        out = tmp_path / f"plan{i}.json"
        write_plan(case, out)
        text = out.read_text()
        assert "Infinity" not in text and "NaN" not in text
        doc = _strict(text)
        assert doc["gap"] is None
        assert read_plan(out).solve.gap is None
    with pytest.raises(ValueError):
        write_json_atomic({"x": float("inf")}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_old_plan_files_with_infinity_still_read(tmp_path: Path) -> None:
    result = _small_plan()
    doc = plan_to_json(result)
    text = json.dumps(doc).replace(f'"lower_bound_ms": {json.dumps(doc["lower_bound_ms"])}',
                                   '"lower_bound_ms": NaN')
    path = tmp_path / "old.json"
    path.write_text(text)
    assert read_plan(path).solve.lower_bound_ms is None


def test_cli_writes_strict_json(tmp_path: Path, tables_file: Path, topology_file: Path,
                                capsys) -> None:
    out = tmp_path / "plan.json"
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(topology_file),
                          "-o", str(out), "--baseline", "size"]) == ExitCode.OK
    assert _strict(out.read_text())["lower_bound_ms"] is None
    assert plan_cli.main(["evaluate", str(out), "-o", str(tmp_path / "re.json")]) == ExitCode.OK
    assert _strict((tmp_path / "re.json").read_text())["gap"] is None
    assert plan_cli.main(["show", str(out)]) == ExitCode.OK
    shown = capsys.readouterr().out
    assert "no lower bound" in shown and "Optimal" not in shown


def test_cli_gap_and_stall_flags(tmp_path: Path, tables_file: Path, topology_file: Path,
                                 capsys) -> None:
    out = tmp_path / "plan.json"
    base = ["--tables", str(tables_file), "--topology", str(topology_file), "-o", str(out)]
    assert plan_cli.main([*base, "--gap", "0.5", "--stall", "2"]) == ExitCode.OK
    doc = _strict(out.read_text())
    assert doc["target_gap"] == 0.5 and doc["stop_reason"] in ("gap reached", "optimal")
    assert "stopped: " in capsys.readouterr().out
    for bad in (["--gap", "-1"], ["--gap", "nan"], ["--stall", "0"]):
        with pytest.raises(SystemExit) as info:
            plan_cli.main([*base, *bad])
        assert info.value.code == 2


def test_show_reports_a_column_wise_cache_per_shard() -> None:
    result = _small_plan(baseline="greedy")
    table = result.tables[0]
    rows = result.tables_spec.by_name(table.name).num_embeddings
    dim = result.tables_spec.by_name(table.name).embedding_dim
    cache = rows // 5
    shards = tuple(Shard(d, 0, rows, c0, c1, Tier.DRAM_CACHE, cache)
                   for d, (c0, c1) in enumerate(((0, dim // 2), (dim // 2, dim))))
    cached = replace(table, sharding=Sharding.COLUMN_WISE, shards=shards)
    hand = replace(result, tables=(cached, *result.tables[1:]))
    line = explain(hand, cached)
    assert f"each of its 2 shards caches {cache} of its {rows} rows (20%)" in line
    assert str(2 * cache) not in line
    assert f"caches {cache} of its {rows}" in table_choices(hand)
    row_wise = replace(table, sharding=Sharding.ROW_WISE, shards=(
        Shard(0, 0, rows // 2, 0, dim, Tier.DRAM_CACHE, cache // 2),
        Shard(1, rows // 2, rows, 0, dim, Tier.DRAM_CACHE, cache - cache // 2)))
    assert f"cached {cache} of {rows} rows (20%)" in explain(
        replace(result, tables=(row_wise, *result.tables[1:])), row_wise)


def test_huge_device_counts_are_a_spec_error(tmp_path: Path, tables_file: Path,
                                             capsys) -> None:
    doc = small_topology_doc()
    doc["devices_per_host"] = 10_000_000
    with pytest.raises(SpecError) as info:
        parse_topology(doc)
    assert info.value.field == "devices_per_host" and str(MAX_DEVICES) in str(info.value)
    topology = write_json(tmp_path / "huge.json", doc)
    assert plan_cli.main(["--tables", str(tables_file), "--topology", str(topology),
                          "-o", str(tmp_path / "p.json")]) == ExitCode.BAD_INPUT
    assert "devices_per_host" in capsys.readouterr().err
    # Specs built in Python are checked by plan() too.
    small = parse_topology(small_topology_doc())
    with pytest.raises(SpecError):
        plan(parse_tables(small_tables_doc()), replace(small, hosts=MAX_DEVICES))


def test_tables_too_large_for_int64_bytes_are_a_spec_error(tmp_path: Path,
                                                           topology_file: Path,
                                                           capsys) -> None:
    doc = small_tables_doc()
    doc["tables"][2]["num_embeddings"] = 10**20
    with pytest.raises(SpecError) as info:
        parse_tables(doc)
    assert info.value.field == "tables[2].num_embeddings"
    assert "'t2'" in str(info.value) and str(MAX_TABLE_BYTES) in str(info.value)
    tables = write_json(tmp_path / "big.json", doc)
    assert plan_cli.main(["--tables", str(tables), "--topology", str(topology_file),
                          "-o", str(tmp_path / "p.json")]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "t2" in err and "num_embeddings" in err and "OverflowError" not in err
    # the largest allowed table still plans without overflow in the baselines
    ok = small_tables_doc(num_tables=1)
    ok["tables"][0]["num_embeddings"] = MAX_TABLE_BYTES // 32
    check_limits(parse_tables(ok), parse_topology(small_topology_doc()))
    doc["tables"][2]["num_embeddings"] = 500
    doc["tables"][2]["embedding_dim"] = 2**60
    with pytest.raises(SpecError) as info:
        parse_tables(doc)
    assert info.value.field == "tables[2].embedding_dim"
