"""Typed errors of the table store and its row cache (:mod:`storage.cache`).

Every error subclasses :class:`StoreError` and a builtin, so callers can catch
either (``except FileNotFoundError`` still catches a missing store). Messages are
one line: what is wrong, where, and what to do about it.
"""

from __future__ import annotations

import os


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class StoreArgumentError(StoreError, ValueError):
    """An argument that is not about a table or its rows is invalid (mode, step)."""


class StoreClosedError(StoreError, ValueError):
    """The store handle was closed (like I/O on a closed file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: store is closed; open it again with TableStore.open")


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at ``path`` (no directory, or no zarr group in it)."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "") -> None:
        self.path = str(path)
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"no table store at {self.path}{extra}; create one with TableStore.create(path)"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class StoreExistsError(StoreError, FileExistsError):
    """``create`` found something at ``path`` and was not told to overwrite it."""

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {detail}")

    def __str__(self) -> str:
        return str(self.args[0])


class FormatVersionError(StoreError, ValueError):
    """The store was written in another format version (or is not a table store).

    ``found`` is ``None`` when the zarr group carries no table-store attribute.
    """

    def __init__(self, path: str | os.PathLike[str], found: int | None, expected: int) -> None:
        self.path = str(path)
        self.found = found
        self.expected = expected
        if found is None:
            msg = (f"{self.path} is a zarr group but not a table store (no "
                   f"'dlrm_toolkit_store' attribute; this version reads format {expected}); "
                   f"create a store with TableStore.create")
        else:
            msg = (f"{self.path} has store format version {found}, this version reads "
                   f"format {expected}; use the toolkit version that wrote it or re-import "
                   f"the tables into a new store")
        super().__init__(msg)


class MissingArrayError(StoreError, KeyError):
    """A table, or one of its arrays (weights, optimizer state), is not in the store."""

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {detail}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TableExistsError(StoreError, FileExistsError):
    """``add_table`` was given the name of a table that is already in the store."""

    def __init__(self, path: str | os.PathLike[str], name: str) -> None:
        self.path = str(path)
        self.name = name
        super().__init__(f"{self.path}: table {name!r} already exists; pick another name "
                         f"or create a new store")

    def __str__(self) -> str:
        return str(self.args[0])


class TableSpecError(StoreError, ValueError):
    """An argument describing a table (name, rows, dim, dtype, init, ...) is invalid."""

    def __init__(self, name: str, field: str, problem: str) -> None:
        self.name = name
        self.field = field
        super().__init__(f"table {name!r}: {field}: {problem}")


class RowShapeError(StoreError, ValueError):
    """Ids or rows given to gather/scatter have the wrong shape or dtype."""

    def __init__(self, table: str, problem: str) -> None:
        self.table = table
        super().__init__(f"table {table!r}: {problem}")


class RowIndexError(StoreError, IndexError):
    """A row id is outside ``[0, num_rows)``."""

    def __init__(self, table: str, row_id: int, num_rows: int) -> None:
        self.table = table
        self.row_id = row_id
        self.num_rows = num_rows
        super().__init__(f"table {table!r}: row id {row_id} is out of range for "
                         f"{num_rows} rows; ids must lie in [0, {num_rows})")


class ReadOnlyStoreError(StoreError, PermissionError):
    """A write was attempted on a store opened with ``mode="r"``."""

    def __init__(self, path: str | os.PathLike[str], operation: str) -> None:
        self.path = str(path)
        self.operation = operation
        super().__init__(f"{self.path} is open read-only; {operation} needs "
                         f"TableStore.open(path, mode='r+')")

    def __str__(self) -> str:
        return str(self.args[0])


class StoreLockedError(StoreError, BlockingIOError):
    """Another open handle (this or another process) conflicts with the requested mode.

    Writers lock the store exclusively; readers share a lock.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str) -> None:
        self.path = str(path)
        self.mode = mode
        super().__init__(f"{self.path} cannot be opened with mode={mode!r}: it is open for "
                         f"{'reading or writing' if mode == 'r+' else 'writing'} elsewhere; "
                         f"close the other handle (or wait for its process to end)")

    def __str__(self) -> str:
        return str(self.args[0])


class RecoveryRequiredError(StoreError, RuntimeError):
    """A read-only open found a checkpoint that a crashed writer left unfinished: in
    doubt (prepared, undecided) or committed with its rows not yet all applied."""

    def __init__(self, path: str | os.PathLike[str], step: int | None) -> None:
        self.path = str(path)
        self.step = step
        at = "its creation" if step is None else f"checkpoint step {step}"
        super().__init__(f"{self.path} holds a checkpoint after {at} that a writer did "
                         f"not finish; open it once with mode='r+' to settle it (a committed "
                         f"one is finished, an undecided one waits for its coordinator)")


class CorruptStoreError(StoreError, OSError):
    """Store files are inconsistent in a way that recovery cannot repair."""

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {detail}")

    def __str__(self) -> str:
        return str(self.args[0])


class CacheArgumentError(StoreError, ValueError):
    """An argument of :class:`~storage.cache.RowCache` is invalid (slots, policy,
    profile, index, learning rate, or an optimizer the cache was not built for)."""


class CacheWriteError(StoreError, OSError):
    """A background write-back of the row cache failed: rows evicted from the cache
    were not written.

    The store still guarantees that reopening it with ``mode="r+"`` gives its last
    checkpoint (rows written since then wait in redo segments that a reopen discards);
    build a new cache after that.
    """
