"""omad's record of each restore mount (restore_mounts); restore-mounter holds the mount itself."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any

from .base import Reader, get_or_404, record
from .db import Tx

# The only writers of restore_mounts.status (tests/omad/test_store_rules.py holds us to it).
TRANSITIONS = ("start", "mark_mounted", "fail", "mark_unmounted", "expire")


class MountStatus(enum.StrEnum):
    MOUNTING = "mounting"
    MOUNTED = "mounted"
    UNMOUNTED = "unmounted"
    EXPIRED = "expired"
    FAILED = "failed"


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


async def active(db: Reader) -> list[Mount]:
    """Mounts being made or held, oldest first."""
    rows = await db.fetchall("SELECT * FROM restore_mounts WHERE status IN (?, ?) ORDER BY created_at", ACTIVE)
    return [_mount(r) for r in rows]


# -- transitions ---------------------------------------------------------------------------------------------

async def start(tx: Tx, mount_id: str, *, backup_id: str, disk_index: int, image_path: str, actor: str,
                now: str) -> None:
    """Recorded before restore-mounter is asked, so a mount it makes is never unknown to omad."""
    await tx.execute("INSERT INTO restore_mounts (id, backup_id, disk_index, image_path, status, created_by,"
                     " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (mount_id, backup_id, disk_index, image_path, MountStatus.MOUNTING.value, actor, now))


async def mark_mounted(tx: Tx, mount_id: str, m: Mounted) -> None:
    await tx.execute("UPDATE restore_mounts SET status = ?, mount_path = ?, device = ?, filesystem_type = ?, "
                     "filesystems = ?, expires_at = ? WHERE id = ?",
                     (MountStatus.MOUNTED.value, m.mount_path, m.device, m.filesystem_type,
                      json.dumps(m.filesystems), m.expires_at, mount_id))


async def fail(tx: Tx, mount_id: str, reason: str, now: str) -> None:
    await tx.execute("UPDATE restore_mounts SET status = ?, error_message = ?, ended_at = ? WHERE id = ?",
                     (MountStatus.FAILED.value, reason, now, mount_id))


async def mark_unmounted(tx: Tx, mount_id: str, now: str) -> None:
    await tx.execute("UPDATE restore_mounts SET status = ?, ended_at = ? WHERE id = ?",
                     (MountStatus.UNMOUNTED.value, now, mount_id))


async def expire(tx: Tx, mount_id: str, now: str) -> bool:
    """restore-mounter no longer holds an active mount (idle expiry); False when it had ended already."""
    changed = await tx.execute("UPDATE restore_mounts SET status = ?, ended_at = ? WHERE id = ? AND status IN (?, ?)",
                               (MountStatus.EXPIRED.value, now, mount_id, *ACTIVE))
    return changed > 0
