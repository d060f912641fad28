"""omad's record of each restore mount (restore_mounts); restore-mounter holds the mount itself."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any

from .base import Reader, get_or_404, record
from .db import Writer

# The only writers of restore_mounts.status (tests/omad/test_store_rules.py holds us to it).
TRANSITIONS = ("start", "mark_mounted", "fail", "mark_broken", "mark_unmounted", "expire")


class MountStatus(enum.StrEnum):
    MOUNTING = "mounting"
    MOUNTED = "mounted"
    BROKEN = "broken"  # what served it died (error_message says what); held until DELETE or idle expiry
    UNMOUNTED = "unmounted"
    EXPIRED = "expired"
    FAILED = "failed"


# Not ended: restore-mounter holds (or is making) the mount, so it is listed, can be unmounted and can expire.
HELD = (MountStatus.MOUNTING, MountStatus.MOUNTED, MountStatus.BROKEN)
# Held and usable: its files can be read. A broken mount is held but not active.
ACTIVE = (MountStatus.MOUNTING, MountStatus.MOUNTED)


@dataclasses.dataclass(frozen=True)
class Mount:
    id: str  # also restore-mounter's mount_id
    backup_id: str
    disk_index: int
    image_path: str
    status: MountStatus
    mount_path: str | None
    device: str | None
    filesystem_type: str | None
    filesystems: list[Any]  # as restore-mounter reported them
    error_message: str | None
    created_by: str
    created_at: str
    expires_at: str | None
    ended_at: str | None

    @property
    def held(self) -> bool:
        return self.status in HELD

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclasses.dataclass(frozen=True)
class Mounted:
    """What restore-mounter answered when it mounted the image."""

    mount_path: str | None
    device: str | None
    filesystem_type: str | None
    filesystems: list[Any]
    expires_at: str | None


def _mount(row: Mapping[str, Any]) -> Mount:
    return record(Mount, {**row, "status": MountStatus(row["status"]),
                          "filesystems": json.loads(row["filesystems"] or "[]")})


async def get(db: Reader, mount_id: str) -> Mount:
    return _mount(await get_or_404(db, "SELECT * FROM restore_mounts WHERE id = ?", (mount_id,), what="mount",
                                   ident=mount_id))


async def held(db: Reader) -> list[Mount]:
    """Mounts being made, mounted or broken (not ended), oldest first."""
    rows = await db.fetchall("SELECT * FROM restore_mounts WHERE status IN (?, ?, ?) ORDER BY created_at", HELD)
    return [_mount(r) for r in rows]


# -- transitions ---------------------------------------------------------------------------------------------

async def start(tx: Writer, mount_id: str, *, backup_id: str, disk_index: int, image_path: str, actor: str,
                now: str) -> None:
    """Recorded before restore-mounter is asked, so a mount it makes is never unknown to omad."""
    await tx.execute("INSERT INTO restore_mounts (id, backup_id, disk_index, image_path, status, created_by,"
                     " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (mount_id, backup_id, disk_index, image_path, MountStatus.MOUNTING.value, actor, now))


async def mark_mounted(tx: Writer, mount_id: str, m: Mounted) -> bool:
    """restore-mounter made the mount; False when the row had left `mounting` meanwhile (unmounted)."""
    changed = await tx.execute("UPDATE restore_mounts SET status = ?, mount_path = ?, device = ?, "
                               "filesystem_type = ?, filesystems = ?, expires_at = ? WHERE id = ? AND status = ?",
                               (MountStatus.MOUNTED.value, m.mount_path, m.device, m.filesystem_type,
                                json.dumps(m.filesystems), m.expires_at, mount_id, MountStatus.MOUNTING.value))
    return changed > 0


async def fail(tx: Writer, mount_id: str, reason: str, now: str) -> bool:
    """restore-mounter refused the mount; False when the row had left `mounting` meanwhile."""
    changed = await tx.execute("UPDATE restore_mounts SET status = ?, error_message = ?, ended_at = ? "
                               "WHERE id = ? AND status = ?",
                               (MountStatus.FAILED.value, reason, now, mount_id, MountStatus.MOUNTING.value))
    return changed > 0


async def mark_broken(tx: Writer, mount_id: str, cause: str) -> bool:
    """restore-mounter says what serves the mount died (`cause`: which process, how it ended); False unless the
    row was `mounted` (already broken, or ended meanwhile). Not an end: the mount is held until unmounted."""
    changed = await tx.execute("UPDATE restore_mounts SET status = ?, error_message = ? WHERE id = ? AND status = ?",
                               (MountStatus.BROKEN.value, cause, mount_id, MountStatus.MOUNTED.value))
    return changed > 0


async def mark_unmounted(tx: Writer, mount_id: str, now: str) -> bool:
    """False when the mount had ended already (expired meanwhile)."""
    changed = await tx.execute("UPDATE restore_mounts SET status = ?, ended_at = ? WHERE id = ? "
                               "AND status IN (?, ?, ?)", (MountStatus.UNMOUNTED.value, now, mount_id, *HELD))
    return changed > 0


async def expire(tx: Writer, mount_id: str, now: str) -> bool:
    """restore-mounter no longer holds the mount (idle expiry); False when it had ended already."""
    changed = await tx.execute("UPDATE restore_mounts SET status = ?, ended_at = ? WHERE id = ? "
                               "AND status IN (?, ?, ?)", (MountStatus.EXPIRED.value, now, mount_id, *HELD))
    return changed > 0
