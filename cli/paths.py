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


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_not_inputs(outputs: dict[str, str | os.PathLike[str] | None],
                     inputs: dict[str, str | os.PathLike[str] | None]) -> None:
    """No output (flag -> path) resolves to an input (symbolic and hard links
    followed), nor two outputs to one file: a :class:`UsageError` naming both flags,
    before any work, so that no input is ever overwritten. None values are skipped."""
    given_out = [(flag, Path(path)) for flag, path in outputs.items() if path is not None]
    given_in = [(flag, Path(path)) for flag, path in inputs.items() if path is not None]
    for number, (flag, path) in enumerate(given_out):
        for in_flag, in_path in given_in:
            if _same(path, in_path):
                raise UsageError(f"{flag} {path} is also the input {in_flag}: writing it "
                                 f"would destroy that input; give another file name")
        for other_flag, other in given_out[number + 1:]:
            if _same(path, other):
                raise UsageError(f"{flag} and {other_flag} are both {path}: give each "
                                 f"output its own file")
