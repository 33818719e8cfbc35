"""Allocation of large embedding weights.

Random row lookups into a table of gigabytes miss the TLB on nearly every row with
4 KiB pages. On Linux, CPU weights of at least :data:`HUGEPAGE_MIN_BYTES` are
therefore allocated untouched and advised ``MADV_HUGEPAGE`` before they are first
written, so the kernel backs them with 2 MiB pages where transparent huge pages are
enabled (``always`` or ``madvise``). Measured on a 2-core Xeon VM with a 2 GB table:
``embedding_bag`` forward of 163,840 random rows of 64 floats went from 23 ms to
10.5 ms. Where the advice is refused (other OS, THP ``never``) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

HUGEPAGE_MIN_BYTES = 64 << 20
_HUGEPAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded once (OSError where there is none)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _madvise_hugepages(tensor: torch.Tensor) -> bool:
    """Advise the 2 MiB-aligned interior of ``tensor``'s memory; True if accepted."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        start = (tensor.data_ptr() + _HUGEPAGE - 1) & ~(_HUGEPAGE - 1)
        end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) & ~(_HUGEPAGE - 1)
        if end <= start:
            return False
        return _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                               _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc / no madvise
        return False


def empty_weight(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``[rows, cols]`` tensor; large CPU ones advised onto huge pages
    (the caller must write it only after this returns, which is what makes the advice
    take effect at first touch)."""
    weight = torch.empty(rows, cols, dtype=dtype, device=device)
    if device.type == "cpu" and weight.numel() * weight.element_size() >= HUGEPAGE_MIN_BYTES:
        _madvise_hugepages(weight)
    return weight


def host_weight(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``[rows, cols]`` tensor in host memory for a host-tier table:
    page-locked (pinned) when CUDA is present, so that copies of its rows to the GPU
    run asynchronously at the link's full rate; else a CPU weight as
    :func:`empty_weight` makes it."""
    if torch.cuda.is_available():
        return torch.empty(rows, cols, dtype=dtype, pin_memory=True)
    return empty_weight(rows, cols, dtype, torch.device("cpu"))


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit


def tune_malloc() -> bool:
    """Stop glibc's malloc from giving memory back to the OS between training steps.

    A training step allocates and frees the same large temporaries (activations,
    gradients) every step. By default glibc serves blocks over its (adaptive) mmap
    threshold with fresh ``mmap`` pages and trims the heap top once over 2x that
    threshold is free, so steps page-fault their temporaries in again. This sets the
    mmap threshold to its maximum (32 MiB) and the trim threshold to 2 GiB, for the
    whole process (what ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
    would do). Measured with ``bench/throughput.py`` config (b), 2 threads, one
    process: our step 68.8 -> 64.4 ms, the reference PyTorch DLRM's 86.9 -> 79.8 ms;
    no change on config (a), whose temporaries are small. Temporaries over 32 MiB
    still get fresh pages: the runtime keeps its large scratch buffers instead.
    Returns False where there is no glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1 and ok
