"""An agent's persisted state: one small JSON document per kind of record, replaced atomically on every change.

A save writes a temporary file, fsyncs it, renames it over the old one and fsyncs the directory, so a crash
leaves either the old or the new document, never a torn one. Concurrent saves share one write (group commit):
a caller returns once a write that began after its call is on disk. What happens to a document that cannot be
read is each daemon's decision, stated where it builds its StateFile (`Damaged`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import Invalid

log = logging.getLogger("oma.statefile")

T = TypeVar("T")

VERSION = 1


class Damaged(enum.Enum):
    """What to do with a document that cannot be read."""

    #: Stop: the daemon refuses to start and an operator decides (its children keep running meanwhile).
    REFUSE = "refuse"
    #: Move it aside as `<name>.damaged` and start empty; reconciliation then cleans up what it finds.
    MOVE_ASIDE = "move_aside"


class _Batch:
    """One write to come, and the callers whose changes it carries."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting = 0  # callers not yet back from save()
        self.drained = asyncio.Event()  # set when waiting drops to 0 after the write

    def leave(self) -> None:
        self.waiting -= 1
        if self.waiting == 0 and self.done.done():
            self.drained.set()


class StateFile:
    """A list of JSON objects of one kind in `path`, e.g. leases.json: `{"kind", "version", "items"}`.

    `legacy_key` names the list in an older document of this kind written without "kind"/"items" (read, and
    replaced by the current form at the next save). `sync_directory=False` skips the fsync of the directory
    after the rename: a power cut may then leave the previous document (whole, never torn); only for a
    document whose every item is void after a power cut anyway (say why where it is built).
    """

    def __init__(self, path: Path, kind: str, *, damaged: Damaged, legacy_key: str | None = None,
                 sync_directory: bool = True) -> None:
        self.path = path
        self.kind = kind
        self.damaged = damaged
        self.legacy_key = legacy_key
        self.sync_directory = sync_directory
        self.writes = 0  # documents written by this process (tests and benchmarks count them)
        self._next: _Batch | None = None  # the write not begun yet: a change made now joins it
        self._snapshot: Callable[[], list[dict[str, Any]]] | None = None
        self._writer: asyncio.Task[None] | None = None

    def load(self) -> list[dict[str, Any]]:
        """The saved items, [] when there is no file yet (blocking read of a small file: start-up only)."""
        return self.load_as(dict)

    def load_as(self, convert: Callable[[dict[str, Any]], T]) -> list[T]:
        """The saved items built with `convert` (e.g. a record's from_dict); an item it cannot build makes
        the document damaged, like a malformed one."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            return [convert(item) for item in self._parse(text)]
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            if self.damaged is Damaged.MOVE_ASIDE:
                aside = self.path.with_name(self.path.name + ".damaged")
                log.error("cannot read %s (%s); moved to %s, starting with no %s", self.path, exc, aside, self.kind)
                os.replace(self.path, aside)
                return []
            raise Invalid(f"cannot read the state file {self.path}",
                          f"{exc}; move it aside to start with no {self.kind} (their processes are reconciled "
                          f"as orphans)") from exc

    def _parse(self, text: str) -> list[dict[str, Any]]:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError(f"not a {self.kind} document")
        if int(doc.get("version", 0)) > VERSION:
            raise ValueError(f"version {doc['version']} is newer than this daemon's ({VERSION})")
        if self.legacy_key is not None and "kind" not in doc and isinstance(doc.get(self.legacy_key), list):
            items = doc[self.legacy_key]
        elif doc.get("kind") == self.kind and isinstance(doc.get("items"), list):
            items = doc["items"]
        else:
            raise ValueError(f"not a {self.kind} document")
        return [dict(item) for item in items]

    async def save(self, snapshot: Callable[[], list[dict[str, Any]]]) -> None:
        """Make the caller's change (already made in memory) durable: returns once a write whose `snapshot()`
        was taken after this call is on disk; raises what that write raised.

        Callers that save while a write is under way share the next one; `snapshot` is the current state
        whoever passes it (the latest caller's is used). One write at a time, in order, so the document never
        goes backwards. A cancelled caller stops waiting; the write it joined still happens.
        """
        batch = self._next
        if batch is None:
            batch = self._next = _Batch()
        self._snapshot = snapshot
        batch.waiting += 1
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_batches(), name=f"save {self.path.name}")
        try:
            await asyncio.shield(batch.done)
        finally:
            batch.leave()

    async def _write_batches(self) -> None:
        """The one writer: takes the pending batch's snapshot, writes it, wakes its callers, and again while
        changes arrived meanwhile. Not cancelled by callers (shielded), so no two writes ever overlap."""
        try:
            while (batch := self._next) is not None:
                snapshot, self._snapshot, self._next = self._snapshot, None, None
                assert snapshot is not None
                try:
                    doc = {"kind": self.kind, "version": VERSION, "items": snapshot()}
                    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
                    await asyncio.to_thread(write_atomically, self.path, text, sync_directory=self.sync_directory)
                except Exception as exc:
                    batch.done.set_exception(exc)
                    # Let each of its callers undo its change before the next snapshot is taken, so no later
                    # write persists a change whose caller was told it failed.
                    if batch.waiting:
                        await batch.drained.wait()
                else:
                    self.writes += 1
                    batch.done.set_result(None)
        except asyncio.CancelledError:  # the loop is shutting down: nobody waits for durability any more
            for left in (batch, self._next):
                if left is not None and not left.done.done():
                    left.done.cancel()
            raise
        finally:
            self._writer = None


def write_atomically(path: Path, text: str, mode: int = 0o600, *, sync_directory: bool = True) -> None:
    """Replace `path` with `text`: temporary file, fsync, rename, fsync of the directory (unless told not to:
    a power cut may then undo the rename and leave the previous file, whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if not sync_directory:
        return
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)  # the rename itself must survive a power cut
    finally:
        os.close(dfd)
