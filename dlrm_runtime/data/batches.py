"""What training reads: batches (:class:`Batch`), the sources that make them
(:class:`ClickSource`: synthetic clicks, Criteo logs) and the background
:class:`Prefetcher`."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from dlrm_runtime.embeddings.sparse import SparseBatch

VALIDATION_OFFSET = 1 << 40
"""Batch indices at and above this are the validation stream."""


@dataclass(frozen=True, slots=True)
class Batch:
    dense: torch.Tensor
    """[B, F] float32."""
    sparse: SparseBatch
    labels: torch.Tensor
    """[B] float32 in {0, 1}."""
    teacher_prob: torch.Tensor
    """[B] float32: the probability the labels were drawn from."""


class ClickSource(Protocol):
    """Where training batches come from: batch ``i`` of ``B`` samples is a pure
    function of ``(i, B)``, so a run can resume at any step; indices from
    :data:`VALIDATION_OFFSET` on are the validation stream (when
    ``has_validation``). :class:`SyntheticClicks` and
    :class:`~dlrm_runtime.data.criteo.CriteoClicks` are the two built in."""

    dense_features: int
    has_validation: bool

    def batch(self, index: int, batch_size: int) -> Batch: ...


class Prefetcher:
    """Makes batches ``first..stop-1`` of ``data`` in a background thread, ``depth``
    ahead of the training loop (numpy and torch release the GIL while they compute,
    so on a machine with a spare core batch making overlaps the step). Batches are
    pure functions of their index, so the result is the same as without it. An error
    raised while making a batch is raised by :meth:`next` for that batch. Use as a
    context manager: leaving stops the thread."""

    def __init__(self, data: ClickSource, batch_size: int, first: int, stop: int,
                 depth: int = 2) -> None:
        self._queue: queue.Queue[tuple[Batch | None, BaseException | None]] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(data, batch_size, first, stop),
                                        name="batch-prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _work(self, data: ClickSource, batch_size: int, first: int, stop: int) -> None:
        for index in range(first, stop):
            if self._stop.is_set():
                return
            try:
                item: tuple[Batch | None, BaseException | None] = (data.batch(index, batch_size), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                item = (None, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def next(self) -> Batch:
        """The next batch in index order (waits for it)."""
        batch, error = self._queue.get()
        if error is not None:
            raise error
        return batch  # type: ignore[return-value]
