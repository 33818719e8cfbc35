"""The torch.distributed pieces the multi-process runtime uses: starting the process
group from torchrun's environment, and the collectives with their autograd rules.

Backend by device: NCCL when CUDA is present (every rank on ``cuda:LOCAL_RANK``),
else gloo on the CPU. Gloo implements ``all_to_all_single`` (uneven splits included),
``all_reduce``, ``all_gather`` and ``gather_object`` on CPU tensors in torch 2.13.
"""

from __future__ import annotations

import datetime
import socket
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dlrm_runtime.errors import ConfigError
from dlrm_runtime.measure.timing import Stopwatch

__all__ = [
    "AllToAll", "ProcessGroupInfo", "all_to_all", "all_to_all_values", "init_from_env",
    "process_group_info", "shutdown",
]

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets for every process it starts."""


@dataclass(frozen=True, slots=True)
class ProcessGroupInfo:
    """Where this process stands in the initialised default process group."""

    rank: int
    world_size: int
    backend: str
    """``nccl`` or ``gloo``."""
    device: torch.device
    """Where this rank computes and communicates: ``cuda:LOCAL_RANK`` with NCCL, else
    the CPU."""


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is not set; launch with torchrun")
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {text!r}") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now, for a process group launched by hand (tests,
    benchmarks, calibration's all-to-all probe)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_from_env(timeout_s: float = 600.0) -> int:
    """Initialise the default process group from torchrun's environment variables
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and
    return the world size.

    Backend: NCCL with this process on ``cuda:LOCAL_RANK`` when CUDA is present, else
    gloo. Without ``WORLD_SIZE``, or with ``WORLD_SIZE=1``, nothing is initialised and
    1 is returned (run :func:`dlrm_runtime.train` in this one process). An already
    initialised group is kept. ``timeout_s`` bounds every collective (a rank that
    died leaves the others waiting at most that long; torchrun usually stops them
    sooner). Raises :class:`ConfigError` for malformed variables or a failed start.
    """
    if "WORLD_SIZE" not in os.environ:
        return 1
    world = _env_int("WORLD_SIZE")
    if world < 1:
        raise ConfigError(f"WORLD_SIZE must be >= 1, got {world}")
    if dist.is_initialized():
        return dist.get_world_size()
    if world == 1:
        return 1
    rank = _env_int("RANK")
    if torch.cuda.is_available():
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"torch.distributed ({backend}) could not start from the "
                          f"environment ({', '.join(f'{v}={os.environ.get(v)}' for v in ENV_VARS)})"
                          f": {exc}") from None
    return world


def shutdown(*, synchronize: bool = False) -> None:
    """Destroy the default process group if there is one. ``synchronize``: first wait
    until every rank gets here (after a run that ended normally), so that no rank closes
    its connections while a peer still finishes the last collective (gloo then aborts
    that peer with "terminate called without an active exception"; seen once in a
    test run)."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def process_group_info() -> ProcessGroupInfo:
    """This rank, the world size, the backend and the device of the initialised default
    process group; :class:`ConfigError` when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("no torch.distributed process group: launch with torchrun and call "
                          "dlrm_runtime.init_from_env() first")
    backend = str(dist.get_backend())
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return ProcessGroupInfo(dist.get_rank(), dist.get_world_size(), backend, device)


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a flat tensor whose backward is the reverse exchange:
    the gradient of what this rank received from rank ``q`` goes back to ``q``."""

    @staticmethod
    def forward(ctx, send: torch.Tensor, out_splits: list[int], in_splits: list[int],  # type: ignore[override]
                group: dist.ProcessGroup | None, clock: Stopwatch | None) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        ctx.clock = clock
        return all_to_all_values(send, out_splits, in_splits, group, clock)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return (all_to_all_values(grad, in_splits, out_splits, ctx.group, ctx.clock),
                None, None, None, None)


def all_to_all_values(send: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                      group: dist.ProcessGroup | None = None,
                      clock: Stopwatch | None = None) -> torch.Tensor:
    """Rank ``q`` gets ``send``'s ``q``-th piece (``in_splits[q]`` entries along dim 0);
    returns the pieces received, from rank 0 first (``out_splits[q]`` from rank ``q``).
    No autograd. With ``clock``, the exchange's time is added to it."""
    out = send.new_empty((sum(out_splits), *send.shape[1:]))
    send = send.contiguous()
    if clock is None:
        dist.all_to_all_single(out, send, list(out_splits), list(in_splits), group=group)
        return out
    with clock.timing():
        dist.all_to_all_single(out, send, list(out_splits), list(in_splits), group=group)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
    return out


def all_to_all(send: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
               group: dist.ProcessGroup | None = None,
               clock: Stopwatch | None = None) -> torch.Tensor:
    """:func:`all_to_all_values` with a gradient (see :class:`AllToAll`). When ``send``
    needs no gradient but autograd is on, a zero-size leaf is attached so that this
    rank still joins the backward exchange the other ranks start."""
    if torch.is_grad_enabled() and not send.requires_grad:
        send = send + send.new_zeros(()).requires_grad_()
    return AllToAll.apply(send, list(out_splits), list(in_splits), group, clock)
