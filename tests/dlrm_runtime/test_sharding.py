"""Embeddings from any plan: every sharding type trains exactly like the unsharded model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlrm_runtime import (
    ModelConfig,
    PlanMismatchError,
    SparseBatch,
    SyntheticClicks,
    TrainConfig,
    Trainer,
    build_model,
    embeddings_from_plan,
    embeddings_in_memory,
)
from dlrm_runtime.data import Batch
from dlrm_runtime.embeddings import ShardedTable, TableBatchedBags
from dlrm_runtime.model import DLRM
from planner import Optimizer, Sharding, TableSpec, Tier
from planner import TablePlan
from tests.dlrm_runtime.helpers import sharded, table_wise, tables, topology

CPU = torch.device("cpu")
OPTIMIZERS = ("sgd", "rowwise_adagrad", "adam")


def _shard(spec: TableSpec, sharding: Sharding) -> TablePlan:
    rows, dim = spec.num_embeddings, spec.embedding_dim
    cut = rows // 3
    if sharding is Sharding.ROW_WISE:  # two hosts: devices 0 (host 0) and 3 (host 1)
        return sharded(spec.name, sharding, (3, cut, rows, 0, dim), (0, 0, cut, 0, dim))
    if sharding is Sharding.TABLE_ROW_WISE:  # host 0 only, three uneven shards
        return sharded(spec.name, sharding, (0, 0, 7, 0, dim), (1, 7, cut, 0, dim),
                       (0, cut, rows, 0, dim))
    if sharding is Sharding.COLUMN_WISE:  # listed out of column order on purpose
        return sharded(spec.name, sharding, (2, 0, rows, 3, dim), (1, 0, rows, 0, 3))
    assert sharding is Sharding.DATA_PARALLEL
    return sharded(spec.name, sharding, *[(d, 0, rows, 0, dim) for d in range(4)])


def _plans(sharding: Sharding, optimizers: tuple[str, ...] = OPTIMIZERS):
    spec = tables(optimizers=optimizers)
    topo = topology()
    return spec, table_wise(spec, topo), table_wise(spec, topo, {
        t.name: _shard(t, sharding) for t in spec.tables})


def _lopsided_batch(spec, batch: int = 6) -> Batch:
    """Ids of every table only in its first third of rows (the other row shards look up
    nothing), and some empty bags."""
    g = torch.Generator().manual_seed(11)
    ids, offsets = [], []
    for t in spec.tables:
        lengths = torch.tensor([0, 2, 1, 0, 3, 1][:batch])
        ids.append(torch.randint(0, t.num_embeddings // 3, (int(lengths.sum()),), generator=g))
        offsets.append(torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))
    return Batch(torch.randn(batch, 13, generator=g), SparseBatch(tuple(ids), tuple(offsets)),
                 torch.tensor([1.0, 0, 1, 1, 0, 0][:batch]), torch.full((batch,), 0.5))


def _dense_grads(model: DLRM, spec) -> dict[str, torch.Tensor]:
    """Every table's embedding gradient as a dense [rows, dim] tensor, assembled from
    whatever blocks hold the table."""
    out = {t.name: torch.zeros(t.num_embeddings, t.embedding_dim) for t in spec.tables}
    for block in model.embeddings.row_blocks():
        grad = block.sparse_grad().to_dense()
        for seg in block.segments:
            rows = slice(seg.row_start, seg.row_start + seg.rows)
            cols = slice(seg.col_start, seg.col_start + seg.cols)
            out[seg.table][rows, cols] = grad[seg.block_row:seg.block_row + seg.rows]
    return out


@pytest.mark.parametrize("sharding", [Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE,
                                      Sharding.COLUMN_WISE, Sharding.DATA_PARALLEL])
def test_sharded_forward_backward_and_updates_equal_unsharded(sharding: Sharding) -> None:
    spec, base_plan, plan = _plans(sharding)
    config = ModelConfig(dense_features=13, bottom_mlp=(16, 8), top_mlp=(8, 1))
    train_config = TrainConfig(batch_size=32, lr=0.1, embedding_lr=0.2, dense_optimizer="sgd")
    base, model = build_model(base_plan, config, seed=3), build_model(plan, config, seed=3)
    if sharding is not Sharding.DATA_PARALLEL:
        assert len(model.embeddings.sharded) == 3
    for t in spec.tables:  # placement-independent initialisation
        assert torch.equal(base.embeddings.weight(t.name), model.embeddings.weight(t.name))

    data = SyntheticClicks(spec, 13, seed=3)
    first = _lopsided_batch(spec)
    # forward and backward (before any update)
    for batch in (first, data.batch(0, 32)):
        outs = []
        for m in (base, model):
            for p in m.parameters():
                p.grad = None
            for block in m.embeddings.row_blocks():
                if block.pending is not None:
                    block.pending.clear()
            logits = m(batch.dense, batch.sparse)
            F.binary_cross_entropy_with_logits(logits, batch.labels).backward()
            outs.append(logits.detach())
        torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
        for a, b in zip(base.dense_parameters(), model.dense_parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5)
        base_grads, grads = _dense_grads(base, spec), _dense_grads(model, spec)
        for t in spec.tables:
            torch.testing.assert_close(grads[t.name], base_grads[t.name], atol=1e-6, rtol=1e-5)

    # optimizer steps: SGD, row-wise Adagrad and Adam tables, dense SGD
    base_trainer, trainer = Trainer(base, train_config), Trainer(model, train_config)
    for step, batch in enumerate([first, *(data.batch(i, 32) for i in range(5))]):
        assert trainer.step(batch) == pytest.approx(base_trainer.step(batch), abs=1e-6), step
    for t in spec.tables:  # equal up to the order of float sums (Adam amplifies it a little)
        torch.testing.assert_close(model.embeddings.weight(t.name), base.embeddings.weight(t.name),
                                   atol=1e-5, rtol=1e-4)
    for a, b in zip(base.mlp_layers(), model.mlp_layers()):
        torch.testing.assert_close(b.weight, a.weight, atol=1e-5, rtol=1e-4)


def test_column_wise_adagrad_uses_the_full_row() -> None:
    """Row-wise Adagrad's mean of squared gradients is over all columns of the row,
    summed across column shards: every shard's row state equals the unsharded one."""
    spec, base_plan, plan = _plans(Sharding.COLUMN_WISE, ("rowwise_adagrad",) * 3)
    config = ModelConfig(dense_features=13, bottom_mlp=(16, 8), top_mlp=(8, 1))
    train_config = TrainConfig(batch_size=64, embedding_lr=0.5, dense_optimizer="sgd")
    base, model = build_model(base_plan, config, seed=1), build_model(plan, config, seed=1)
    base_trainer, trainer = Trainer(base, train_config), Trainer(model, train_config)
    data = SyntheticClicks(spec, 13, seed=1)
    for i in range(3):
        base_trainer.step(data.batch(i, 64))
        trainer.step(data.batch(i, 64))
    (group,) = base_trainer.row_opt.state  # one batched group of three whole tables
    block = base_trainer.row_opt.blocks[0]
    for t in spec.tables:
        seg = next(s for s in block.segments if s.table == t.name)
        expected = group["sum_sq"][seg.block_row:seg.block_row + seg.rows]
        assert expected.count_nonzero() > 0
        shards = [(b, s) for b, s in zip(trainer.row_opt.blocks, trainer.row_opt.state)
                  if b.segments[0].table == t.name]
        assert len(shards) == 2 and all(b.row_group == t.name for b, _ in shards)
        for _, state in shards:
            torch.testing.assert_close(state["sum_sq"], expected, atol=1e-9, rtol=1e-5)
        torch.testing.assert_close(model.embeddings.weight(t.name), base.embeddings.weight(t.name),
                                   atol=1e-6, rtol=1e-5)


def test_sharded_tables_keep_their_shards_and_weight_is_a_copy() -> None:
    spec, _, plan = _plans(Sharding.ROW_WISE)
    embeddings = embeddings_from_plan(plan, CPU, seed=0)
    table = embeddings.sharded[1]
    assert isinstance(table, ShardedTable)
    assert [tuple(w.shape) for w in table.weights] == [(333, 8), (667, 8)]  # row order
    copy = embeddings.weight("t1")
    copy.zero_()
    assert embeddings.weight("t1").abs().sum() > 0  # a copy: the shards are untouched

    whole = embeddings_in_memory(spec)
    view = whole.weight("t1")
    view[0] = 7.0  # a view: writes go through
    assert float(whole.weight("t1")[0, 0]) == 7.0
    with pytest.raises(KeyError):
        whole.weight("nope")


def test_batched_groups_keep_spec_order() -> None:
    """Tables of one dim but two optimizers form two batched groups, {t0, t2} and {t1};
    outputs still come in spec order and equal per-table embedding bags."""
    spec = tables(optimizers=("sgd", "rowwise_adagrad", "sgd"))
    embeddings = embeddings_in_memory(spec, seed=2)
    assert [g.indices for g in embeddings.groups] == [[0, 2], [1]]
    batch = SyntheticClicks(spec, seed=2).batch(0, 16)
    stacked = embeddings.forward_stacked(batch.sparse)
    listed = embeddings(batch.sparse)
    for t, ids, offsets in zip(spec.tables, batch.sparse.ids, batch.sparse.offsets):
        expected = F.embedding_bag(ids, embeddings.weight(t.name), offsets, mode="sum",
                                   include_last_offset=True)
        index = spec.tables.index(t)
        torch.testing.assert_close(stacked[index], expected)
        torch.testing.assert_close(listed[index], expected)


def test_mixed_dims_use_the_list_path() -> None:
    doc_tables = tables(num_tables=2)
    spec = type(doc_tables)((doc_tables.tables[0],
                             TableSpec("wide", 40, 4, 2.0)))
    embeddings = embeddings_in_memory(spec)
    assert not embeddings.same_dim and len(embeddings.groups) == 2
    batch = SyntheticClicks(spec, seed=0).batch(0, 5)
    pooled = embeddings(batch.sparse)
    assert [tuple(p.shape) for p in pooled] == [(5, 8), (5, 4)]
    with pytest.raises(ValueError, match="same dim"):
        embeddings.forward_stacked(batch.sparse)


def test_batched_ids_and_offsets_are_checked() -> None:
    spec = tables()
    embeddings = embeddings_in_memory(spec)
    batch = SyntheticClicks(spec, seed=0).batch(0, 8)
    ids = list(batch.sparse.ids)
    ids[2] = ids[2].clone()
    ids[2][3] = 1500
    with pytest.raises(IndexError, match="table 't2': id 1500 outside 0..1499"):
        embeddings(SparseBatch(tuple(ids), batch.sparse.offsets))
    ids[2][3] = -1
    with pytest.raises(IndexError, match="table 't2': id -1 outside"):
        embeddings(SparseBatch(tuple(ids), batch.sparse.offsets))
    offsets = list(batch.sparse.offsets)
    offsets[1] = offsets[1].clone()
    offsets[1][-1] -= 1
    with pytest.raises(ValueError, match="offsets must start at 0 and end"):
        embeddings(SparseBatch(batch.sparse.ids, tuple(offsets)))
    with pytest.raises(ValueError, match="ids for 2 tables, the model has 3"):
        embeddings(SparseBatch(batch.sparse.ids[:2], batch.sparse.offsets[:2]))
    with pytest.raises(ValueError, match="one dim, dtype and optimizer"):
        TableBatchedBags([(0, spec.tables[0]), (1, TableSpec("x", 10, 4, 1.0))], CPU)


def test_sharded_ids_are_range_checked() -> None:
    spec, _, plan = _plans(Sharding.ROW_WISE)
    embeddings = embeddings_from_plan(plan, CPU)
    batch = SyntheticClicks(spec, seed=0).batch(0, 8)
    ids = list(batch.sparse.ids)
    ids[1] = torch.full_like(ids[1], 1000)
    with pytest.raises(IndexError, match="table 't1': id 1000 outside 0..999"):
        embeddings(SparseBatch(tuple(ids), batch.sparse.offsets))


W = 8  # every test table's dim


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        (sharded("t1", Sharding.ROW_WISE, (0, 0, 400, 0, W), (1, 500, 1000, 0, W)), "gap at row 400"),
        (sharded("t1", Sharding.ROW_WISE, (0, 0, 600, 0, W), (1, 500, 1000, 0, W)), "overlap at row 500"),
        (sharded("t1", Sharding.ROW_WISE, (0, 0, 500, 0, W), (1, 500, 900, 0, W)),
         "cover rows 0..900 of 0..1000"),
        (sharded("t1", Sharding.ROW_WISE, (0, 0, 500, 0, 4), (1, 500, 1000, 0, W)),
         "must span all 8 columns"),
        (sharded("t1", Sharding.TABLE_ROW_WISE, (1, 0, 500, 0, W), (2, 500, 1000, 0, W)),
         "one host, got hosts [0, 1]"),
        (sharded("t1", Sharding.COLUMN_WISE, (0, 0, 1000, 0, 3), (1, 0, 1000, 4, W)), "gap at column 3"),
        (sharded("t1", Sharding.COLUMN_WISE, (0, 0, 900, 0, W)), "must span all 1000 rows"),
        (sharded("t1", Sharding.DATA_PARALLEL, (0, 0, 1000, 0, W), (0, 0, 1000, 0, W)),
         "distinct devices"),
        (sharded("t1", Sharding.DATA_PARALLEL, (0, 0, 500, 0, W)), "must be the whole table"),
        (sharded("t1", Sharding.TABLE_WISE, (0, 0, 500, 0, W), (1, 500, 1000, 0, W)),
         "exactly one shard"),
        (sharded("t1", Sharding.TABLE_WISE, (0, 0, 1000, 0, W), tier=Tier.DRAM_CACHE),
         "tier 'dram_cache' is not supported"),
        (sharded("t1", Sharding.ROW_WISE, (0, 0, 500, 0, W), (1, 500, 1000, 0, W),
                 tier=Tier.STORE_CACHE), "tier 'store_cache' is not supported"),
        (sharded("t1", Sharding.TABLE_WISE, (7, 0, 1000, 0, W)), "device 7 outside 0..3"),
    ],
)
def test_plans_breaking_shard_conventions_are_refused(table: TablePlan, fragment: str) -> None:
    spec = tables()
    plan = table_wise(spec, topology(), {"t1": table})
    with pytest.raises(PlanMismatchError) as info:
        embeddings_from_plan(plan, CPU)
    assert "table 't1'" in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize("pooling", [None, 2.0])
def test_batched_gradients_accumulate_like_autograd_sparse_ones(pooling: float | None) -> None:
    """Two lookups before one step: the batched tables' pending gradients update every
    optimizer exactly like per-table weights with autograd's sparse gradients (ragged
    groups of one table per optimizer; or one SGD group with 2 ids in every bag)."""
    from dlrm_runtime.embeddings import RowOptimizer

    spec = tables(optimizers=OPTIMIZERS)
    if pooling is not None:
        spec = type(spec)(tuple(TableSpec(t.name, t.num_embeddings, t.embedding_dim, pooling)
                                for t in spec.tables))
    batched = embeddings_in_memory(spec, seed=4)
    plain = [torch.nn.Parameter(batched.weight(t.name).clone()) for t in spec.tables]
    batched_opt = RowOptimizer.for_blocks(batched.row_blocks(), lr=0.3)
    plain_opt = RowOptimizer(spec.tables, plain, lr=0.3)
    data = SyntheticClicks(spec, seed=4)
    for step in range(3):
        batched_opt.zero_grad()
        plain_opt.zero_grad()
        for index in (2 * step, 2 * step + 1):
            sparse = data.batch(index, 16).sparse
            target = torch.randn(len(spec.tables), 16, 8, generator=torch.Generator().manual_seed(index))
            ((batched.forward_stacked(sparse) - target) ** 2).sum().backward()
            pooled = [F.embedding_bag(ids, w, offsets, mode="sum", sparse=True, include_last_offset=True)
                      for w, ids, offsets in zip(plain, sparse.ids, sparse.offsets)]
            ((torch.stack(pooled) - target) ** 2).sum().backward()
        assert all(len(b.pending) == 2 for b in batched.row_blocks())
        batched_opt.step()
        plain_opt.step()
    for t, weight in zip(spec.tables, plain):  # equal up to the order of float sums
        torch.testing.assert_close(batched.weight(t.name), weight.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_tables_of_several_bag_lengths_update_by_uniform_runs(optimizer: str) -> None:
    """One batched group of tables with 1, 2, 1 and 3 ids per bag: ordered by bag
    length, its gradient is kept as one uniform run per length, and the update equals
    per-table weights with autograd's sparse gradients (also after a ragged batch,
    which keeps one entry)."""
    from dlrm_runtime.embeddings import RowOptimizer

    spec = type(tables())(tuple(TableSpec(f"t{k}", 300 + 50 * k, 8, float(per),
                                          optimizer=Optimizer(optimizer))
                                for k, per in enumerate((1, 2, 1, 3))))
    batched = embeddings_in_memory(spec, seed=5)
    (group,) = batched.groups
    assert group.indices == [0, 2, 1, 3]  # by ids per sample, then spec order
    plain = [torch.nn.Parameter(batched.weight(t.name).clone()) for t in spec.tables]
    batched_opt = RowOptimizer.for_blocks(batched.row_blocks(), lr=0.3)
    plain_opt = RowOptimizer(spec.tables, plain, lr=0.3)
    data = SyntheticClicks(spec, seed=5)
    for step, sparse in enumerate([data.batch(0, 16).sparse, _lopsided_batch(spec).sparse,
                                   data.batch(1, 16).sparse]):
        batched_opt.zero_grad()
        plain_opt.zero_grad()
        target = torch.randn(len(spec.tables), sparse.batch_size, 8,
                             generator=torch.Generator().manual_seed(step))
        ((batched.forward_stacked(sparse) - target) ** 2).sum().backward()
        pooled = [F.embedding_bag(ids, w, offsets, mode="sum", sparse=True,
                                  include_last_offset=True)
                  for w, ids, offsets in zip(plain, sparse.ids, sparse.offsets)]
        ((torch.stack(pooled) - target) ** 2).sum().backward()
        bags = [len(offsets) for _, offsets, _ in group.pending]
        if step == 1:  # ragged: one entry, every bag of the four tables
            assert bags == [4 * 6]
        else:  # runs of 1 id per bag (two tables), 2 and 3
            assert bags == [32, 16, 16]
            assert [len(ids) for ids, _, _ in group.pending] == [32, 32, 48]
        batched_opt.step()
        plain_opt.step()
    for t, weight in zip(spec.tables, plain):  # equal up to the order of float sums
        torch.testing.assert_close(batched.weight(t.name), weight.detach(), atol=1e-5, rtol=1e-4)


def test_uniform_runs_join_equal_bag_lengths_and_skip_empty_tables() -> None:
    from dlrm_runtime.embeddings import UniformRun, uniform_runs

    def offsets(*lengths: int) -> torch.Tensor:  # three bags per table
        return torch.stack([torch.arange(4) * length for length in lengths])

    assert uniform_runs(offsets(1, 1, 2, 0, 2), [3, 3, 6, 0, 6]) == (
        UniformRun(0, 6, 0, 6, 1), UniformRun(6, 12, 6, 9, 2), UniformRun(12, 18, 12, 15, 2))
    assert uniform_runs(offsets(2, 2), [6, 6]) == ()  # uniform as a whole already
    ragged = offsets(1, 2)
    ragged[1] = torch.tensor([0, 1, 4, 6])
    assert uniform_runs(ragged, [3, 6]) == ()


def test_stacking_out_of_order_groups_passes_each_its_gradient() -> None:
    """Groups {t0, t2} and {t1} stacked in spec order: the gradient of every table's
    output reaches its own rows."""
    spec = tables(optimizers=("sgd", "rowwise_adagrad", "sgd"))
    embeddings = embeddings_in_memory(spec, seed=3)
    sparse = SyntheticClicks(spec, seed=3).batch(0, 8).sparse
    scale = torch.tensor([1.0, 0.1, 0.01]).view(3, 1, 1)
    (embeddings.forward_stacked(sparse) * scale).sum().backward()
    for block in embeddings.row_blocks():
        grad = block.sparse_grad().to_dense()
        for seg in block.segments:
            k = int(seg.table[1:])
            rows = grad[seg.block_row:seg.block_row + seg.rows]
            touched = rows.abs().sum(1) > 0
            assert touched.any()
            # every id's gradient is a count of lookups times its table's scale
            ratio = rows[touched] / float(scale[k])
            torch.testing.assert_close(ratio, ratio.round())


def test_expand_pooled_handles_uniform_and_ragged_bags() -> None:
    from dlrm_runtime.embeddings import bag_of_ids, expand_pooled, uniform_bag_length

    pooled = torch.arange(12.0).view(4, 3)
    for offsets, num_ids in ((torch.tensor([0, 1, 2, 3]), 4), (torch.tensor([0, 3, 6, 9]), 12),
                             (torch.tensor([0, 0, 2, 5]), 7), (torch.tensor([0, 2, 2, 3]), 4)):
        expected = pooled[bag_of_ids(offsets, num_ids)]
        torch.testing.assert_close(expand_pooled(pooled, offsets, num_ids), expected)
        out = torch.empty(num_ids, 3)
        torch.testing.assert_close(expand_pooled(pooled, offsets, num_ids, out=out), expected)
        torch.testing.assert_close(out, expected)  # written into out, one id per bag too
    assert uniform_bag_length(torch.tensor([0, 3, 6, 9]), 12) == 3
    assert uniform_bag_length(torch.tensor([0, 2, 2, 3]), 4) is None
    assert uniform_bag_length(torch.tensor([0, 1, 2, 3]), 4) == 1


def test_equal_length_tables_take_the_broadcast_path() -> None:
    """Tables with the same ids per batch are rebased and range-checked by broadcasting;
    results equal per-table bags, and a bad id still names its table."""
    doc_tables = tables()
    spec = type(doc_tables)(tuple(TableSpec(t.name, t.num_embeddings, t.embedding_dim, 2.0)
                                  for t in doc_tables.tables))
    embeddings = embeddings_in_memory(spec, seed=1)
    batch = SyntheticClicks(spec, seed=1).batch(0, 8)
    stacked = embeddings.forward_stacked(batch.sparse)
    for k, (t, ids, offsets) in enumerate(zip(spec.tables, batch.sparse.ids, batch.sparse.offsets)):
        expected = F.embedding_bag(ids, embeddings.weight(t.name), offsets, mode="sum",
                                   include_last_offset=True)
        torch.testing.assert_close(stacked[k], expected)
    ids = list(batch.sparse.ids)
    ids[1] = ids[1].clone()
    ids[1][5] = 1000
    with pytest.raises(IndexError, match="table 't1': id 1000 outside 0..999"):
        embeddings(SparseBatch(tuple(ids), batch.sparse.offsets))


@pytest.mark.parametrize("sharding", [Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE])
@pytest.mark.parametrize("merge", [True, False])
def test_row_wise_tables_pool_once_or_route_per_device(sharding: Sharding, merge: bool) -> None:
    """Row shards on one device share one weight pooled by one lookup (``merge``); one
    weight per plan device (as with a GPU each) routes the ids. Both look up, take
    gradients and train like the whole table, including devices that see no ids."""
    from dlrm_runtime.embeddings import RowOptimizer
    from dlrm_runtime.embeddings import placements_from_plan

    spec, _, plan = _plans(sharding)
    placements = placements_from_plan(plan)
    whole = embeddings_in_memory(spec, seed=5)
    data = SyntheticClicks(spec, seed=5)
    batches = [_lopsided_batch(spec), *(data.batch(i, 16) for i in range(3))]
    for index, t in enumerate(spec.tables):
        placement = placements[t.name]
        table = ShardedTable(t, index, placement, CPU, seed=5, merge_devices=merge)
        blocks = table.row_blocks()
        devices = {s.plan_device for s in placement.shards}
        assert table.unrouted == merge and len(blocks) == (1 if merge else len(devices))
        assert sum(len(b.segments) for b in blocks) == len(placement.shards)
        assert [tuple(w.shape) for w in table.weights] == [(s.rows, t.embedding_dim)
                                                           for s in placement.shards]
        assert torch.equal(table.full_weight(), whole.weight(t.name))
        plain = torch.nn.Parameter(whole.weight(t.name).clone())
        opt, plain_opt = RowOptimizer.for_blocks(blocks, lr=0.3), RowOptimizer([t], [plain], lr=0.3)
        for step, batch in enumerate(batches):
            ids, offsets = batch.sparse.ids[index], batch.sparse.offsets[index]
            opt.zero_grad()
            plain_opt.zero_grad()
            out = table(ids, offsets)
            expected = F.embedding_bag(ids, plain, offsets, mode="sum", sparse=True,
                                       include_last_offset=True)
            torch.testing.assert_close(out, expected.detach())
            with torch.no_grad():
                torch.testing.assert_close(table(ids, offsets), expected.detach())
            target = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
            ((out - target) ** 2).sum().backward()
            ((expected - target) ** 2).sum().backward()
            grad = torch.zeros_like(plain)
            for block in blocks:
                dense = block.sparse_grad().to_dense()
                for seg in block.segments:
                    grad[seg.row_start:seg.row_start + seg.rows] = \
                        dense[seg.block_row:seg.block_row + seg.rows]
            torch.testing.assert_close(grad, plain.grad.to_dense())
            opt.step()
            plain_opt.step()
            torch.testing.assert_close(table.full_weight(), plain.detach(), atol=1e-6, rtol=1e-5)
