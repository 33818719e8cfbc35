"""An exported plan runs in TorchRec's DistributedModelParallel: 2 CPU processes over
gloo, HBM tables sharded table-, row- and column-wise and data-parallel. Needs the
``torchrec`` extra (``make install-torchrec``)."""

from __future__ import annotations

import multiprocessing
import os
import traceback
import warnings
from pathlib import Path

import pytest

from planner import (
    ZERO_COST,
    AnalyticCostModel,
    DeviceLoad,
    Plan,
    Shard,
    Sharding,
    SolveReport,
    TablePlan,
    evaluate_plan,
    parse_tables,
    parse_topology,
    to_torchrec,
    to_torchrec_sharding_plan,
)
from tests.conftest import small_topology_doc

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fbgemm-gpu-cpu warns about GPU-only ops at import
    pytest.importorskip("torchrec")
    pytest.importorskip("fbgemm_gpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dlrm_runtime.distributed import free_port  # noqa: E402
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor  # noqa: E402
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # noqa: E402
from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: E402

WORLD = 2
ROWS = {"tw": 30, "rw": 21, "cw": 16, "dp": 8}
DIM = 8


def _plan() -> Plan:
    tables = parse_tables({"tables": [
        {"name": name, "num_embeddings": rows, "embedding_dim": DIM, "pooling_factor": 1.0}
        for name, rows in ROWS.items()]})
    topology = parse_topology(small_topology_doc(devices=WORLD, hbm_gb=1.0))
    planned = (
        TablePlan("tw", Sharding.TABLE_WISE, (Shard(1, 0, 30, 0, DIM),), ZERO_COST),
        TablePlan("rw", Sharding.ROW_WISE, (Shard(0, 0, 10, 0, DIM), Shard(1, 10, 21, 0, DIM)),
                  ZERO_COST),
        TablePlan("cw", Sharding.COLUMN_WISE, (Shard(0, 0, 16, 0, 4), Shard(1, 0, 16, 4, 8)),
                  ZERO_COST),
        TablePlan("dp", Sharding.DATA_PARALLEL, (Shard(0, 0, 8, 0, DIM), Shard(1, 0, 8, 0, DIM)),
                  ZERO_COST),
    )
    devices = tuple(DeviceLoad(d, 0, 0.0, 0, topology.usable_hbm_bytes) for d in range(WORLD))
    hand = Plan(tables, topology, "x", planned, devices,
                SolveReport("hand", "none", "", "", 0.0, 0.0, 0.0, 0.0, 1))
    return evaluate_plan(hand, AnalyticCostModel(), "planner:AnalyticCostModel")


def _worker(rank: int, port: int, doc: dict, results: multiprocessing.Queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            configs = [EmbeddingBagConfig(name=name, embedding_dim=DIM, num_embeddings=rows,
                                          feature_names=[f"f_{name}"])
                       for name, rows in ROWS.items()]
            ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
            model = DistributedModelParallel(ebc, device=torch.device("cpu"),
                                             plan=to_torchrec_sharding_plan(doc),
                                             sharders=[EmbeddingBagCollectionSharder()])
            shards = {}
            for key, value in model.state_dict().items():
                name = key.split(".")[-2]
                if hasattr(value, "local_shards"):
                    shards[name] = sorted((list(s.metadata.shard_offsets),
                                           list(s.tensor.shape)) for s in value.local_shards())
                else:
                    shards[name] = [([0, 0], list(value.shape))]
            ids = torch.tensor([0, 29, 0, 20, 0, 15, 0, 7])  # first and last row of each table
            features = KeyedJaggedTensor.from_lengths_sync(
                keys=[f"f_{name}" for name in ROWS], values=ids,
                lengths=torch.ones(len(ids), dtype=torch.int64))
            pooled = model(features).wait()
            results.put((rank, shards, list(pooled.values().shape)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report to the parent, which fails the test
        results.put((rank, traceback.format_exc(), None))



def test_dmp_accepts_exported_plan(tmp_path: Path) -> None:
    doc = to_torchrec(_plan(), device="cpu")
    expected: dict[int, dict[str, list]] = {rank: {} for rank in range(WORLD)}
    for name, entry in doc["plan"][""].items():
        if entry["sharding_spec"] is None:  # data-parallel: a whole replica per rank
            for rank in entry["ranks"]:
                expected[rank][name] = [([0, 0], [ROWS[name], DIM])]
            continue
        for shard in entry["sharding_spec"]["shards"]:
            rank = int(shard["placement"].split("/")[0].removeprefix("rank:"))
            expected[rank].setdefault(name, []).append((shard["shard_offsets"],
                                                        shard["shard_sizes"]))
    context = multiprocessing.get_context("fork")  # the parent has imported torchrec already
    results = context.Queue()
    port = free_port()
    workers = [context.Process(target=_worker, args=(rank, port, doc, results))
               for rank in range(WORLD)]
    for w in workers:
        w.start()
    got = dict((rank, (shards, shape)) for rank, shards, shape in
               (results.get(timeout=120) for _ in workers))
    for w in workers:
        w.join(timeout=30)
    for rank in range(WORLD):
        shards, shape = got[rank]
        assert isinstance(shards, dict), shards  # else a traceback from the worker
        want = {name: sorted(v) for name, v in expected[rank].items()}
        assert {name: v for name, v in shards.items() if v} == want
        # 2 samples per rank, each pooled from the 4 tables
        assert shape == [2, len(ROWS) * DIM]
    # the row-wise table was cut into TorchRec's blocks: 11 and 10 rows
    assert expected[0]["rw"] == [([0, 0], [11, DIM])]
    assert expected[1]["cw"] == [([0, 4], [16, 4])]


def test_sharding_plan_object_matches_json() -> None:
    from torchrec.distributed.types import ParameterSharding, ShardingPlan

    from planner import from_torchrec

    hand = _plan()
    doc = to_torchrec(hand, module_path="sparse")
    sharding_plan = to_torchrec_sharding_plan(hand, module_path="sparse")
    assert isinstance(sharding_plan, ShardingPlan)
    rw = sharding_plan.plan["sparse"]["rw"]
    assert isinstance(rw, ParameterSharding)
    assert (rw.sharding_type, rw.compute_kernel, rw.ranks) == ("row_wise", "fused", [0, 1])
    assert [(s.shard_offsets, s.shard_sizes, str(s.placement)) for s in rw.sharding_spec.shards] \
        == [([0, 0], [11, DIM], "rank:0/cuda:0"), ([11, 0], [10, DIM], "rank:1/cuda:1")]
    assert sharding_plan.plan["sparse"]["dp"].compute_kernel == "dense"
    from_object = from_torchrec(sharding_plan, hand.tables_spec, hand.topology)
    from_json = from_torchrec(doc, hand.tables_spec, hand.topology)
    assert from_object.tables == from_json.tables
