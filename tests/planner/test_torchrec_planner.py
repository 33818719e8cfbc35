"""TorchRecPlanner as TorchRec's ShardingPlanner: DistributedModelParallel on 2 CPU
processes over gloo, a model of several EmbeddingBagCollections, planned with
``collective_plan`` and trained a few steps. Needs the ``torchrec`` extra."""

from __future__ import annotations

import multiprocessing
import os
import traceback
import warnings

import pytest

from planner import PlannerError, PlanOptions, TorchRecPlanner

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fbgemm-gpu-cpu warns about GPU-only ops at import
    pytest.importorskip("torchrec")
    pytest.importorskip("fbgemm_gpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor  # noqa: E402
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # noqa: E402
from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: E402
from torchrec.distributed.planner import Topology as TorchRecTopology  # noqa: E402
from torchrec.distributed.planner.types import ParameterConstraints  # noqa: E402
from torchrec.optim.keyed import KeyedOptimizerWrapper  # noqa: E402
from dlrm_runtime.distributed import free_port  # noqa: E402

WORLD = 2
DIM = 8
USERS = {"user": 40, "user_geo": 12}
ITEMS = {"item": 64, "item_cat": 6, "item_brand": 20}
FEATURES = [f"f_{n}" for n in (*USERS, *ITEMS)]


class TwoTowers(torch.nn.Module):
    """Two EmbeddingBagCollections (one under a submodule) and a dense head."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.users = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=r, feature_names=[f"f_{n}"])
            for n, r in USERS.items()], device=device)
        self.tower = torch.nn.Module()
        self.tower.items = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=r, feature_names=[f"f_{n}"])
            for n, r in ITEMS.items()], device=device)
        self.head = torch.nn.Linear(DIM * len(FEATURES), 1)

    def forward(self, users: KeyedJaggedTensor, items: KeyedJaggedTensor) -> torch.Tensor:
        pooled = torch.cat([self.users(users).values(), self.tower.items(items).values()], dim=1)
        return self.head(pooled).squeeze(1)


def _features(names: dict[str, int], generator: torch.Generator, batch: int) -> KeyedJaggedTensor:
    lengths = torch.randint(1, 3, (len(names) * batch,), generator=generator)
    values = torch.cat([torch.randint(0, rows, (int(lengths[i * batch:(i + 1) * batch].sum()),),
                                      generator=generator)
                        for i, rows in enumerate(names.values())])
    return KeyedJaggedTensor.from_lengths_sync(keys=[f"f_{n}" for n in names], values=values,
                                               lengths=lengths)


def _planner() -> TorchRecPlanner:
    topology = TorchRecTopology(world_size=WORLD, compute_device="cpu", local_world_size=WORLD,
                                hbm_cap=64 * 1024 * 1024)
    constraints = {"item": ParameterConstraints(pooling_factors=[1.5], sharding_types=["row_wise"]),
                   "user": ParameterConstraints(pooling_factors=[1.5],
                                                sharding_types=["table_wise"])}
    return TorchRecPlanner(topology=topology, batch_size=4, constraints=constraints,
                           options=PlanOptions(time_limit_s=10))


def _worker(rank: int, port: int, results: multiprocessing.Queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = TwoTowers(torch.device("meta"))
            sharders = [EmbeddingBagCollectionSharder()]
            plan = _planner().collective_plan(model, sharders, dist.GroupMember.WORLD)
            dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
                                           sharders=sharders)
            dense = KeyedOptimizerWrapper(dict(dmp.named_parameters()),
                                          lambda params: torch.optim.SGD(params, lr=0.1))
            generator = torch.Generator().manual_seed(rank)
            users, items = _features(USERS, generator, 4), _features(ITEMS, generator, 4)
            labels = torch.rand(4, generator=generator)
            losses = []
            for _ in range(5):
                loss = torch.nn.functional.mse_loss(dmp(users, items), labels)
                loss.backward()
                dense.step()
                dense.zero_grad()
                losses.append(float(loss))
            sharding = {path: {name: (ps.sharding_type, ps.compute_kernel)
                               for name, ps in tables.items()}
                        for path, tables in plan.plan.items()}
            results.put((rank, sharding, losses))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report to the parent, which fails the test
        results.put((rank, traceback.format_exc(), None))



def test_dmp_trains_with_a_collective_plan() -> None:
    # spawn: a forked child of a parent whose torch thread pools have run can deadlock
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [context.Process(target=_worker, args=(rank, port, results)) for rank in range(WORLD)]
    for w in workers:
        w.start()
    got = dict((rank, (sharding, losses)) for rank, sharding, losses in
               (results.get(timeout=180) for _ in workers))
    for w in workers:
        w.join(timeout=30)
    for rank in range(WORLD):
        sharding, losses = got[rank]
        assert isinstance(sharding, dict), sharding  # else a traceback from the worker
        # every table of both collections, by module path; the constraints honoured
        assert set(sharding) == {"users", "tower.items"}
        assert set(sharding["users"]) == set(USERS) and set(sharding["tower.items"]) == set(ITEMS)
        assert sharding["tower.items"]["item"][0] == "row_wise"
        assert sharding["users"]["user"][0] == "table_wise"
        assert all(len(losses) == 5 and l == l for l in losses)  # finite steps
        assert losses[-1] < losses[0]  # it trains
    assert got[0][0] == got[1][0]  # one plan, broadcast


def test_plan_reads_the_module_and_the_topology() -> None:
    planner = _planner()
    sharding_plan = planner.plan(TwoTowers(torch.device("meta")), [EmbeddingBagCollectionSharder()])
    ours = planner.last_plan_
    assert ours is not None and ours.topology.world_size == WORLD
    assert ours.topology.batch_size_per_device == 4
    assert ours.tables_spec.by_name("item").pooling_factor == 1.5
    assert ours.tables_spec.by_name("item_cat").pooling_factor == 1.0
    assert set(sharding_plan.plan) == {"users", "tower.items"}


def test_no_collection_and_duplicate_names_are_errors() -> None:
    with pytest.raises(PlannerError, match="no EmbeddingBagCollection"):
        _planner().plan(torch.nn.Linear(2, 2), [])

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=4,
                                         feature_names=["f"])]
            self.a = EmbeddingBagCollection(tables=config, device=torch.device("meta"))
            self.b = EmbeddingBagCollection(tables=config, device=torch.device("meta"))

    with pytest.raises(PlannerError, match="in two collections"):
        _planner().plan(Twice(), [])
