"""An agent's persisted state: one small JSON document per kind of record, replaced atomically on every change.

A save writes a temporary file, fsyncs it, renames it over the old one and fsyncs the directory, so a crash
leaves either the old or the new document, never a torn one. What happens to a document that cannot be read
is each daemon's decision, stated where it builds its StateFile (`Damaged`).
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


class StateFile:
    """A list of JSON objects of one kind in `path`, e.g. leases.json: `{"kind", "version", "items"}`.

    `legacy_key` names the list in an older document of this kind written without "kind"/"items" (read, and
    replaced by the current form at the next save).
    """

    def __init__(self, path: Path, kind: str, *, damaged: Damaged, legacy_key: str | None = None) -> None:
        self.path = path
        self.kind = kind
        self.damaged = damaged
        self.legacy_key = legacy_key
        self._lock = asyncio.Lock()

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
        """Write what `snapshot()` returns; it is called under the file's lock so saves never go backwards."""
        async with self._lock:
            doc = {"kind": self.kind, "version": VERSION, "items": snapshot()}
            await asyncio.to_thread(write_atomically, self.path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text`: temporary file, fsync, rename, fsync of the directory."""
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
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)  # the rename itself must survive a power cut
    finally:
        os.close(dfd)
