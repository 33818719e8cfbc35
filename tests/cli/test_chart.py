"""`dlrm-plan show --chart`: the PNG, the byte units, the device ticks and the per-table
breakdown the bars are drawn from."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import plan as plan_cli
from cli.chart import OTHER, TIER_HATCH, TIER_LABEL, breakdown, byte_unit, device_ticks, draw_chart
from cli.errors import ExitCode
from planner import Tier, read_plan
from tests.cli.test_cli import _plan_file
from tests.conftest import small_tables_doc, small_topology_doc, write_json


@pytest.mark.parametrize(("max_bytes", "unit"), [
    (0, "B"), (999, "B"), (1000, "KB"), (5e6, "MB"), (999.9e6, "MB"), (78e9, "GB"),
    (2e12, "TB"), (5e15, "TB"),
])
def test_byte_unit_suits_the_largest_value(max_bytes: float, unit: str) -> None:
    name, scale = byte_unit(max_bytes)
    assert name == unit
    assert max_bytes == 0 or 1 <= max_bytes / scale < 1000 or unit == "TB"


def test_device_ticks_are_integers_and_few_enough() -> None:
    assert device_ticks(1) == [0]
    assert device_ticks(8) == list(range(8))
    assert device_ticks(32) == list(range(32))
    assert device_ticks(40) == [*range(0, 38, 2), 39]  # 38 gives way to the last
    assert device_ticks(128) == [*range(0, 128, 4), 127]
    assert device_ticks(100, max_labels=10) == [*range(0, 100, 10), 99]
    for n in (33, 64, 100, 257, 1024):
        ticks = device_ticks(n)
        assert ticks[0] == 0 and ticks[-1] == n - 1 and len(ticks) <= 33
        assert ticks == sorted(set(ticks)) and all(isinstance(t, int) for t in ticks)


def _many_tables_plan(tmp_path: Path) -> Path:
    tables = write_json(tmp_path / "tables.json", small_tables_doc(num_tables=8, rows=300))
    topology = write_json(tmp_path / "topology.json", small_topology_doc(devices=3, hbm_gb=0.01))
    return _plan_file(tmp_path, tables, topology)


def test_breakdown_sums_to_the_planned_devices(tmp_path: Path) -> None:
    plan = read_plan(_many_tables_plan(tmp_path))
    parts = breakdown(plan, top=3)
    ranked = sorted(plan.tables, key=lambda t: (-t.cost.total_ms, -t.cost.hbm_bytes, t.name))
    assert parts.groups == (*(t.name for t in ranked[:3]), OTHER)
    for device in plan.devices:
        load = sum(v for (_, d), v in parts.load_ms.items() if d == device.device)
        hbm = sum(v for (_, _, d), v in parts.hbm_bytes.items() if d == device.device)
        assert load == pytest.approx(device.load_ms, rel=1e-9)
        assert hbm == pytest.approx(device.hbm_bytes, rel=1e-9)
    for table in ranked[:3]:  # a named table appears only where its shards are
        on = {s.device for s in table.shards}
        assert {d for (g, d), v in parts.load_ms.items() if g == table.name and v > 0} <= on
    assert {tier for (_, tier, _) in parts.hbm_bytes} <= set(Tier)
    assert breakdown(plan, top=7).groups == tuple(t.name for t in ranked)  # no lone "other"


def test_show_chart_writes_a_png(tmp_path: Path, capsys) -> None:
    plan = _many_tables_plan(tmp_path)
    out = tmp_path / "charts" / "plan.png"
    assert plan_cli.main(["show", str(plan), "--chart", str(out)]) == ExitCode.OK
    assert f"chart written to {out}" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    again = tmp_path / "again.png"
    draw_chart(read_plan(plan), again, top=3)
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_tier_has_a_hatch_and_a_label() -> None:
    assert set(TIER_HATCH) == set(TIER_LABEL) == set(Tier)
    assert len(set(TIER_HATCH.values())) == len(Tier)


def test_chart_of_a_plan_without_a_bound(tmp_path: Path) -> None:
    from dataclasses import replace

    plan = read_plan(_many_tables_plan(tmp_path))
    unbounded = replace(plan, solve=replace(plan.solve, lower_bound_ms=None))
    assert unbounded.solve.gap is None
    out = tmp_path / "unbounded.png"
    draw_chart(unbounded, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _ranked(costs: list[float]):
    from types import SimpleNamespace

    return [SimpleNamespace(name=f"t{i}", cost=SimpleNamespace(total_ms=c, hbm_bytes=100))
            for i, c in enumerate(costs)]


def test_the_legend_never_cuts_through_a_tie() -> None:
    from cli.chart import MAX_NAMED, named_count

    assert named_count(_ranked([5, 4, 3, 2, 1]), top=3) == 3
    assert named_count(_ranked([5, 4, 3, 3, 3, 1]), top=3) == 2  # the tie of 3s folds
    assert named_count(_ranked([3, 3, 3, 3, 1, 1, 1]), top=2) == 4  # a leading tie: all named
    assert named_count(_ranked([1.0] * (MAX_NAMED + 5)), top=10) == 0  # too many to name
    assert named_count(_ranked([5, 4, 3, 2]), top=3) == 4  # one left over: no lone "other"
