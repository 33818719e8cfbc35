"""Checkpoint markers: what makes checkpoints crash-safe, over the redo segments of
:mod:`storage.redo`.

Protocol (one writer; every step is ordered by fsync):

1. Between checkpoints, ``scatter`` writes rows to the arrays' redo segments only
   (no sync); the chunk files keep the last checkpoint's rows. A crash at any instant
   loses those rows and nothing else: the segments of the active generation are
   discarded on open, unread (so damage to them cannot change any row).
2. ``checkpoint(step)`` = seal + commit + apply: every written segment is synced
   and sealed (slot count, CRC-32C); the marker ``{"step", "generation": g + 1,
   "apply": [seals]}`` is written to a temporary file, fsynced, ``os.replace``-d over
   ``checkpoint.json``, the directory fsynced: that replace is the commit point. Then
   the rows are applied to the chunk files, those fsynced, the block checksums
   (:mod:`storage.sums`) of the changed blocks replaced, and the marker rewritten
   without ``apply``. One sync of each file a checkpoint touches; none per step.
3. Open for writing: a marker that still lists ``apply`` is a committed checkpoint
   whose rows may be partly applied: every listed segment is checked against its seal
   (present, of this store and generation, long enough, CRC-32C over header and
   slots) and applied again (idempotent); a segment that fails is refused with
   :class:`CorruptStoreError`, never skipped.

Two-phase commit (a checkpoint shared with other stores or files, decided by a
coordinator): ``prepare(step)`` seals the segments and writes ``prepared.json``
``{"step", "generation": g + 1, "apply": [seals]}`` the same atomic way; the store is
then *in doubt*: writes are refused, reads see the prepared rows, and neither opening
nor closing it decides anything. The coordinator then either commits (the marker with
``apply`` is written, which is the commit point, then the rows applied as above and
``prepared.json`` removed) or aborts (``prepared.json`` removed; the chunk files never
held the rows). On open, a ``prepared.json`` whose generation is not the active one
is a leftover of a commit that completed and is removed; one of the active
generation has its segments checked against their seals.

Every marker carries the store's id (segments of another store are refused) and a
CRC-32C of its own fields (a marker whose bits changed is refused).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c

from storage.errors import CorruptStoreError
from storage.files import fsync_dir, temporaries, write_json_atomic
from storage.layout import FORMAT_VERSION
from storage.redo import SegmentSeal


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint marker: the last completed checkpoint (``checkpoint.json``) or a
    prepared one (``prepared.json``)."""

    step: int | None
    """The step (None before the first checkpoint)."""
    generation: int
    """Generation it committed; the active (uncommitted) one is ``generation + 1``."""
    store_id: str = ""
    """Id of the store (hex), written at creation ("" for stores made before ids)."""
    apply: tuple[SegmentSeal, ...] | None = None
    """Sealed segments whose rows are not yet applied to the chunk files (None: none)."""


def _fields(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "step": checkpoint.step,
            "generation": checkpoint.generation, "store_id": checkpoint.store_id,
            "apply": None if checkpoint.apply is None
            else [seal.to_json() for seal in checkpoint.apply]}


def _crc(fields: dict[str, Any]) -> int:
    return int(google_crc32c.value(json.dumps(fields, sort_keys=True).encode("utf-8")))


def read_checkpoint(txn_dir: Path, marker_name: str) -> Checkpoint:
    path = txn_dir / marker_name
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
        step = doc["step"]
        apply = doc.get("apply")
        checkpoint = Checkpoint(
            step=None if step is None else int(step), generation=int(doc["generation"]),
            store_id=str(doc.get("store_id", "")),
            apply=None if apply is None else tuple(SegmentSeal.from_json(s) for s in apply))
        if "crc" in doc:
            fields = {k: v for k, v in doc.items() if k != "crc"}
            if doc["crc"] != _crc(fields):
                raise ValueError("its CRC-32C does not match its content")
        elif "store_id" in doc:  # written with ids, so with a CRC too
            raise ValueError("its CRC-32C is missing")
        return checkpoint
    except FileNotFoundError as exc:
        raise CorruptStoreError(path, "checkpoint marker is missing; restore the store from a "
                                      "backup") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptStoreError(path, f"checkpoint marker is damaged ({exc}); restore "
                                      f"the store from a backup") from exc


def write_checkpoint(txn_dir: Path, marker_name: str, checkpoint: Checkpoint) -> None:
    """Atomically replace the marker (temporary file, fsync, rename, fsync directory)."""
    fields = _fields(checkpoint)
    write_json_atomic(txn_dir / marker_name, {**fields, "crc": _crc(fields)})


def read_prepared(txn_dir: Path, name: str) -> Checkpoint | None:
    """The prepared (in-doubt) checkpoint recorded in ``name``; None when absent."""
    if not (txn_dir / name).exists():
        return None
    return read_checkpoint(txn_dir, name)


def remove_marker(txn_dir: Path, name: str) -> None:
    """Delete marker ``name`` (if present) durably."""
    try:
        os.unlink(txn_dir / name)
    except FileNotFoundError:
        return
    fsync_dir(txn_dir)


def stale_temporaries(txn_dir: Path, marker_name: str) -> list[Path]:
    """Marker temporaries left by a writer that died before renaming them."""
    return list(temporaries(txn_dir / marker_name))
