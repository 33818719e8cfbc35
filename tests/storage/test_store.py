"""Table store: row round trips against numpy, zarr validity, checkpoints, crash safety
with real SIGKILLs, and every error path."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from storage import journal as jr
from storage.dtypes import StoreDType, bf16_bits_to_float32, float32_to_bf16_bits
from storage.errors import (
    CorruptStoreError,
    FormatVersionError,
    MissingArrayError,
    ReadOnlyStoreError,
    RecoveryRequiredError,
    RowIndexError,
    RowShapeError,
    StoreArgumentError,
    StoreClosedError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    TableExistsError,
    TableSpecError,
)
from storage.store import TableStore
from storage.tables import uniform_bound

REPO = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("crash_writer.py")


def _load_writer():  # the helper is a script, not a package module
    spec = importlib.util.spec_from_file_location("crash_writer", WRITER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cw = _load_writer()


def _as_float(values: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_bits_to_float32(values) if dtype == "bf16" else values.astype(np.float32)


def _rows(rng: np.random.Generator, count: int, dim: int, dtype: str) -> np.ndarray:
    """Random rows already representable in ``dtype`` (so the numpy copy is exact)."""
    values = rng.standard_normal((count, dim)).astype(np.float32)
    if dtype == "bf16":
        return float32_to_bf16_bits(values)
    return values.astype(StoreDType(dtype).numpy)


# ---- round trips -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_against_numpy(tmp_path: Path, dtype: str) -> None:
    rows, dim, chunk = 5000, 12, 512  # 10 chunks, the last one partial
    rng = np.random.default_rng(0)
    with TableStore.create(tmp_path / "s") as store:
        info = store.add_table("t", rows, dim, dtype=dtype, chunk_rows=chunk, seed=3)
        assert (info.num_rows, info.dim, info.chunk_rows, info.num_chunks) == (rows, dim, chunk, 10)
        assert info.storage_dtype == {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}[dtype]
        ref = store.read_table("t")
        assert ref.dtype == StoreDType(dtype).numpy and ref.shape == (rows, dim)
        for _ in range(5):
            ids = rng.integers(0, rows, 700)  # spans every chunk, unsorted, with repeats
            got = store.gather("t", ids)
            assert got.dtype == ref.dtype and np.array_equal(got, ref[ids])
            write_ids = rng.integers(0, rows, 400)
            new = _rows(rng, 400, dim, dtype)
            store.scatter("t", write_ids, new)
            for i, row in zip(write_ids.tolist(), new):  # sequential: last duplicate wins
                ref[i] = row
            assert np.array_equal(store.gather("t", np.arange(rows)), ref)
        store.checkpoint(1)
        # the chunk files are still valid zarr: zarr's own reader sees the same rows
        on_disk = zarr.open_array(tmp_path / "s" / "t" / "weight", mode="r")[:]
        assert np.array_equal(on_disk, ref)
    with TableStore.open(tmp_path / "s") as store:
        assert np.array_equal(store.gather("t", np.arange(rows)), ref)


def test_duplicate_ids_last_write_wins(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 2000, 2, init="zeros", chunk_rows=512)
        ids = np.array([5, 1040, 5, 1999, 1040, 5])
        rows = np.arange(12, dtype=np.float32).reshape(6, 2)
        store.scatter("t", ids, rows)
        got = store.gather("t", [5, 1040, 1999, 0])
        assert np.array_equal(got, np.array([[10, 11], [8, 9], [6, 7], [0, 0]], np.float32))


def test_optimizer_state_round_trip(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        info = store.add_table("t", 3000, 8, chunk_rows=1024, optimizer_state="rowwise_adagrad")
        assert info.state_width == 1 and info.state_bytes == 3 * 1024 * 4
        assert info.weight_bytes == 3 * 1024 * 8 * 4
        assert np.array_equal(store.gather_state("t", np.arange(3000)), np.zeros((3000, 1)))
        ids = np.array([2999, 0, 1500, 1024, 1023])
        values = np.array([[1.5], [2.5], [3.5], [4.5], [5.5]], np.float32)
        store.scatter_state("t", ids, values)
        store.checkpoint(4)
        weights_before = store.read_table("t")
    with TableStore.open(tmp_path / "s") as store:
        assert np.array_equal(store.gather_state("t", ids), values)
        assert np.array_equal(store.read_table("t"), weights_before)  # state writes only
        state = zarr.open_array(tmp_path / "s" / "t" / "state", mode="r")[:]
        assert state.shape == (3000, 1) and np.array_equal(state[ids], values)
        assert np.count_nonzero(state) == 5


def test_uniform_init_bounds_determinism_and_progress(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("a", 4000, 16, seed=11, chunk_rows=64,
                        progress=lambda done, total: calls.append((done, total)))
        store.add_table("b", 4000, 16, seed=11, chunk_rows=1024)
        store.add_table("c", 4000, 16, seed=12)
        a, b, c = (store.read_table(n) for n in "abc")
    assert calls and calls[-1] == (4000, 4000)
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # seeded, independent of chunks
    bound = uniform_bound(4000)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(float(a.mean())) < 0.01 * bound * 10


def test_import_numpy_and_torch(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    values = rng.standard_normal((300, 4)).astype(np.float32)
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("np32", 300, 4, init=values, chunk_rows=256)
        store.add_table("np16", 300, 4, dtype="fp16", init=values.astype(np.float64))
        store.add_table("tbf", 300, 4, dtype="bf16", init=torch.from_numpy(values).bfloat16())
        store.add_table("fbf", 300, 4, dtype="bf16", init=values)  # floats rounded to bf16
        store.add_table("t32", 300, 4, init=torch.from_numpy(values))
        assert store.describe("np32").dtype is StoreDType.FP32
        assert store.tables() == ("fbf", "np16", "np32", "t32", "tbf")
        ids = np.arange(300)
        assert np.array_equal(store.gather("np32", ids), values)
        assert np.array_equal(store.gather("t32", torch.arange(300)), values)
        assert np.array_equal(store.gather("np16", ids), values.astype(np.float16))
        expect_bf = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(store.gather("tbf", ids), expect_bf)
        assert np.array_equal(store.gather("fbf", ids), expect_bf)  # same rounding as torch
        # writing a bf16 tensor, reading bits back as a torch bf16 tensor
        store.scatter("tbf", [1, 2], torch.tensor([[1.0, 2, 3, 4], [-1, -2, -3, -4]]).bfloat16())
        bits = store.gather("tbf", [1, 2])
        back = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
        assert back.tolist() == [[1.0, 2, 3, 4], [-1, -2, -3, -4]]


def test_import_in_blocks_from_a_callable(tmp_path: Path) -> None:
    """``init`` as a callable: asked for consecutive blocks in row order, any of numpy or
    torch, converted to the stored dtype; a block of the wrong shape or kind is refused
    naming the table, and no table is left behind."""
    rng = np.random.default_rng(7)
    values = rng.standard_normal((1000, 4)).astype(np.float32)
    asked: list[tuple[int, int]] = []

    def blocks(start: int, stop: int) -> torch.Tensor:
        asked.append((start, stop))
        return torch.from_numpy(values[start:stop])

    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 1000, 4, init=blocks, chunk_rows=256)
        assert asked[0][0] == 0 and asked[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in itertools.pairwise(asked))
        assert np.array_equal(store.gather("t", np.arange(1000)), values)
        store.add_table("h", 1000, 4, dtype="fp16", init=lambda a, b: values[a:b])
        assert np.array_equal(store.read_table("h"), values.astype(np.float16))
        with pytest.raises(TableSpecError, match="'bad'.*block has shape \\(3, 4\\)"):
            store.add_table("bad", 1000, 4, init=lambda a, b: values[:3])
        with pytest.raises(TableSpecError, match="'ints'.*must be floating point"):
            store.add_table("ints", 10, 4, init=lambda a, b: np.zeros((b - a, 4), np.int32))
        assert store.tables() == ("h", "t")
        store.warm("t")  # page-cache hint only: rows read the same afterwards
        assert np.array_equal(store.gather("t", [999, 0]), values[[999, 0]])


def test_maps_of_large_arrays_are_released_without_losing_writes(tmp_path: Path) -> None:
    """An array larger than the mapped-bytes budget unmaps its pages as rows are touched
    (bounded resident set); written rows survive in the page cache, a checkpoint makes
    them durable and a rollback still restores the old ones."""
    rng = np.random.default_rng(3)
    with TableStore.create(tmp_path / "s", map_budget_bytes=16 * 4096) as store:
        store.add_table("t", 8192, 64, init=np.zeros((8192, 64), np.float32), chunk_rows=1024)
        released = []
        files = None
        expected = np.zeros((8192, 64), np.float32)
        for step in range(6):
            ids = rng.choice(8192, 500, replace=False)
            values = rng.standard_normal((500, 64)).astype(np.float32)
            store.scatter("t", ids, values)
            expected[ids] = values
            files = store._files[("t", "weight")]
            released.append(files._touched_pages)
            assert np.array_equal(store.gather("t", ids), values)
        assert files is not None and files._release_pages == 16
        assert max(released) < 16 + 2 * 500  # released at least once per call past the budget
        store.checkpoint(1)
        assert np.array_equal(store.gather("t", np.arange(8192)), expected)
        store.scatter("t", [0, 1], np.ones((2, 64), np.float32))
        store.rollback()
        assert np.array_equal(store.gather("t", np.arange(8192)), expected)
    with TableStore.open(tmp_path / "s") as store:  # the default budget maps it whole
        assert np.array_equal(store.read_table("t"), expected)
        assert np.array_equal(store.gather("t", np.arange(8192)), expected)
        assert store._files[("t", "weight")]._release_pages == 0


@pytest.mark.parametrize("budget", [0, 4096, -1, 1.5, True, "1G"])
def test_map_budget_must_be_at_least_16_pages(tmp_path: Path, budget: object) -> None:
    with pytest.raises(StoreArgumentError, match="map_budget_bytes"):
        TableStore.create(tmp_path / "s", map_budget_bytes=budget)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


def test_bf16_rounding_matches_torch_and_fp16_overflow_is_inf(tmp_path: Path) -> None:
    values = np.concatenate([
        np.random.default_rng(2).standard_normal(4000).astype(np.float32) * 1e3,
        np.array([np.inf, -np.inf, np.nan, 3.4e38, -0.0, 1e-40, 1.00390625], np.float32)])
    ours = float32_to_bf16_bits(values)
    theirs = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(values)
    assert np.array_equal(ours[finite], theirs[finite])
    assert np.isnan(bf16_bits_to_float32(ours[~finite])).all()
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("h", 4, 2, dtype="fp16", init="zeros")
        store.scatter("h", [0], [[1e6, -1e6]])  # no RuntimeWarning (filterwarnings=error)
        assert store.gather("h", [0]).tolist() == [[np.inf, -np.inf]]


def test_cold_rows_read_correctly_after_eviction(tmp_path: Path) -> None:
    """Rows evicted from the page cache: reads hint the kernel first, values unchanged."""
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 20000, 16, chunk_rows=4096)
        ref = store.read_table("t")
    for chunk in (tmp_path / "s" / "t" / "weight").rglob("c/*/0"):
        fd = os.open(chunk, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    ids = np.random.default_rng(4).integers(0, 20000, 3000)
    with TableStore.open(tmp_path / "s") as store:
        store.prefetch("t", ids[:100])
        assert np.array_equal(store.gather("t", ids), ref[ids])


def test_gather_out_prefetch_and_empty(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 1000, 4, chunk_rows=256)
        ref = store.read_table("t")
        ids = np.array([999, 0, 500])
        out = np.empty((3, 4), np.float32)
        store.prefetch("t", ids)
        assert store.gather("t", ids, out=out) is out and np.array_equal(out, ref[ids])
        assert store.gather("t", np.array([], np.int64)).shape == (0, 4)
        store.scatter("t", [], np.empty((0, 4), np.float32))
        with pytest.raises(RowShapeError):
            store.gather("t", ids, out=np.empty((3, 4), np.float64))


def test_missing_chunk_reads_fill_and_is_created_on_write(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 2000, 2, chunk_rows=512, init="zeros")
    chunk = tmp_path / "s" / "t" / "weight" / "c" / "3" / "0"
    chunk.unlink()  # what zarr writes for an all-fill chunk (write_empty_chunks=False)
    with TableStore.open(tmp_path / "s", mode="r") as store:
        assert np.array_equal(store.gather("t", [1536, 1999]), np.zeros((2, 2), np.float32))
    with TableStore.open(tmp_path / "s", mode="r+") as store:
        assert np.array_equal(store.gather("t", [1536, 1999]), np.zeros((2, 2), np.float32))
        store.scatter("t", [1600], np.ones((1, 2), np.float32))
        store.checkpoint(1)
    assert chunk.stat().st_size == 512 * 2 * 4
    got = zarr.open_array(tmp_path / "s" / "t" / "weight", mode="r")[1536:]
    assert got[64].tolist() == [1.0, 1.0] and np.count_nonzero(got) == 2


def test_store_lists_cleanly_with_zarr(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 10, 2, optimizer_state="rowwise_adagrad")
        store.scatter("t", [1], np.ones((1, 2)))
        store.checkpoint(0)
    group = zarr.open_group(tmp_path / "s", mode="r")  # filterwarnings=error: no warnings
    names = sorted(name for name, _ in group.members(max_depth=None))
    assert names == ["_txn", "t", "t/state", "t/weight"]
    assert group.attrs["dlrm_toolkit_store"] == {"format_version": 1}
    spec = group["t/weight"].attrs["dlrm_toolkit_table"]
    assert (spec["num_rows"], spec["dim"], spec["dtype"], spec["role"]) == (10, 2, "fp32", "weight")


# ---- checkpoints and rollback ------------------------------------------------------
def test_checkpoint_then_close_discards_later_writes(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        assert store.checkpoint_step is None
        store.add_table("t", 4000, 4, chunk_rows=1024, optimizer_state="rowwise_adagrad")
        store.scatter("t", np.arange(0, 4000, 7), np.full((572, 4), 1.0))
        store.scatter_state("t", [3, 4], [[1.0], [2.0]])
        store.checkpoint(10)
        at_ckpt, state_at_ckpt = store.read_table("t"), store.read_table("t", state=True)
        store.scatter("t", np.arange(0, 4000, 3), np.full((1334, 4), 2.0))
        store.scatter("t", np.arange(0, 4000, 3), np.full((1334, 4), 3.0))  # journaled once
        store.scatter_state("t", [3, 5], [[9.0], [9.0]])
        assert store.uncommitted_journal_bytes() > 0
        store.rollback()
        assert np.array_equal(store.read_table("t"), at_ckpt)
        assert np.array_equal(store.read_table("t", state=True), state_at_ckpt)
        store.scatter("t", [1, 2], np.full((2, 4), 5.0))
    with TableStore.open(tmp_path / "s") as store:  # close() rolled back again
        assert store.checkpoint_step == 10
        assert np.array_equal(store.read_table("t"), at_ckpt)


def _run_writer(store: Path, max_steps: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(WRITER), str(store), str(max_steps), *extra],
                          capture_output=True, text=True, timeout=60, check=False)


def _make_crash_store(path: Path) -> dict[tuple[str, str], np.ndarray]:
    """The crash writer's tables; returns their initial content (bf16 as float32)."""
    initial = {}
    with TableStore.create(path) as store:
        for name, (rows, dim, dtype, chunk, state) in cw.TABLES.items():
            store.add_table(name, rows, dim, dtype=dtype, chunk_rows=chunk, seed=1,
                            optimizer_state=state)
            initial[(name, "weight")] = _as_float(store.read_table(name), dtype)
            if state is not None:
                initial[(name, "state")] = store.read_table(name, state=True)
    return initial


def _assert_state(store: TableStore, expected: dict[tuple[str, str], np.ndarray]) -> None:
    for (name, role), want in expected.items():
        rows = cw.TABLES[name][0]
        if role == "weight":
            got = _as_float(store.gather(name, np.arange(rows)), cw.TABLES[name][2])
        else:
            got = store.gather_state(name, np.arange(rows))
        assert np.array_equal(got, want), f"{name}/{role} differs from the checkpoint"


def test_writer_dying_mid_step_rolls_back_on_open(tmp_path: Path) -> None:
    path = tmp_path / "s"
    initial = _make_crash_store(path)
    done = _run_writer(path, 4)
    assert done.returncode == 0 and done.stdout.split()[-1] == "4"
    died = _run_writer(path, 9, "--exit-mid-step")
    assert died.returncode == 3
    with TableStore.open(path, mode="r") as store:  # the chunk files hold step 4 only
        _assert_state(store, cw.expected_state(initial, 4))
    with TableStore.open(path, mode="r+") as store:
        assert store.checkpoint_step == 4
        _assert_state(store, cw.expected_state(initial, 4))
    with TableStore.open(path, mode="r") as store:  # recovered: readers welcome again
        _assert_state(store, cw.expected_state(initial, 4))


def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    """Kill the writer with SIGKILL at random instants (inside scatters, flushes and
    checkpoints); every reopen must show exactly the last checkpoint."""
    path = tmp_path / "s"
    initial = _make_crash_store(path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(20240611)
    expected, at_step = initial, 0
    steps_seen, phases = set(), set()
    for trial in range(16):
        # odd trials spill every scatter to the segment files (no rows kept in memory)
        extra = ["--redo-memory", "0"] if trial % 2 else []
        proc = subprocess.Popen([sys.executable, str(WRITER), str(path), "100000", *extra],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first[0] == "ready" and int(first[1]) == at_step
        seen: list[list[str]] = []
        if trial % 4 == 3:  # aimed at the scatters (under 2 % of a step's time)
            while not seen or seen[-1][0] != "scatter" or len(seen) < 4:
                seen.append(proc.stdout.readline().split())
            time.sleep(rng.uniform(0.0, 0.0005))
        else:
            time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        lines = seen + [line.split() for line in proc.stdout.read().splitlines()]
        proc.stdout.close()
        printed = [int(step) for word, step in lines if word == "ckpt"]
        phases.add(lines[-1][0] if lines else "start")  # what the writer was doing
        assert proc.returncode == -signal.SIGKILL, f"trial {trial}: writer ended on its own"
        with TableStore.open(path, mode="r+") as store:
            step = store.checkpoint_step or 0
            last_printed = printed[-1] if printed else at_step
            # every printed checkpoint completed; at most one more may have committed
            assert last_printed <= step <= last_printed + 1, (trial, printed, step)
            expected = cw.expected_state(initial, step, expected, at_step)
            _assert_state(store, expected)
        at_step = step
        steps_seen.add(step)
    assert at_step >= 10, "the writer made too little progress to test anything"
    assert len(steps_seen) >= 5
    assert {"scatter", "checkpoint"} <= phases, f"kills landed only in {phases}"


# ---- redo segments: no sync per step, damage refused ------------------------------
def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (the lock's too)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _die_after_checkpoint_2(store: TableStore, path: Path, prepared: bool) -> None:
    """Prepare checkpoint 2 (``prepared``) or commit it without applying it, then let
    the writer die (its lock released, nothing else done)."""
    if prepared:
        store.prepare(2)
    else:
        seals = store._seal()
        checkpoint = jr.read_checkpoint(path / "_txn", "checkpoint.json")
        jr.write_checkpoint(path / "_txn", "checkpoint.json", jr.Checkpoint(
            2, checkpoint.generation + 1, checkpoint.store_id, seals))
    store._release()  # the process dies here


def _committed_not_applied(path: Path, *, prepared: bool = False) -> np.ndarray:
    """A store whose writer died right after the commit point (or after prepare):
    row 1 of "w" (and its state) written, sealed, not applied. Returns the new row."""
    store = TableStore.create(path)
    store.add_table("w", 3000, 4, chunk_rows=1024, optimizer_state="rowwise_adagrad")
    store.checkpoint(1)
    row = np.full((1, 4), 7.0, np.float32)
    store.scatter("w", np.arange(0, 3000, 5), np.full((600, 4), 2.0, np.float32))
    store.scatter("w", [1], row)
    store.scatter_state("w", [1, 2], [[3.0], [4.0]])
    _die_after_checkpoint_2(store, path, prepared)
    return row


SEGMENT = Path("_txn") / "redo" / "w@weight"


def _damage(root: Path, case: str, other: Path) -> None:
    segment = root / SEGMENT
    data = bytearray(segment.read_bytes())
    if case == "deleted":
        segment.unlink()
    elif case.startswith("truncated-"):
        segment.write_bytes(bytes(data[:int(case.split("-")[1])]))
    elif case.startswith("flip-"):
        at = int(case.split("-")[1])
        data[at] ^= 0x10
        segment.write_bytes(bytes(data))
    elif case == "other-generation":
        data[20] ^= 0x01  # the generation field (after magic and store id)
        segment.write_bytes(bytes(data))
    elif case == "other-store":
        shutil.copy(other / SEGMENT, segment)
    else:  # pragma: no cover
        raise ValueError(case)


DAMAGES = ["deleted", "truncated-0", "truncated-100", "truncated-256", "truncated-300",
           "truncated-9000", "flip-0", "flip-5", "flip-21", "flip-260", "flip-4000",
           "other-generation", "other-store"]


@pytest.mark.parametrize("prepared", [False, True], ids=["committed", "in-doubt"])
def test_damaged_sealed_segment_is_refused_in_one_line_writing_nothing(
        tmp_path: Path, prepared: bool) -> None:
    pristine, other = tmp_path / "pristine", tmp_path / "other"
    row = _committed_not_applied(pristine, prepared=prepared)
    _committed_not_applied(other, prepared=prepared)
    for case in DAMAGES:
        root = tmp_path / case
        shutil.copytree(pristine, root)
        _damage(root, case, other)
        before = _tree(root)
        with pytest.raises(CorruptStoreError) as raised:
            TableStore.open(root, mode="r+")
        message = str(raised.value)
        assert "\n" not in message and "w@weight" in message, (case, message)
        assert "damaged" in message and "restore the store" in message, (case, message)
        assert _tree(root) == before, f"{case}: the refused open wrote files"
    with TableStore.open(pristine, mode="r+") as store:  # undamaged: finished, not lost
        if prepared:
            assert store.prepared_step == 2
            assert np.array_equal(store.gather("w", [1]), row)
            store.commit_prepared()
        assert store.checkpoint_step == 2
        assert np.array_equal(store.gather("w", [1]), row)
        assert store.gather_state("w", [1, 2]).ravel().tolist() == [3.0, 4.0]
    with TableStore.open(pristine, mode="r") as store:
        assert np.array_equal(store.gather("w", [1]), row)
        assert store.verify() == []


@pytest.mark.parametrize("prepared", [False, True], ids=["committed", "in-doubt"])
def test_a_segment_sealed_partly_spilled_is_applied_on_open(tmp_path: Path,
                                                            prepared: bool) -> None:
    """Rows spilled to the segment file past the memory budget and rows still in memory
    are sealed as one segment; a writer dying after the commit point (or after prepare)
    leaves them to be checked and applied on open, and a flipped byte in the spilled
    part is refused."""
    path = tmp_path / "s"
    store = TableStore.create(path, redo_memory_bytes=6000)  # 24-byte slots: 250 rows
    store.add_table("w", 3000, 4, chunk_rows=1024)
    store.checkpoint(1)
    ref = store.read_table("w")
    rng = np.random.default_rng(5)
    for _ in range(5):  # spilled at the second and fourth scatters
        ids = rng.integers(0, 3000, 200)
        rows = rng.standard_normal((200, 4)).astype(np.float32)
        store.scatter("w", ids, rows)
        for i, row in zip(ids.tolist(), rows):
            ref[i] = row
    segment = store._segments["w/weight"]
    assert 0 < segment._spilled < segment.rows  # both parts hold rows
    _die_after_checkpoint_2(store, path, prepared)
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    data = bytearray((damaged / SEGMENT).read_bytes())
    data[256 + 24 * 3 + 10] ^= 0x04  # inside the fourth slot: a spilled one
    (damaged / SEGMENT).write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="CRC-32C"):
        TableStore.open(damaged, mode="r+")
    with TableStore.open(path, mode="r+") as store:
        assert np.array_equal(store.gather("w", np.arange(3000)), ref)
        if prepared:
            store.commit_prepared()
        assert store.checkpoint_step == 2
        assert np.array_equal(store.read_table("w"), ref)
    with TableStore.open(path, mode="r") as store:
        assert np.array_equal(store.gather("w", np.arange(3000)), ref)
        assert store.verify() == []


def test_redo_memory_bytes_is_checked(tmp_path: Path) -> None:
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(StoreArgumentError, match="redo_memory_bytes"):
            TableStore.create(tmp_path / "s", redo_memory_bytes=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", ["deleted", "truncated-300", "flip-4000", "other-store"])
def test_uncommitted_segment_damage_cannot_change_the_store(tmp_path: Path, case: str) -> None:
    """A writer died between checkpoints: its segments are discarded unread, so damage
    to them leaves exactly the last checkpoint."""
    path, other = tmp_path / "s", tmp_path / "other"
    initial = _make_crash_store(path)
    assert _run_writer(path, 4).returncode == 0
    _make_crash_store(other)
    assert _run_writer(other, 2).returncode == 0  # its segment files: sealed at checkpoints
    assert _run_writer(path, 9, "--exit-mid-step").returncode == 3
    segment = path / "_txn" / "redo" / "w@weight"
    assert segment.is_file()
    _damage(path, case, other)
    before = _tree(path)
    with TableStore.open(path, mode="r") as store:  # readers see the checkpoint
        _assert_state(store, cw.expected_state(initial, 4))
    with TableStore.open(path, mode="r+") as store:
        assert store.checkpoint_step == 4
        _assert_state(store, cw.expected_state(initial, 4))
    assert _tree(path) == before, "opening and closing wrote files"


def test_a_step_does_no_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 50_000, 16, optimizer_state="rowwise_adagrad")
        store.checkpoint(0)
        calls: list[str] = []
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, lambda fd, real=real, name=name: (
                calls.append(name), real(fd))[1])
        rng = np.random.default_rng(0)
        for _ in range(20):  # more rows than the segment's first mapping
            ids = rng.integers(0, 50_000, 3000)
            store.scatter("t", ids, np.ones((3000, 16), np.float32))
            store.scatter_state("t", ids, np.ones((3000, 1), np.float32))
            store.gather("t", ids)
        assert calls == []
        store.checkpoint(1)
        assert calls, "a checkpoint syncs"


def test_a_crash_inside_the_apply_finishes_on_open(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.chunks import ChunkFiles

    path = tmp_path / "s"
    store = TableStore.create(path)
    store.add_table("w", 4000, 4, chunk_rows=1024, optimizer_state="rowwise_adagrad")
    store.add_table("v", 100, 2)
    store.checkpoint(0)
    ids = np.arange(0, 4000, 3)
    store.scatter("w", ids, np.full((ids.size, 4), 5.0, np.float32))
    store.scatter_state("w", ids, np.full((ids.size, 1), 6.0, np.float32))
    store.scatter("v", [3], np.ones((1, 2), np.float32))
    real, writes = ChunkFiles.write, []

    def dying_write(self: ChunkFiles, rows: np.ndarray, values: np.ndarray) -> None:
        if writes:
            raise OSError("killed")  # the second array's rows never reach its chunk files
        writes.append(1)
        real(self, rows[: rows.size // 2], values[: rows.size // 2])  # half of the first
    monkeypatch.setattr(ChunkFiles, "write", dying_write)
    with pytest.raises(OSError, match="killed"):
        store.checkpoint(1)
    with pytest.raises(StoreError, match="reopen the store"):
        store.scatter("v", [1], np.ones((1, 2), np.float32))
    store._release()
    monkeypatch.setattr(ChunkFiles, "write", real)
    with pytest.raises(RecoveryRequiredError):
        TableStore.open(path, mode="r")
    with TableStore.open(path, mode="r+") as store:
        assert store.checkpoint_step == 1
        assert (store.gather("w", ids) == 5.0).all()
        assert (store.gather_state("w", ids) == 6.0).all()
        assert store.gather("v", [3]).tolist() == [[1.0, 1.0]]
        assert store.verify() == []


def test_a_flipped_chunk_byte_is_found_on_first_read_and_by_verify(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with TableStore.create(path) as store:
        store.add_table("t", 300_000, 8, chunk_rows=65536)  # blocks of 32768 rows
        store.scatter("t", [5], np.ones((1, 8), np.float32))
        store.checkpoint(3)
    chunk = path / "t" / "weight" / "c" / "1" / "0"  # rows 65536-131071: blocks 2 and 3
    data = bytearray(chunk.read_bytes())
    data[40_000 * 32 + 7] ^= 0x01  # row 65536 + 40000 = 105536: block 3
    chunk.write_bytes(bytes(data))
    before = _tree(path)
    with TableStore.open(path, mode="r") as store:
        assert store.gather("t", [5, 100]).shape == (2, 8)  # other blocks are fine
        with pytest.raises(CorruptStoreError) as raised:
            store.gather("t", [98_304 + 1])  # first read of block 3
        assert "t/weight" in str(raised.value) and "block 3 (rows 98304-131071)" in str(
            raised.value)
        progress: list[tuple[int, int]] = []
        damages = store.verify(lambda done, total: progress.append((done, total)))
        assert [(d.array, d.block, d.row_start, d.row_stop) for d in damages] == [
            ("t/weight", 3, 98304, 131072)]
        assert progress[-1] == (10, 10) and len(progress) == 10
    with TableStore.open(path, mode="r+") as store:  # a checkpoint over it is refused
        store.scatter("t", [98_305], np.ones((1, 8), np.float32))
        with pytest.raises(CorruptStoreError, match="block 3"):
            store.checkpoint(4)
    assert _tree(path) == {**before, **{k: v for k, v in _tree(path).items()
                                        if k.startswith("_txn/redo")}}


def test_a_damaged_marker_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with TableStore.create(path) as store:
        store.add_table("t", 10, 2)
        store.checkpoint(40)
    marker = path / "_txn" / "checkpoint.json"
    marker.write_bytes(marker.read_bytes().replace(b'"step": 40', b'"step": 41'))
    with pytest.raises(CorruptStoreError, match="checkpoint marker is damaged"):
        TableStore.open(path, mode="r+")


# ---- errors ------------------------------------------------------------------------
def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError) as missing:
        TableStore.open(tmp_path / "nope")
    assert isinstance(missing.value, FileNotFoundError) and "nope" in str(missing.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError):
        TableStore.open(tmp_path / "empty")
    zarr.open_group(tmp_path / "plain", mode="w")
    with pytest.raises(FormatVersionError) as plain:
        TableStore.open(tmp_path / "plain")
    assert plain.value.found is None and isinstance(plain.value, ValueError)
    TableStore.create(tmp_path / "s").close()
    meta = tmp_path / "s" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["dlrm_toolkit_store"]["format_version"] = 2
    meta.write_text(json.dumps(doc))
    with pytest.raises(FormatVersionError) as version:
        TableStore.open(tmp_path / "s")
    message = str(version.value)
    assert "version 2" in message and "format 1" in message and str(tmp_path / "s") in message
    with pytest.raises(StoreArgumentError):
        TableStore.open(tmp_path / "s", mode="w")  # type: ignore[arg-type]


def test_create_errors(tmp_path: Path) -> None:
    TableStore.create(tmp_path / "s").close()
    with pytest.raises(StoreExistsError) as exists:
        TableStore.create(tmp_path / "s")
    assert isinstance(exists.value, FileExistsError)
    with TableStore.open(tmp_path / "s"), pytest.raises(StoreLockedError):
        TableStore.create(tmp_path / "s", overwrite=True)  # not while it is open
    TableStore.create(tmp_path / "s", overwrite=True).close()  # a store may be replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("precious")
    with pytest.raises(StoreExistsError):
        TableStore.create(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "precious"


def test_table_errors(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 1000, 4, chunk_rows=256)
        with pytest.raises(TableExistsError) as exists:
            store.add_table("t", 10, 4)
        assert isinstance(exists.value, FileExistsError)
        bad_specs = [
            dict(name="_x", num_rows=1, dim=1), dict(name="a/b", num_rows=1, dim=1),
            dict(name="a", num_rows=0, dim=1), dict(name="a", num_rows=1, dim=0),
            dict(name="a", num_rows=1, dim=1, dtype="int8"),
            dict(name="a", num_rows=1, dim=1, init="normal"),
            dict(name="a", num_rows=3, dim=2, init=np.zeros((2, 3), np.float32)),
            dict(name="a", num_rows=3, dim=2, init=np.zeros((3, 2), np.int32)),
            dict(name="a", num_rows=1, dim=1, optimizer_state="adam"),
            dict(name="a", num_rows=1, dim=1, chunk_rows=0),
            dict(name="a", num_rows=1000, dim=4, chunk_rows=100),  # chunks not whole pages
            dict(name="a", num_rows=4000, dim=8, chunk_rows=512,  # state chunks: 2 KiB
                 optimizer_state="rowwise_adagrad"),
            dict(name="a", num_rows=1, dim=1, seed=-1),
        ]
        for kwargs in bad_specs:
            with pytest.raises(TableSpecError):
                store.add_table(**kwargs)
        assert store.tables() == ("t",)
        with pytest.raises(MissingArrayError) as unknown:
            store.gather("nope", [0])
        assert isinstance(unknown.value, KeyError) and "nope" in str(unknown.value)
        with pytest.raises(MissingArrayError, match="no optimizer state"):
            store.gather_state("t", [0])
        with pytest.raises(MissingArrayError):
            store.read_table("t", state=True)
    shutil.rmtree(tmp_path / "s" / "t" / "weight")
    with TableStore.open(tmp_path / "s") as store, pytest.raises(MissingArrayError) as gone:
        store.gather("t", [0])
    assert str(tmp_path / "s" / "t" / "weight") in str(gone.value)


def test_row_errors(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 100, 4)
        before = store.read_table("t")
        for ids in ([0, 100], [-1, 3], np.array([5, 1000])):
            with pytest.raises(RowIndexError) as err:
                store.gather("t", ids)
            assert isinstance(err.value, IndexError) and err.value.num_rows == 100
            with pytest.raises(RowIndexError):
                store.scatter("t", ids, np.zeros((len(ids), 4)))
        assert "'t'" in str(err.value) and "1000" in str(err.value) and "100 rows" in str(err.value)
        with pytest.raises(RowShapeError):
            store.gather("t", [[1, 2]])
        with pytest.raises(RowShapeError):
            store.gather("t", [0.5, 1.0])
        with pytest.raises(RowShapeError):
            store.scatter("t", [1, 2], np.zeros((2, 5)))
        with pytest.raises(RowShapeError):
            store.scatter("t", [1, 2], np.zeros((3, 4)))
        with pytest.raises(RowShapeError):
            store.scatter("t", [1, 2], np.zeros((2, 4), np.int64))
        with pytest.raises(StoreArgumentError):
            store.checkpoint(-1)
        assert np.array_equal(store.read_table("t"), before)
        assert store.uncommitted_journal_bytes() == 0


def test_read_only_store_refuses_writes_before_any_work(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 100, 4, optimizer_state="rowwise_adagrad")
        store.checkpoint(5)
    snapshot = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    with TableStore.open(tmp_path / "s", mode="r") as store:
        attempts = [
            lambda: store.scatter("t", [0], np.zeros((1, 4))),
            lambda: store.scatter("t", [1000], np.zeros((1, 4))),  # checked before the ids
            lambda: store.scatter_state("t", [0], np.zeros((1, 1))),
            lambda: store.add_table("u", 10, 2),
            lambda: store.flush(),
            lambda: store.checkpoint(6),
            lambda: store.rollback(),
        ]
        for attempt in attempts:
            with pytest.raises(ReadOnlyStoreError) as err:
                attempt()
            assert isinstance(err.value, PermissionError) and "mode='r+'" in str(err.value)
        assert store.checkpoint_step == 5
    after = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert after == snapshot and not (tmp_path / "s" / "u").exists()


def test_locks_and_closed_store(tmp_path: Path) -> None:
    writer = TableStore.create(tmp_path / "s")
    writer.add_table("t", 10, 2)
    with pytest.raises(StoreLockedError):
        TableStore.open(tmp_path / "s", mode="r")
    writer.close()
    with pytest.raises(StoreClosedError):
        writer.gather("t", [0])
    with TableStore.open(tmp_path / "s") as r1, TableStore.open(tmp_path / "s") as r2:
        assert r1.tables() == r2.tables() == ("t",)
        with pytest.raises(StoreLockedError) as locked:
            TableStore.open(tmp_path / "s", mode="r+")
        assert isinstance(locked.value, OSError)


def test_corrupt_chunk_file_is_reported(tmp_path: Path) -> None:
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 1000, 4, chunk_rows=256)
    chunk = tmp_path / "s" / "t" / "weight" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    with TableStore.open(tmp_path / "s") as store, pytest.raises(CorruptStoreError):
        store.gather("t", [300])


def test_every_error_is_a_store_error() -> None:
    for error in (StoreNotFoundError("p"), FormatVersionError("p", 2, 1),
                  MissingArrayError("p", "x"), ReadOnlyStoreError("p", "scatter"),
                  RowIndexError("t", 5, 3), TableExistsError("p", "t"),
                  StoreLockedError("p", "r"), RecoveryRequiredError("p", None)):
        assert isinstance(error, StoreError)
        assert "\n" not in str(error) and str(error)


def test_two_phase_checkpoint_commits_or_aborts_and_survives_reopening(tmp_path: Path) -> None:
    """prepare() makes writes durable but keeps their undo records: the store is in
    doubt (writes refused, nothing rolled back by close or reopen) until
    commit_prepared() or rollback() decides."""
    path = tmp_path / "s"
    ids = np.arange(0, 100, 7)

    def rows(value: float) -> np.ndarray:
        return np.full((ids.size, 4), value, dtype=np.float32)

    with TableStore.create(path) as store:
        store.add_table("w", 100, 4, optimizer_state="rowwise_adagrad")
        store.scatter("w", ids, rows(1.0))
        store.checkpoint(1)
        store.scatter("w", ids, rows(2.0))
        store.prepare(2)
        assert (store.prepared_step, store.checkpoint_step) == (2, 1)
        for write in (lambda: store.scatter("w", ids, rows(9.0)),
                      lambda: store.checkpoint(3), lambda: store.prepare(3)):
            with pytest.raises(StoreError, match="prepared checkpoint of step 2"):
                write()
    with pytest.raises(RecoveryRequiredError):  # readers wait for the decision
        TableStore.open(path, mode="r")
    with TableStore.open(path, mode="r+") as store:  # in doubt: nothing rolled back
        assert (store.prepared_step, store.checkpoint_step) == (2, 1)
        assert np.array_equal(store.gather("w", ids), rows(2.0))
        store.commit_prepared()
        assert (store.prepared_step, store.checkpoint_step) == (None, 2)
    with TableStore.open(path, mode="r+") as store:
        assert (store.prepared_step, store.checkpoint_step) == (None, 2)
        assert np.array_equal(store.gather("w", ids), rows(2.0))
        store.scatter("w", ids, rows(3.0))
        store.scatter_state("w", ids, np.ones((ids.size, 1), dtype=np.float32))
        store.prepare(3)
    with TableStore.open(path, mode="r+") as store:
        assert store.prepared_step == 3
        store.rollback()  # abort
        assert (store.prepared_step, store.checkpoint_step) == (None, 2)
        assert np.array_equal(store.gather("w", ids), rows(2.0))
        assert not store.gather_state("w", ids).any()
        with pytest.raises(StoreArgumentError, match="commit_prepared needs a prepared"):
            store.commit_prepared()
    assert not (path / "_txn" / "prepared.json").exists()


def test_a_prepared_marker_left_by_a_completed_commit_is_removed(tmp_path: Path) -> None:
    """A crash after the commit point (the checkpoint marker) but before prepared.json
    was removed: the store opens committed, not in doubt."""
    path = tmp_path / "s"
    store = TableStore.create(path)
    store.add_table("w", 10, 2)
    store.scatter("w", [1], np.ones((1, 2), dtype=np.float32))
    store.prepare(5)
    prepared = jr.read_prepared(path / "_txn", "prepared.json")
    jr.write_checkpoint(path / "_txn", "checkpoint.json", jr.Checkpoint(
        5, prepared.generation, prepared.store_id, prepared.apply))
    store._release()  # the process dies here: no rollback, no removal
    with TableStore.open(path, mode="r+") as store:
        assert (store.prepared_step, store.checkpoint_step) == (None, 5)
        assert np.array_equal(store.gather("w", [1]), np.ones((1, 2), dtype=np.float32))
    assert not (path / "_txn" / "prepared.json").exists()


@pytest.mark.parametrize("memory", [None, 0, 40_000], ids=["in-memory", "spill-always",
                                                           "spill-sometimes"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense-index", "dict-index"])
def test_redo_rows_read_through_and_apply_like_numpy(tmp_path: Path, dense: bool,
                                                     memory: int | None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Both segment indexes (a slot per row, or a dict for large arrays) serve the newest
    rows, survive growth of the segment, discard on rollback and apply at checkpoint;
    with the rows in memory, spilled to the file at every scatter, or past a small
    budget (rewrites of spilled rows then go to the file)."""
    from storage import redo

    if not dense:
        monkeypatch.setattr(redo, "DENSE_INDEX_BYTES", 0)
    rng = np.random.default_rng(3)
    budget = {} if memory is None else {"redo_memory_bytes": memory}
    with TableStore.create(tmp_path / "s", **budget) as store:
        store.add_table("t", 20_000, 3, dtype="fp16")
        ref = store.read_table("t")
        store.checkpoint(0)
        for step in range(1, 4):
            committed = ref.copy()
            for _ in range(5):
                ids = rng.integers(0, 20_000, 1500)  # repeats: the last occurrence wins
                rows = rng.standard_normal((ids.size, 3)).astype(np.float16)
                store.scatter("t", ids, rows)
                for i, row in zip(ids.tolist(), rows):
                    ref[i] = row
                probe = rng.integers(0, 20_000, 700)
                assert np.array_equal(store.gather("t", probe), ref[probe])
                held = sum(seg.memory_bytes for seg in store._segments.values())
                assert held <= (memory if memory is not None else redo.REDO_MEMORY_BYTES)
            if step == 2:
                store.rollback()
                ref = committed
            else:
                store.checkpoint(step)
            assert np.array_equal(store.read_table("t"), ref)
    with TableStore.open(tmp_path / "s", mode="r") as store:
        assert np.array_equal(store.gather("t", np.arange(20_000)), ref)
        assert store.verify() == []


def test_committing_a_prepared_checkpoint_over_a_damaged_block_is_refused(tmp_path: Path) -> None:
    """The rolled-forward commit of an in-doubt store checks the blocks it changes first:
    new checksums never bless a damaged block."""
    path = tmp_path / "s"
    store = TableStore.create(path)
    store.add_table("t", 1000, 4)
    store.scatter("t", [10], np.ones((1, 4), np.float32))
    store.prepare(1)
    store._release()  # dies in doubt
    chunk = path / "t" / "weight" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[500 * 16] ^= 0x02  # row 500: same block as row 10
    chunk.write_bytes(bytes(data))
    with TableStore.open(path, mode="r+") as store:
        with pytest.raises(CorruptStoreError, match="block 0 .*checkpoint is refused"):
            store.commit_prepared()
        assert store.prepared_step == 1  # still in doubt, nothing applied


def test_first_write_makes_the_arrays_share_of_redo_memory_present(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment's first write populates its share of ``redo_memory_bytes`` (the budget
    split over the store's arrays by slot bytes), so the writes of the steps that follow
    land in pages already present; the shares never add up to more than the budget, and
    a store smaller than its budget gets room for every row."""
    from storage import redo

    monkeypatch.setattr(redo, "POPULATE_BYTES", 4096)  # populated ahead on later writes
    budget = 600_000
    with TableStore.create(tmp_path / "s", redo_memory_bytes=budget) as store:
        store.add_table("big", 30_000, 8)  # 40-byte slots: 1.2 MB
        store.add_table("small", 10_000, 2, optimizer_state="rowwise_adagrad")  # 16 + 12
        for name in ("big", "small"):
            store.scatter(name, [0], np.ones((1, store.describe(name).dim), np.float32))
        store.scatter_state("small", [0], np.ones((1, 1), np.float32))
        ready = {key: seg._memory._ready for key, seg in store._segments.items()}
        slot_bytes = {"big/weight": 40, "small/weight": 16, "small/state": 12}
        rows = {"big/weight": 30_000, "small/weight": 10_000, "small/state": 10_000}
        total = sum(rows[k] * slot_bytes[k] for k in rows)
        for key, got in ready.items():
            share = int(budget * rows[key] * slot_bytes[key] / total) // slot_bytes[key]
            assert got >= share, key
            assert got <= share + redo.POPULATE_BYTES // slot_bytes[key] + 1, key
        assert sum(store._segments[k].share_slots * slot_bytes[k] for k in rows) <= budget
    with TableStore.create(tmp_path / "roomy") as store:
        store.add_table("t", 5_000, 4)
        store.scatter("t", [7], np.ones((1, 4), np.float32))
        assert store._segments["t/weight"]._memory._ready == 5_000


def test_redo_memory_is_reused_across_checkpoints_and_grows_where_reserving_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory slots of a segment are kept when a checkpoint clears it (the next
    generation's rows land in pages already there), and a segment that cannot reserve
    room for every row (strict overcommit) starts small and grows, with the same rows."""
    from storage import redo

    rng = np.random.default_rng(11)
    with TableStore.create(tmp_path / "s") as store:
        store.add_table("t", 50_000, 8)
        ids = rng.choice(50_000, 4000, replace=False)
        store.scatter("t", ids, np.ones((4000, 8), np.float32))
        store.checkpoint(1)
        segment = store._segments["t/weight"]
        memory, ready = segment._memory, segment._memory._ready
        store.scatter("t", ids[::-1], np.full((4000, 8), 2.0, np.float32))
        assert segment._memory is memory and memory._ready == ready
        store.checkpoint(2)
        assert (store.gather("t", ids) == 2.0).all()

    real = redo.SlotMemory

    def strict(capacity: int, row_bytes: int) -> redo.SlotMemory:
        if capacity == 20_000:  # the whole table: refused, as under strict accounting
            raise OSError(12, "Cannot allocate memory")
        return real(capacity, row_bytes)

    monkeypatch.setattr(redo, "SlotMemory", strict)
    monkeypatch.setattr(redo, "MIN_CAPACITY", 64)
    with TableStore.create(tmp_path / "small") as store:
        store.add_table("t", 20_000, 3)
        ref = store.read_table("t")
        for _ in range(6):
            ids = rng.integers(0, 20_000, 900)
            rows = rng.standard_normal((900, 3)).astype(np.float32)
            store.scatter("t", ids, rows)
            for i, row in zip(ids.tolist(), rows):
                ref[i] = row
            assert np.array_equal(store.gather("t", np.arange(20_000)), ref)
        assert 64 < store._segments["t/weight"]._memory.capacity < 20_000
        store.checkpoint(1)
        assert np.array_equal(store.read_table("t"), ref)
