"""Progress bars shared by the CLIs (tqdm on stderr, silent when it is not a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def bytes_progress(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done_bytes, total_bytes)`` callback drawing a byte-count bar."""
    with tqdm(total=None, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
              disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        yield progress
