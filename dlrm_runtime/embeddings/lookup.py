"""Sum-pooled lookups whose backward keeps the pooled gradient for the row optimizer
(:class:`PooledLookup`), the host tier's lookup (rows in host memory, pooled on the
compute device: :func:`host_pooled`, :class:`HostLookup`), and the piecewise-uniform
runs of a batched lookup (:func:`uniform_runs`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dlrm_runtime.embeddings.base import UniformRun


class PooledLookup(torch.autograd.Function):
    """Sum-pooled lookup whose backward does not build the weight's gradient: it
    records ``(ids, offsets, pooled_grad)`` in ``pending`` for the row optimizer, which
    applies it without materialising autograd's ``[num_ids, dim]`` sparse gradient
    (FBGEMM's table-batched embeddings likewise fuse backward and update). The weight
    gets no ``.grad``; see :meth:`RowBlock.row_grads`.

    ``runs`` (optional) splits a lookup whose bags are ragged as a whole but uniform
    piecewise (tables of different bag lengths batched together) into one entry per
    :class:`UniformRun`: each is then applied on the uniform path (no per-id index).
    Measured here on the demo's tables, 4096 samples, lookup and update: 5.0 -> 4.5 ms
    for its SGD group (1 and 2 ids per bag), 6.5 -> 5.6 ms for its row-wise Adagrad
    group (3 and 1)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,  # type: ignore[override]
                pending: list, runs: tuple[UniformRun, ...] = ()) -> torch.Tensor:
        ctx.save_for_backward(ids, offsets)
        ctx.pending = pending
        ctx.runs = runs
        return F.embedding_bag(ids, weight, offsets, mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ids, offsets = ctx.saved_tensors
        _record_pending(ctx.pending, ctx.runs, ids, offsets, grad)
        return None, None, None, None, None


def _record_pending(pending: list, runs: tuple[UniformRun, ...], ids: torch.Tensor,
                    offsets: torch.Tensor, grad: torch.Tensor) -> None:
    """Keep a lookup's pooled gradient for the row optimizer (see :class:`PooledLookup`)."""
    if not runs:
        pending.append((ids, offsets, grad))
    for run in runs:
        pending.append((ids[run.id_start:run.id_end],
                        torch.arange(0, run.id_end - run.id_start, run.length, device=ids.device),
                        grad[run.bag_start:run.bag_end]))


# ---------------------------------------------------------------- host tier


def host_pooled(weight: torch.Tensor, ids: torch.Tensor, bag_offsets: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """Sum-pooled lookup of a weight held in host memory, computed on ``device``: the
    batch's unique rows are gathered on the host (into page-locked memory when the
    weight is pinned), copied to ``device`` and pooled there through the ids' inverse
    index. Each bag adds the same rows in the same order as ``embedding_bag`` over
    the weight itself, so the result is the same to the bit."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.empty(unique.numel(), weight.shape[1], dtype=weight.dtype,
                       pin_memory=weight.is_pinned())
    torch.index_select(weight, 0, unique, out=rows)  # the host gather
    staged = rows.to(device, non_blocking=True)  # the host-to-device link
    return F.embedding_bag(inverse.to(device, non_blocking=True), staged,
                           bag_offsets.to(device, non_blocking=True), mode="sum")


class HostLookup(torch.autograd.Function):
    """:class:`PooledLookup` for a weight in host memory (the ``host`` tier): forward
    as :func:`host_pooled`; backward the pooled gradient comes back to the host, where
    it is recorded in ``pending`` with the host ids for the row optimizer, which then
    updates the host rows and their optimizer state in place."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,  # type: ignore[override]
                pending: list, runs: tuple[UniformRun, ...], device: torch.device) -> torch.Tensor:
        ctx.save_for_backward(ids, offsets)
        ctx.pending = pending
        ctx.runs = runs
        ctx.host = weight.device
        return host_pooled(weight, ids, offsets, device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ids, offsets = ctx.saved_tensors
        _record_pending(ctx.pending, ctx.runs, ids, offsets, grad.to(ctx.host))  # device-to-host
        return None, None, None, None, None, None


def pooled_lookup(weight: torch.Tensor, ids: torch.Tensor, bag_offsets: torch.Tensor,
                  pending: list, runs: tuple[UniformRun, ...] = (),
                  compute_device: torch.device | None = None) -> torch.Tensor:
    """Sum-pooled lookup whose gradient goes to ``pending`` when autograd records
    (:class:`PooledLookup`); with ``compute_device``, of a host-tier weight pooled on
    that device (:class:`HostLookup`). ``ids`` and ``bag_offsets`` on the weight's
    device."""
    if compute_device is not None:
        if torch.is_grad_enabled() and weight.requires_grad:
            return HostLookup.apply(weight, ids, bag_offsets, pending, runs, compute_device)
        return host_pooled(weight, ids, bag_offsets, compute_device)
    if torch.is_grad_enabled() and weight.requires_grad:
        return PooledLookup.apply(weight, ids, bag_offsets, pending, runs)
    return F.embedding_bag(ids, weight, bag_offsets, mode="sum")



def uniform_runs(offsets: torch.Tensor, counts: Sequence[int]) -> tuple[UniformRun, ...]:
    """For tables batched bag after bag (``offsets``: ``[T, B + 1]``, each table's own;
    ``counts``: each table's ids), the runs of consecutive tables whose bags all hold
    the same number of ids, when every table's bags are uniform but not all of one
    length (else ``()``: the lookup is uniform as a whole, or ragged). Tables without
    ids have no gradient and belong to no run."""
    tables, batch = offsets.shape[0], offsets.shape[1] - 1
    if batch <= 0 or any(count % batch for count in counts):
        return ()
    lengths = [count // batch for count in counts]
    if len(set(lengths)) == 1:
        return ()
    expected = torch.arange(batch + 1, device=offsets.device).unsqueeze(0) * torch.tensor(
        lengths, device=offsets.device).unsqueeze(1)
    if not torch.equal(offsets, expected):
        return ()
    runs: list[UniformRun] = []
    id_at = 0
    for k in range(tables):
        length = lengths[k]
        if length and runs and runs[-1].length == length and runs[-1].bag_end == k * batch:
            last = runs[-1]
            runs[-1] = UniformRun(last.id_start, id_at + counts[k], last.bag_start,
                                  (k + 1) * batch, length)
        elif length:
            runs.append(UniformRun(id_at, id_at + counts[k], k * batch, (k + 1) * batch, length))
        id_at += counts[k]
    return tuple(runs)
