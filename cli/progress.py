"""Progress shared by the CLIs (tqdm on stderr, silent when it is not a terminal): a
failing command leaves only its error line, on a terminal as in a log."""

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


@contextmanager
def status_line(quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A ``say(line)`` callback showing the latest line of a long search in one line of
    the terminal, erased at the end (nothing when ``quiet`` or not a terminal)."""
    with tqdm(total=None, bar_format="{desc}", file=sys.stderr, leave=False,
              disable=True if quiet else None) as bar:
        yield bar.set_description_str
