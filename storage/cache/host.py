"""The row cache's one host synchronisation point (:func:`sync_to_host`): everything the
cache reads back from its device goes through it, so the places where a lookup waits
for the device are the calls of this function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from storage.dtypes import torch_to_numpy


class HostCopy:
    """Tensors on their way to host memory; :meth:`arrays` waits for them."""

    def __init__(self, tensors: list[torch.Tensor], event: Any) -> None:
        self._tensors = tensors
        self._event = event

    def arrays(self) -> list[np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return [torch_to_numpy(t) for t in self._tensors]


def sync_to_host(select: Callable[[], list[torch.Tensor]], *, wait: bool = True) -> HostCopy:
    """The cache's one host synchronisation point: ``select()`` computes, on the device,
    the tensors the host needs (it may use ops whose output size depends on the data,
    such as boolean masks and ``unique``, which synchronise on CUDA), and they are
    copied to host memory. With ``wait=False`` the copy is only queued (pinned memory,
    an event): :meth:`HostCopy.arrays` waits for it, on whichever thread calls it.
    On the CPU nothing is copied and nothing waits."""
    tensors = select()
    if all(t.device.type == "cpu" for t in tensors):
        return HostCopy(tensors, None)
    cuda = tensors[0].device.type == "cuda"
    copies = [t.to("cpu", non_blocking=cuda) for t in tensors]
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record()
    copy = HostCopy(copies, event)
    if wait:
        copy.arrays()
    return copy
