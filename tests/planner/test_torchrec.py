"""TorchRec plans: export to ParameterSharding fields, import and re-cost, evaluate's
capacity check, and the JSON path without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli import plan as plan_cli
from cli.errors import ExitCode
from planner import (
    AnalyticCostModel,
    CapacityError,
    PlanFileError,
    Sharding,
    Tier,
    from_torchrec,
    parse_tables,
    parse_topology,
    plan_to_json,
    to_torchrec,
    write_plan,
)
from planner.inputs.cost import ZERO_COST
from planner.plan_file import DeviceLoad, Plan, Shard, SolveReport, TablePlan
from planner.tools.evaluate import capacity_overflows, check_plan_fits, evaluate_plan
from planner.tools.torchrec import recut_tables, torchrec_row_blocks
from tests.conftest import small_topology_doc, write_json

ROOT = Path(__file__).resolve().parents[2]
DIM = 8


def _tables_doc() -> dict:
    def table(name: str, rows: int) -> dict:
        return {"name": name, "num_embeddings": rows, "embedding_dim": DIM,
                "pooling_factor": 2.0, "access": {"zipf": 1.1}}
    return {"tables": [table("tw", 300), table("rw", 400), table("rw_uneven", 10),
                       table("cw", 200), table("dp", 50), table("dram", 1000),
                       table("store", 800), table("twrw", 600), table("hosted", 700)]}


def _topology_doc(hbm_gb: float = 0.01, dram_gb: float = 1.0) -> dict:
    doc = small_topology_doc(devices=2, hosts=2, hbm_gb=hbm_gb)
    doc["host"]["dram_gb"] = dram_gb
    return doc


def _hand_plan(topology_doc: dict | None = None) -> Plan:
    """One table of each sharding type and tier on 2 hosts x 2 devices."""
    tables = parse_tables(_tables_doc())
    topology = parse_topology(topology_doc or _topology_doc())
    dram, store = Tier.DRAM_CACHE, Tier.STORE_CACHE
    planned = (
        TablePlan("tw", Sharding.TABLE_WISE, (Shard(3, 0, 300, 0, DIM),), ZERO_COST),
        TablePlan("rw", Sharding.ROW_WISE, tuple(Shard(d, 100 * d, 100 * d + 100, 0, DIM)
                                                 for d in range(4)), ZERO_COST),
        TablePlan("rw_uneven", Sharding.ROW_WISE,
                  tuple(Shard(d, 10 * d // 4, 10 * (d + 1) // 4, 0, DIM) for d in range(4)),
                  ZERO_COST),
        TablePlan("cw", Sharding.COLUMN_WISE, (Shard(1, 0, 200, 0, 4), Shard(2, 0, 200, 4, 8)),
                  ZERO_COST),
        TablePlan("dp", Sharding.DATA_PARALLEL, tuple(Shard(d, 0, 50, 0, DIM) for d in range(4)),
                  ZERO_COST),
        TablePlan("dram", Sharding.TABLE_WISE, (Shard(0, 0, 1000, 0, DIM, dram, 200),), ZERO_COST),
        TablePlan("store", Sharding.COLUMN_WISE, (Shard(0, 0, 800, 0, 4, store, 40),
                                                  Shard(1, 0, 800, 4, 8, store, 40)), ZERO_COST),
        TablePlan("twrw", Sharding.TABLE_ROW_WISE, (Shard(2, 0, 300, 0, DIM),
                                                    Shard(3, 300, 600, 0, DIM)), ZERO_COST),
        TablePlan("hosted", Sharding.TABLE_WISE, (Shard(2, 0, 700, 0, DIM, Tier.HOST),),
                  ZERO_COST),
    )
    devices = tuple(DeviceLoad(d, topology.host_of(d), 0.0, 0, topology.usable_hbm_bytes)
                    for d in range(4))
    report = SolveReport("hand", "none", "", "", 0.0, 0.0, 0.0, 0.0, 1)
    hand = Plan(tables, topology, "x", planned, devices, report)
    return evaluate_plan(hand, AnalyticCostModel(), "planner:AnalyticCostModel")


def _shards(plan: Plan) -> dict[str, tuple]:
    return {t.name: (t.sharding, tuple(sorted((s.device, s.row_start, s.row_end, s.col_start,
                                               s.col_end, s.tier, s.cache_rows)
                                              for s in t.shards)))
            for t in plan.tables}


def test_export_fields() -> None:
    doc = to_torchrec(_hand_plan())
    json.dumps(doc, allow_nan=False)
    tables = doc["plan"][""]
    assert (doc["world_size"], doc["local_world_size"]) == (4, 2)
    assert tables["tw"] == {
        "sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [3],
        "sharding_spec": {"shards": [{"shard_offsets": [0, 0], "shard_sizes": [300, DIM],
                                      "placement": "rank:3/cuda:1"}]},
        "cache_params": None, "dlrm_tier": "hbm"}
    assert tables["rw"]["ranks"] == [0, 1, 2, 3]
    assert [s["shard_offsets"] for s in tables["rw"]["sharding_spec"]["shards"]] == [
        [0, 0], [100, 0], [200, 0], [300, 0]]
    cw = tables["cw"]
    assert cw["ranks"] == [1, 2]
    assert [(s["shard_offsets"], s["shard_sizes"]) for s in cw["sharding_spec"]["shards"]] == [
        ([0, 0], [200, 4]), ([0, 4], [200, 4])]
    assert tables["dp"] == {"sharding_type": "data_parallel", "compute_kernel": "dense",
                            "ranks": [0, 1, 2, 3], "sharding_spec": None, "cache_params": None,
                            "dlrm_tier": "hbm"}
    assert tables["dram"]["compute_kernel"] == "fused_uvm_caching"
    assert tables["dram"]["cache_params"] == {"load_factor": pytest.approx(0.2)}
    assert tables["store"]["compute_kernel"] == "fused_uvm_caching"
    assert tables["store"]["cache_params"] == {"load_factor": pytest.approx(0.05)}
    assert tables["twrw"]["ranks"] == [2, 3]
    assert (tables["hosted"]["compute_kernel"], tables["hosted"]["cache_params"]) == (
        "fused_uvm", None)
    cpu = to_torchrec(_hand_plan(), module_path="sparse.ebc", device="cpu")
    assert cpu["plan"]["sparse.ebc"]["tw"]["sharding_spec"]["shards"][0]["placement"] == "rank:3/cpu"


def test_row_wise_export_uses_torchrec_blocks() -> None:
    assert torchrec_row_blocks(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert torchrec_row_blocks(5, 4) == [(0, 2), (2, 4), (4, 5), (5, 5)]
    hand = _hand_plan()
    assert recut_tables(hand) == ("rw_uneven",)
    shards = to_torchrec(hand)["plan"][""]["rw_uneven"]["sharding_spec"]["shards"]
    assert [(s["shard_offsets"][0], s["shard_sizes"][0]) for s in shards] == [
        (0, 3), (3, 3), (6, 3), (9, 1)]


def test_round_trip_through_json() -> None:
    hand = _hand_plan()
    text = json.dumps(to_torchrec(hand))
    back = from_torchrec(json.loads(text), hand.tables_spec, hand.topology)
    ours, theirs = _shards(hand), _shards(back)
    rw = theirs.pop("rw_uneven")
    ours.pop("rw_uneven")
    assert theirs == ours
    assert [s[:3] for s in rw[1]] == [(0, 0, 3), (1, 3, 6), (2, 6, 9), (3, 9, 10)]
    assert back.solve.method == "import:torchrec"
    assert back.cost_model == "planner:AnalyticCostModel"
    assert back.solve.objective_ms == pytest.approx(max(d.load_ms for d in back.devices))
    # costs under our model match the original's, table by table, where shards match
    for table in back.tables:
        if table.name != "rw_uneven":
            assert table.cost == hand.table(table.name).cost


def test_import_from_sharding_plan_object() -> None:
    """A ShardingPlan is read by attribute, so a look-alike object stands in here."""
    hand = _hand_plan()
    doc = to_torchrec(hand)

    def param(entry: dict) -> SimpleNamespace:
        spec = entry["sharding_spec"]
        cache = entry["cache_params"]
        return SimpleNamespace(
            sharding_type=entry["sharding_type"], compute_kernel=entry["compute_kernel"],
            ranks=entry["ranks"],
            sharding_spec=None if spec is None else SimpleNamespace(shards=[
                SimpleNamespace(shard_offsets=s["shard_offsets"], shard_sizes=s["shard_sizes"],
                                placement=s["placement"]) for s in spec["shards"]]),
            cache_params=None if cache is None else SimpleNamespace(**cache))

    plan_object = SimpleNamespace(plan={"": {name: param(e) for name, e in
                                             doc["plan"][""].items()}})
    back = from_torchrec(plan_object, hand.tables_spec, hand.topology)
    expected = _shards(from_torchrec(doc, hand.tables_spec, hand.topology))
    # without dlrm_tier, TorchRec's fused_uvm_caching reads as a DRAM cache
    store = expected.pop("store")
    got = _shards(back)
    assert {s[5] for s in got.pop("store")[1]} == {Tier.DRAM_CACHE}
    assert got == expected and store


def test_import_default_load_factor_and_empty_shards() -> None:
    hand = _hand_plan()
    doc = to_torchrec(hand)
    entry = doc["plan"][""]["dram"]
    entry["cache_params"] = None
    del entry["dlrm_tier"]
    back = from_torchrec(doc, hand.tables_spec, hand.topology)
    assert back.table("dram").shards[0].cache_rows == 200  # TorchRec's default 0.2 of 1000


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["tw"].update(compute_kernel="key_value"), "compute_kernel 'key_value'"),
    (lambda t: t["tw"].update(sharding_type="grid_shard"), "sharding_type 'grid_shard'"),
    (lambda t: t.pop("cw"), "not planned: ['cw']"),
    (lambda t: t.update(extra=t["tw"]), "not in the spec: ['extra']"),
    (lambda t: t["tw"]["sharding_spec"]["shards"][0].update(placement="rank:7/cuda:1"),
     "rank 7 outside"),
    (lambda t: t["tw"]["sharding_spec"]["shards"][0].update(shard_sizes=[301, DIM]),
     "outside the table's 300 x 8"),
    (lambda t: t["tw"]["sharding_spec"]["shards"][0].update(shard_offsets=[0]),
     "shard_offsets must be two integers"),
    (lambda t: t["dram"].update(cache_params={"load_factor": 2.0}), "load_factor in (0, 1]"),
    (lambda t: t["rw"]["sharding_spec"]["shards"].pop(), "shards end at 300, not 400"),
    (lambda t: t["dp"].update(compute_kernel="fused_uvm_caching"), "data-parallel"),
])
def test_import_errors(edit, message: str) -> None:
    hand = _hand_plan()
    doc = to_torchrec(hand)
    edit(doc["plan"][""])
    with pytest.raises(PlanFileError, match="x.json") as info:
        from_torchrec(doc, hand.tables_spec, hand.topology, file="x.json")
    assert message in str(info.value)


def test_module_path_selects_one_module() -> None:
    hand = _hand_plan()
    doc = to_torchrec(hand, module_path="a")
    doc["plan"]["b"] = {"unrelated": {}}
    assert _shards(from_torchrec(doc, hand.tables_spec, hand.topology, module_path="a")) \
        == _shards(from_torchrec(to_torchrec(hand), hand.tables_spec, hand.topology))
    with pytest.raises(PlanFileError, match="no module 'c'"):
        from_torchrec(doc, hand.tables_spec, hand.topology, module_path="c")


def test_fused_uvm_is_the_host_tier() -> None:
    hand = _hand_plan()
    doc = to_torchrec(hand)
    doc["plan"][""]["tw"].update(compute_kernel="fused_uvm", dlrm_tier=None)
    back = from_torchrec(doc, hand.tables_spec, hand.topology)
    assert back.table("tw").shards[0].tier is Tier.HOST
    assert back.table("hosted").shards[0].tier is Tier.HOST


def test_capacity_overflows_name_device_and_host() -> None:
    fits = _hand_plan()
    assert capacity_overflows(fits, AnalyticCostModel()) == ()
    check_plan_fits(fits, AnalyticCostModel())
    # HBM per device ~46, 32.5, 52, 46 KB (rows, caches and each shard's id and
    # pooled-output buffers); DRAM on host 0 (the "dram" table) and host 1 (the
    # "hosted" table, 22 KB)
    small = parse_topology(_topology_doc(hbm_gb=0.00004, dram_gb=0.00001))
    tight = evaluate_plan(fits, AnalyticCostModel(), "m", small)
    overflows = capacity_overflows(tight, AnalyticCostModel())
    where = {(r.value, w) for r, w, _, _ in overflows}
    assert where == {("hbm", "device 0"), ("hbm", "device 2"), ("hbm", "device 3"),
                     ("dram", "host 0"), ("dram", "host 1")}
    for _, _, used, capacity in overflows:
        assert used > capacity
    with pytest.raises(CapacityError, match=r"device 0 HBM needs .* GB \(over by"):
        check_plan_fits(tight, AnalyticCostModel())


def test_json_path_imports_neither_torch_nor_torchrec(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    write_plan(_hand_plan(), path)
    code = ("import sys, json\n"
            "from planner import read_plan, to_torchrec, from_torchrec\n"
            f"p = read_plan({str(path)!r})\n"
            "doc = json.loads(json.dumps(to_torchrec(p)))\n"
            "from_torchrec(doc, p.tables_spec, p.topology)\n"
            "print(sorted(m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- CLI


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    hand = _hand_plan()
    plan_path = tmp_path / "plan.json"
    write_plan(hand, plan_path)
    return (plan_path, write_json(tmp_path / "tables.json", _tables_doc()),
            write_json(tmp_path / "topology.json", _topology_doc()))


def test_cli_export_then_evaluate(tmp_path: Path, capsys) -> None:
    plan_path, tables, topology = _files(tmp_path)
    exported = tmp_path / "torchrec.json"
    assert plan_cli.main(["export", str(plan_path), "--format", "torchrec",
                          "-o", str(exported)]) == ExitCode.OK
    captured = capsys.readouterr()
    assert "1 row-wise table(s) cut into TorchRec's ceil(rows/N) blocks" in captured.err
    assert json.loads(exported.read_text()) == json.loads(json.dumps(to_torchrec(_hand_plan())))
    out = tmp_path / "recosted.json"
    assert plan_cli.main(["evaluate", str(exported), "--format", "torchrec", "--tables",
                          str(tables), "--topology", str(topology), "-o", str(out)]) == ExitCode.OK
    assert "re-costed under planner:AnalyticCostModel" in capsys.readouterr().out
    assert json.loads(out.read_text())["method"] == "import:torchrec"
    assert plan_cli.main(["evaluate", str(exported), "--format", "torchrec"]) == ExitCode.BAD_INPUT
    assert "pass --tables and --topology" in capsys.readouterr().err


def test_cli_evaluates_foreign_plan_without_hash(tmp_path: Path, capsys) -> None:
    plan_path, _, _ = _files(tmp_path)
    doc = json.loads(plan_path.read_text())
    del doc["inputs_sha256"]
    foreign = write_json(tmp_path / "foreign.json", doc)
    assert plan_cli.main(["evaluate", str(foreign)]) == ExitCode.OK
    capsys.readouterr()
    # a present hash must still match the embedded specs
    doc["inputs_sha256"] = "0" * 64
    edited = write_json(tmp_path / "edited.json", doc)
    assert plan_cli.main(["evaluate", str(edited)]) == ExitCode.BAD_INPUT
    assert "inputs_sha256 does not match" in capsys.readouterr().err
    # other commands still require it
    assert plan_cli.main(["show", str(foreign)]) == ExitCode.BAD_INPUT


def test_cli_evaluate_capacity_exit_code(tmp_path: Path, capsys) -> None:
    plan_path, tables, _ = _files(tmp_path)
    small = write_json(tmp_path / "small.json", _topology_doc(hbm_gb=0.000012))
    out = tmp_path / "out.json"
    code = plan_cli.main(["evaluate", str(plan_path), "--topology", str(small), "-o", str(out)])
    assert code == ExitCode.CAPACITY == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device 0 HBM needs" in err[0] and "over by" in err[0]
    assert not out.exists()
    exported = tmp_path / "torchrec.json"
    plan_cli.main(["export", str(plan_path), "-o", str(exported)])
    code = plan_cli.main(["evaluate", str(exported), "--format", "torchrec", "--tables",
                          str(tables), "--topology", str(small)])
    assert code == ExitCode.CAPACITY


def test_cli_evaluate_replaces_tables(tmp_path: Path, capsys) -> None:
    plan_path, _, _ = _files(tmp_path)
    doc = _tables_doc()
    for table in doc["tables"]:
        table["pooling_factor"] = 20.0
    heavier = write_json(tmp_path / "heavier.json", doc)
    out = tmp_path / "out.json"
    assert plan_cli.main(["evaluate", str(plan_path), "--tables", str(heavier),
                          "-o", str(out)]) == ExitCode.OK
    before = plan_to_json(_hand_plan())["objective_ms"]
    assert json.loads(out.read_text())["objective_ms"] > 5 * before
