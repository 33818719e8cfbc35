"""Making pages of anonymous memory present before they are written, on a helper thread.

Memory new to a process costs a page fault per page at first write; on a virtual machine
whose host has not backed the guest's page yet, far more (measured on this 2-core VM:
0.05-0.6 ms per MiB for pages the guest had used before, about 3 ms per MiB for pages
it had not, with ``MADV_POPULATE_WRITE``). The redo segments (:mod:`storage.redo`)
grow by every row first written since the last checkpoint, a few MiB per training step,
so :class:`PagePopulator` populates the next pages of their memory ahead of use on one
helper thread (the ``madvise`` call runs outside the interpreter lock), and the writer
only waits for pages it needs before the helper got to them.
"""

from __future__ import annotations

import ctypes
import mmap
from concurrent.futures import Future, ThreadPoolExecutor

MADV_POPULATE_WRITE = 23
"""Linux 5.14+; older kernels refuse it (EINVAL) and first use faults the pages in."""


class PagePopulator:
    """Populates address ranges now or on its helper thread (started on first use).

    The caller keeps the memory mapped until a range queued with :meth:`later` is done
    (its future resolved), and calls :meth:`close` when finished with it."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._madvise = _libc_madvise()

    def now(self, ranges: list[tuple[int, int]]) -> None:
        """Populate ``(address, length)`` ranges in this thread (errors are ignored, and
        without libc nothing is done: the pages are then faulted in at first use)."""
        if self._madvise is None:
            return
        for address, length in ranges:
            start = address - address % mmap.PAGESIZE
            self._madvise(start, length + address - start, MADV_POPULATE_WRITE)

    def later(self, ranges: list[tuple[int, int]]) -> Future[None]:
        """Populate ``ranges`` on the helper thread; the future resolves when done."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="redo-pages")
        return self._pool.submit(self.now, ranges)

    def close(self) -> None:
        """Wait for the queued ranges and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _libc_madvise() -> ctypes._CFuncPtr | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # no libc: populate nothing
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise
