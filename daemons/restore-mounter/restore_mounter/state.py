"""The mounts' persistent record: one small JSON file, replaced atomically (write, fsync, rename, fsync dir)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from .records import MountRecord

log = logging.getLogger(__name__)

VERSION = 1


class StateFile:
    """Saves every record on each change (a few dozen at most); writes are serialised and off the loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    def load(self) -> list[MountRecord]:
        """The records of the previous run; a damaged file is kept aside and reads as empty (reconciliation
        then removes whatever it finds under the mount root)."""
        try:
            data = json.loads(self.path.read_text())
            return [MountRecord.from_dict(m) for m in data.get("mounts", [])]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            aside = self.path.with_suffix(".damaged")
            log.error("cannot read %s (%s); moved to %s, starting with no mounts", self.path, e, aside)
            os.replace(self.path, aside)
            return []

    async def save(self, records: list[MountRecord]) -> None:
        text = json.dumps({"version": VERSION, "mounts": [r.to_dict() for r in records]}, indent=1)
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(None, self._write, text)

    def _write(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
