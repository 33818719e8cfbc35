"""The background batch maker gives the same batches in order, hands errors over and
stops cleanly when the loop leaves early."""

from __future__ import annotations

import threading

import pytest
import torch

from dlrm_runtime.data import Batch, Prefetcher, SyntheticClicks
from planner import parse_tables
from tests.conftest import small_tables_doc


def test_same_batches_in_order() -> None:
    data = SyntheticClicks(parse_tables(small_tables_doc()), seed=3)
    with Prefetcher(data, 16, 5, 9) as batches:
        got = [batches.next() for _ in range(4)]
    for index, batch in zip(range(5, 9), got):
        expected = data.batch(index, 16)
        assert torch.equal(batch.dense, expected.dense)
        assert all(torch.equal(a, b) for a, b in zip(batch.sparse.ids, expected.sparse.ids))


class _Failing:
    dense_features = 13
    has_validation = False

    def batch(self, index: int, batch_size: int) -> Batch:
        raise OSError(f"disk gone at batch {index}")


def test_error_reaches_the_consumer() -> None:
    with Prefetcher(_Failing(), 8, 2, 10) as batches, pytest.raises(OSError, match="batch 2"):
        batches.next()


def test_leaving_early_stops_the_thread() -> None:
    data = SyntheticClicks(parse_tables(small_tables_doc()))
    before = threading.active_count()
    with Prefetcher(data, 8, 0, 10_000, depth=1) as batches:
        batches.next()
    assert threading.active_count() == before
