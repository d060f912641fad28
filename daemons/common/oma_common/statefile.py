"""The agents' persisted state: one small JSON document per kind of record, replaced atomically on every change.

Each domain manager owns one file (nbd-pool's leases, exports, attachments; volume-agent's volumes and the
registry of devices it vouches for) and saves it before it reports a change as done. A save writes a temporary file, fsyncs it, renames it over the old one and fsyncs the directory, so a
crash leaves either the old or the new document, never a torn one. An unreadable document stops the daemon
instead of being replaced: its exports keep running meanwhile, and an operator decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oma_common.errors import Invalid

log = logging.getLogger("oma.statefile")

VERSION = 1


def rfc3339(epoch: float) -> str:
    """Times are stored as epoch seconds and shown as RFC 3339 (CONTRACTS.md)."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class StateFile:
    """A list of JSON objects of one kind in `path`, e.g. leases.json."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self._lock = asyncio.Lock()

    def load(self) -> list[dict[str, Any]]:
        """The saved items, [] when there is no file yet (blocking read of a small file: start-up only)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(text)
            if doc.get("kind") != self.kind or not isinstance(doc.get("items"), list):
                raise ValueError(f"not a {self.kind} document")
            if int(doc.get("version", 0)) > VERSION:
                raise ValueError(f"version {doc['version']} is newer than this program reads ({VERSION})")
            return [dict(item) for item in doc["items"]]
        except (ValueError, TypeError, AttributeError) as exc:
            raise Invalid(f"cannot read the state file {self.path}",
                          f"{exc}; move it aside to start with no {self.kind} (their processes are reconciled "
                          f"as orphans)") from exc

    async def save(self, snapshot: Callable[[], list[dict[str, Any]]]) -> None:
        """Write what `snapshot()` returns; it is called under the file's lock so saves never go backwards."""
        async with self._lock:
            doc = {"kind": self.kind, "version": VERSION, "items": snapshot()}
            await asyncio.to_thread(write_atomically, self.path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text`: a crash leaves the old or the new content, never a torn file."""
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
