"""Checks of the paths given on the command line, made before any work.

Output files may lie in directories that do not exist yet: they are created when
the file is written (and the CLI says so), never before, so a failed command
leaves nothing behind. Everything else that would make the write fail (a directory
where a file should be, a read-only file or directory, a file where a directory
should be) is a :class:`~cli.errors.UsageError` naming the flag.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from cli.errors import UsageError


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _check_writable_parent(path: Path, flag: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    ancestor = _nearest_existing(parent.absolute())
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in directory {ancestor} "
                         f"(permission denied or read-only)")


def check_output_file(path: str | os.PathLike[str], flag: str) -> None:
    """``path`` can be written as a file: it is not a directory nor read-only, and its
    directory exists and is writable, or can be created."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {target}: is a directory; give a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {target}: the file is read-only")
    _check_writable_parent(target, flag)


def check_output_dir(path: str | os.PathLike[str], flag: str) -> None:
    """``path`` is a writable directory, or can be created as one."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"{flag} {target}: is a file, not a directory")
        if not os.access(target, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {target}: the directory is read-only")
        return
    _check_writable_parent(target, flag)


def check_input_file(path: str | os.PathLike[str], flag: str) -> None:
    """``path`` is an existing, readable file."""
    target = Path(path)
    if not target.exists():
        raise UsageError(f"{flag} {target}: no such file")
    if target.is_dir():
        raise UsageError(f"{flag} {target}: is a directory, not a file")
    if not os.access(target, os.R_OK):
        raise UsageError(f"{flag} {target}: permission denied")


def make_parents(path: str | os.PathLike[str],
                 say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> None:
    """Create the missing directories above ``path`` and say which."""
    parent = Path(path).parent
    if str(parent) and not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
        say(f"created directory {parent}")


def write_output(path: str | os.PathLike[str], flag: str,
                 write: Callable[[str | os.PathLike[str]], None],
                 say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
                 ) -> None:
    """``write(path)`` after creating the missing directories above ``path`` (saying
    so); a failing write becomes a :class:`UsageError` naming ``flag``."""
    try:
        make_parents(path, say)
        write(path)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise UsageError(f"{flag} {path}: cannot write: {reason}") from exc
