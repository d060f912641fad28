"""The mounts' persistent record: oma_common's StateFile of MountRecords.

A damaged document is moved aside (`mounts.json.damaged`) and reads as empty: reconciliation then removes
whatever it finds under the mount root. (nbd-pool decides the other way: its exports keep serving, so it
refuses to start.) A document written before the shared StateFile (`{"version", "mounts"}`) is still read.
"""

from __future__ import annotations

from pathlib import Path

from oma_common.statefile import Damaged, StateFile

from .records import MountRecord


class MountsFile:
    """Saves every record on each change (a few dozen at most); writes are serialised and off the loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = StateFile(path, "mounts", damaged=Damaged.MOVE_ASIDE, legacy_key="mounts")

    def load(self) -> list[MountRecord]:
        return self._file.load_as(MountRecord.from_dict)

    async def save(self, records: list[MountRecord]) -> None:
        await self._file.save(lambda: [r.to_dict() for r in records])
