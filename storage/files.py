"""Durable file operations of the store, written once: fsync of files and directories,
and atomic replacement of a file (temporary file, fsync, ``os.replace``, fsync of the
directory).

A file replaced atomically is written first to ``.<name>.<random hex><suffix>`` beside
it (:func:`temporaries` finds the ones a writer that died left behind), so a crash
leaves either the old file or the new one, never a part of it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMPORARY_SUFFIX = ".tmp"
"""Default suffix of the temporary file of :func:`write_atomic`."""


def _sync(path: str | os.PathLike[str], flags: int, sync: Callable[[int], None]) -> None:
    fd = os.open(path, flags)
    try:
        sync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    _sync(path, os.O_RDONLY | os.O_DIRECTORY, os.fsync)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file's data and metadata."""
    _sync(path, os.O_RDONLY, os.fsync)


def fdatasync_file(path: str | os.PathLike[str]) -> None:
    """fdatasync a file: its data (and its size), not its timestamps."""
    _sync(path, os.O_RDONLY, os.fdatasync)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` at ``fd``'s position (``os.write`` may write less)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (``os.pwrite`` may write less)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def replace_atomic(path: Path, fill: Callable[[int], None], *,
                   suffix: str = TEMPORARY_SUFFIX) -> None:
    """Atomically replace (or create) ``path`` with what ``fill(fd)`` writes to a new
    temporary file beside it: fsynced, renamed over ``path``, the directory fsynced.
    A failure leaves ``path`` as it was (and may leave the temporary, see
    :func:`temporaries`)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fill(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, *, suffix: str = TEMPORARY_SUFFIX) -> None:
    """Atomically replace (or create) ``path`` with ``data`` (see :func:`replace_atomic`)."""
    replace_atomic(path, lambda fd: write_all(fd, data), suffix=suffix)


def write_json_atomic(path: Path, doc: Any, *, suffix: str = TEMPORARY_SUFFIX) -> None:
    """Atomically replace (or create) ``path`` with ``doc`` as compact UTF-8 JSON
    (``json.dumps`` defaults)."""
    write_atomic(path, json.dumps(doc).encode("utf-8"), suffix=suffix)


def read_json(path: Path) -> Any:
    """The JSON document in ``path``."""
    with open(path, "rb") as f:
        return json.loads(f.read())


def temporaries(path: Path, suffix: str = TEMPORARY_SUFFIX) -> Iterator[Path]:
    """Temporary files of :func:`replace_atomic` for ``path`` that are still there (left
    by a writer that died before renaming them)."""
    return path.parent.glob(f".{path.name}.*{suffix}")
