"""Direct row access to the uncompressed chunk files of one zarr array.

zarr-python's own sparse indexing serves 5-20 k rows/s here; reading the chunk
files through shared memory maps and ``numpy.take`` serves over 1 M rows/s from the
page cache (bench/storage.py). All chunk files of an array are mapped side by side
into one reserved range of address space (``mmap`` with ``MAP_FIXED`` through
ctypes; Linux), so the whole array is a single numpy view of shape
(num_chunks * chunk_rows, width): a gather is one ``take``, a scatter one fancy
assignment, whatever the number of chunks. That needs chunks of a whole number of
pages when there is more than one (:func:`chunk_layout_problem`). The range is
advised MADV_RANDOM, so a cold fault reads one page, not a readahead window.

Cold reads are bound by the disk's random-read latency when faults come one at a
time (~35 k rows/s here). So every read first checks whether a sample of its rows
is in the page cache (``mincore`` on RESIDENCY_SAMPLE_ROWS rows' pages); if any is
not, it asks the kernel to read every needed page first (MADV_WILLNEED queues the
reads asynchronously), and the disk serves them in parallel (~80-100 k rows/s here,
the disk's random-read limit). The check costs ~1 us per sampled row and depends on
the page cache only, not on timing, so a busy CPU cannot fool it. :meth:`prefetch`
hints on request, e.g. for the next batch.

Writes go through the same shared maps, so they land in the page cache, and the
store makes them durable with ``fdatasync`` of the files :meth:`dirty_paths` names.
Chunk files are always fully allocated (written or ``posix_fallocate``-d), so a
write through a map never allocates blocks (no SIGBUS on a full disk). A missing
chunk file (zarr omits all-fill chunks) reads as the fill value; a writer creates it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from storage.errors import CorruptStoreError, StoreError
from storage.files import fdatasync_file, fsync_dir, replace_atomic, write_all
from storage.layout import ArrayLayout

PAGE_BYTES = mmap.PAGESIZE
RESIDENCY_SAMPLE_ROWS = 16
"""Rows per read whose pages are checked with mincore; one miss turns hints on."""
MAP_ALIGN_BYTES = 2 * 1024 * 1024
"""The maps of an array within :data:`MAPPED_BYTES_BUDGET` start at a multiple of this
(the x86-64 huge page), so every chunk's file offsets and addresses agree modulo it.
Measured here (ext4, 200k x 32 fp32 rows): the first write to a clean page through a
map placed at an arbitrary page (as a plain ``mmap`` reservation returns) took 25-35
us; through a 2 MiB-aligned map 0.1-1.3 us, like a map the kernel places itself. It
made the cache's write-back 20x faster. But an aligned fault maps the page cache's
whole large folio (up to 2 MiB) into the process: random rows of an array larger than
RAM then drove the resident set to 9-18 GB (a 25.6 GB table). So larger arrays are
mapped at page alignment: a read fault maps :data:`READ_FAULT_PAGES`, a write fault
one page, and the resident set stays bounded (see :data:`MAPPED_BYTES_BUDGET`)."""
MAPPED_BYTES_BUDGET = 1024 * 1024 * 1024
"""The default ``map_budget_bytes`` of an array (:meth:`TableStore.open
<storage.store.TableStore.open>` takes another). Pages of the page cache that a map
touches stay mapped, and count in the process's resident set (RssFile), until
unmapped. An array larger than this is read and written in slices, and unmaps its
pages (``MADV_DONTNEED``: on a shared file map the page cache, dirty pages included,
keeps them) whenever the pages its touched rows may have mapped since the last release
(:data:`READ_FAULT_PAGES` per row read) reach this many bytes, so a table larger than
RAM trains with a bounded resident set; later accesses re-map pages with a minor
fault, which costs: warm gathers of a 512 MB array ran at 0.16 M rows/s with a 256 MiB
budget against 4.2 M rows/s mapped whole (bench/storage.py). Such an array is also
mapped at page, not huge-page, alignment (see :data:`MAP_ALIGN_BYTES`), and its chunks' clean pages are dropped from
the page cache when they are mapped (see :meth:`ChunkFiles._map_chunk`)."""
READ_FAULT_PAGES = 16
"""Pages one read fault maps: the kernel's fault-around (64 KiB by default; MADV_RANDOM
does not turn it off on this 6.18 kernel: measured 62-66 KiB of RssFile per random row
read). A write fault maps one page."""
MAX_CHUNKS_PER_ARRAY = 50_000
"""Each chunk is one memory map; Linux allows 65530 per process by default."""
_PROT_NONE = 0
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value


def chunk_layout_problem(chunk_rows: int, row_bytes: int, num_chunks: int) -> str:
    """Why chunks of ``chunk_rows`` rows cannot be mapped side by side ('' if they can)."""
    if num_chunks > 1 and (chunk_rows * row_bytes) % PAGE_BYTES:
        return (f"chunk_rows * row bytes = {chunk_rows * row_bytes} must be a multiple of the "
                f"{PAGE_BYTES}-byte page when the table has more than one chunk (use a power "
                f"of two >= {PAGE_BYTES} rows)")
    if num_chunks > MAX_CHUNKS_PER_ARRAY:
        return f"{num_chunks} chunks is more than {MAX_CHUNKS_PER_ARRAY}; use larger chunks"
    return ""


class _Libc:
    """The few libc calls Python's mmap module lacks (fixed-address maps, mincore)."""

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.mmap = libc.mmap
            self.munmap = libc.munmap
            self.madvise = libc.madvise
            self.mincore = libc.mincore
        except (OSError, AttributeError) as exc:
            raise StoreError("direct row access needs a libc with mmap, madvise and "
                             "mincore (Linux); use zarr's API on this platform") from exc
        self.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long)
        self.mmap.restype = ctypes.c_void_p
        self.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        self.munmap.restype = ctypes.c_int
        self.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self.madvise.restype = ctypes.c_int
        self.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_ubyte))
        self.mincore.restype = ctypes.c_int

    def map(self, address: int | None, size: int, prot: int, flags: int, fd: int) -> int:
        result = self.mmap(address, size, prot, flags, fd, 0)
        if result is None or result == _MAP_FAILED:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mmap failed: {os.strerror(errno)}")
        return int(result)


class ChunkFiles:
    """Row reads and writes on one array's chunk files. Not thread-safe.

    Maps every chunk on first use; :meth:`close` unmaps them (pending writes stay in
    the page cache). Row ids given to any method must already be validated.
    """

    def __init__(self, layout: ArrayLayout, *, writable: bool,
                 map_budget_bytes: int = MAPPED_BYTES_BUDGET) -> None:
        problem = chunk_layout_problem(layout.chunk_rows, layout.row_bytes, layout.num_chunks)
        if problem:
            raise CorruptStoreError(layout.path, f"{problem}; re-import the table")
        self.layout = layout
        self.writable = writable
        self._libc = _Libc()
        self._base = 0
        self._reserved_at = 0
        self._reserved_bytes = 0
        self._rows: np.ndarray | None = None
        self._dirty = np.zeros(layout.num_chunks, dtype=bool)
        self._journaled: np.ndarray | None = None  # one bit per row
        self._page = (ctypes.c_ubyte * 1)()
        self._touched_pages = 0
        """Upper bound of the pages mapped since the last :meth:`release`."""
        self._release_pages = (map_budget_bytes // PAGE_BYTES
                               if layout.num_chunks * layout.chunk_bytes > map_budget_bytes
                               else 0)
        rows = layout.chunk_rows
        self._shift = rows.bit_length() - 1 if rows & (rows - 1) == 0 else -1

    # ---- mapping ------------------------------------------------------------------
    @property
    def rows(self) -> np.ndarray:
        """All rows (num_chunks * chunk_rows, width), backed by the chunk files."""
        return self._ensure_mapped()

    def _ensure_mapped(self) -> np.ndarray:
        if self._rows is None:
            self._rows = self._map_all()
        return self._rows

    def _map_all(self) -> np.ndarray:
        layout = self.layout
        chunk_bytes = layout.chunk_bytes
        total = -(-layout.num_chunks * chunk_bytes // PAGE_BYTES) * PAGE_BYTES
        libc = self._libc
        align = PAGE_BYTES if self._release_pages else MAP_ALIGN_BYTES
        reserved = total + align
        self._reserved_at = libc.map(None, reserved, _PROT_NONE,
                                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1)
        self._reserved_bytes = reserved
        self._base = -(-self._reserved_at // align) * align
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            for chunk in range(layout.num_chunks):
                self._map_chunk(chunk, prot)
            if libc.madvise(self._base, total, mmap.MADV_RANDOM) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_RANDOM) failed")
        except BaseException:
            self._unmap()
            raise
        buffer = (ctypes.c_char * (layout.num_chunks * chunk_bytes)).from_address(self._base)
        view = np.frombuffer(buffer, dtype=layout.dtype_str).reshape(
            layout.num_chunks * layout.chunk_rows, layout.width)
        view.flags.writeable = self.writable
        return view

    def _map_chunk(self, chunk: int, prot: int) -> None:
        layout = self.layout
        address = self._base + chunk * layout.chunk_bytes
        path = layout.chunk_path(chunk)
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if not self.writable:  # reads see the fill value, as through zarr
                self._libc.map(address, layout.chunk_bytes, mmap.PROT_READ | mmap.PROT_WRITE,
                               mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1)
                if layout.fill_value != 0:
                    fill = (ctypes.c_char * layout.chunk_bytes).from_address(address)
                    np.frombuffer(fill, dtype=layout.dtype_str)[:] = layout.fill_value
                return
            self._materialize(chunk)
            fd = os.open(path, flags)
        try:
            if self._release_pages:
                # Drop the chunk's clean pages: bulk writes (the table's creation) leave
                # it in the page cache as large folios (up to 2 MiB), and a row written
                # through the map dirties its whole folio: measured here, 51 KB (1 GB
                # table) to 2 MiB (25.6 GB) written back per row instead of one 4 KiB
                # page. Pages read back later come in as single pages.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            size = os.fstat(fd).st_size
            if size != layout.chunk_bytes:
                raise CorruptStoreError(path, f"chunk file has {size} bytes, expected "
                                              f"{layout.chunk_bytes}; restore the store from a "
                                              f"backup")
            self._libc.map(address, layout.chunk_bytes, prot, mmap.MAP_SHARED | _MAP_FIXED, fd)
        finally:
            os.close(fd)

    def _materialize(self, chunk: int) -> None:
        """Create a missing chunk file holding the fill value (what zarr reads for it).

        Semantically a no-op, so it needs no journal record: written to a temporary
        name, fsynced, renamed into place, directories fsynced.
        """
        layout = self.layout
        path = layout.chunk_path(chunk)
        path.parent.mkdir(parents=True, exist_ok=True)

        def fill(fd: int) -> None:
            if layout.fill_value != 0:
                write_all(fd, np.full((layout.chunk_rows, layout.width), layout.fill_value,
                                      dtype=layout.dtype_str).tobytes())
            else:
                os.posix_fallocate(fd, 0, layout.chunk_bytes)

        replace_atomic(path, fill, suffix=".partial")  # fsyncs path.parent
        for directory in (path.parent.parent, layout.path):
            fsync_dir(directory)

    def _unmap(self) -> None:
        if self._reserved_at:
            self._libc.munmap(self._reserved_at, self._reserved_bytes)
            self._reserved_at = self._base = 0

    def close(self) -> None:
        """Unmap the chunks. The caller must hold no view of :attr:`rows`."""
        self._rows = None
        self._unmap()

    # ---- reads ----------------------------------------------------------------------
    def read(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Copy rows ``ids`` (int64) into ``out`` (C-contiguous, (len(ids), width))."""
        if ids.size == 0:
            return
        rows = self.rows
        if self._sample_is_cold(ids):
            self._advise(ids)
        if not self._release_pages:
            np.take(rows, ids, axis=0, out=out, mode="clip")  # ids are validated; no buffering
            return
        step = self._slice_rows(READ_FAULT_PAGES)
        for start in range(0, ids.size, step):  # release between slices: bounded RSS
            part = slice(start, start + step)
            np.take(rows, ids[part], axis=0, out=out[part], mode="clip")
            self._touched(ids[part].size, READ_FAULT_PAGES)

    def _pages_per_row(self, fault_pages: int) -> int:
        """Upper bound of the pages that touching one row maps."""
        return -(-self.layout.row_bytes // PAGE_BYTES) + fault_pages

    def _slice_rows(self, fault_pages: int) -> int:
        """Rows per slice of a large array's read or write: half the budget's pages."""
        return max(1, self._release_pages // (2 * self._pages_per_row(fault_pages)))

    def _touched(self, rows: int, fault_pages: int) -> None:
        self._touched_pages += rows * self._pages_per_row(fault_pages)
        if self._touched_pages >= self._release_pages:
            self.release()

    def release(self) -> None:
        """Unmap every page of the map from this process (the page cache keeps them, dirty
        ones included: the map is shared); the resident set shrinks, data is unchanged."""
        if self._rows is not None and self._base:
            size = self.layout.num_chunks * self.layout.chunk_bytes
            if self._libc.madvise(self._base, size, mmap.MADV_DONTNEED) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")
        self._touched_pages = 0

    def prefetch(self, ids: np.ndarray) -> None:
        """Ask the kernel to read the pages of rows ``ids`` in the background."""
        if ids.size:
            self._ensure_mapped()
            self._advise(ids)

    def _sample_is_cold(self, ids: np.ndarray) -> bool:
        """Whether any of a few evenly spaced rows of ``ids`` is not in the page cache."""
        count = min(ids.size, RESIDENCY_SAMPLE_ROWS)
        positions = np.linspace(0, ids.size - 1, count).astype(np.int64)
        offsets = (ids[positions] * self.layout.row_bytes) & ~(PAGE_BYTES - 1)
        mincore, page, base = self._libc.mincore, self._page, self._base
        for offset in offsets.tolist():
            if mincore(base + offset, PAGE_BYTES, page) != 0:
                return False  # cannot tell; the read itself still works
            if not page[0] & 1:
                return True
        return False

    def _advise(self, ids: np.ndarray) -> None:
        """MADV_WILLNEED on the pages of every row of ``ids`` (one call per row)."""
        row_bytes = self.layout.row_bytes
        first = ids * row_bytes
        page = first & ~(PAGE_BYTES - 1)
        lengths = (first + row_bytes - page).tolist()
        madvise, base, willneed = self._libc.madvise, self._base, mmap.MADV_WILLNEED
        for offset, size in zip(page.tolist(), lengths):
            madvise(base + offset, size, willneed)

    # ---- writes ---------------------------------------------------------------------
    def write(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` to row ``ids[i]``; ids must be unique."""
        if ids.size == 0:
            return
        if not self._release_pages:
            self.rows[ids] = values
        else:
            rows, step = self.rows, self._slice_rows(1)
            for start in range(0, ids.size, step):
                part = slice(start, start + step)
                rows[ids[part]] = values[part]
                self._touched(ids[part].size, 1)
        self._dirty[self._chunk_of(ids)] = True

    def dirty_paths(self) -> list[Path]:
        """Chunk files written since :meth:`clear_dirty` (to be fsynced by the caller)."""
        return [self.layout.chunk_path(int(c)) for c in np.flatnonzero(self._dirty)]

    def clear_dirty(self) -> None:
        self._dirty[:] = False

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty.any())

    def _chunk_of(self, ids: np.ndarray) -> np.ndarray:
        if self._shift >= 0:
            return ids >> self._shift
        return ids // self.layout.chunk_rows

    # ---- which rows the undo journal already holds ------------------------------------
    def unjournaled(self, ids: np.ndarray) -> np.ndarray:
        """Mask of ``ids`` whose old bytes are not yet in the journal."""
        if self._journaled is None:
            return np.ones(ids.size, dtype=bool)
        bits = self._journaled[ids >> 3] >> (ids & 7).astype(np.uint8)
        return (bits & 1) == 0

    def mark_journaled(self, ids: np.ndarray) -> None:
        if self._journaled is None:
            self._journaled = np.zeros(-(-self.layout.num_rows // 8), dtype=np.uint8)
        np.bitwise_or.at(self._journaled, ids >> 3,
                         np.left_shift(1, ids & 7).astype(np.uint8))

    def forget_journaled(self) -> None:
        self._journaled = None


def sync_files(paths: list[Path], pool: ThreadPoolExecutor | None) -> None:
    """fdatasync ``paths`` (chunk sizes never change, so mtime need not be durable).

    With a pool the calls overlap, and the device merges their cache flushes: 24
    files take ~2-15 ms instead of ~90 ms one after another on this machine's disk.
    """
    if pool is None or len(paths) < 2:
        for path in paths:
            fdatasync_file(path)
    else:
        for _ in pool.map(fdatasync_file, paths):
            pass

