"""Restore mounts as omad sees them: a row per mount, restore-mounter as the truth about what is mounted."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from oma_common import schema
from oma_common.contracts.restore_mounter import ArchiveQuery, CleanupStatus, Entry, Listing, ListQuery, Resources
from oma_common.errors import Conflict, NotFound, OmaError

from ..audit import Audit
from ..clients.restore_mounter import OpenFile, RestoreMounter
from ..store.db import Database, utcnow

log = logging.getLogger(__name__)

ACTIVE = ("mounting", "mounted")


@dataclass(frozen=True)
class DiskImage:
    """The file restore-mounter should attach for one disk of one backup."""

    path: str
    backup_status: str


class BackupImages(Protocol):
    """Where a backup's disk lives; raises NotFound for an unknown backup or disk."""

    async def image_for(self, backup_id: str, disk_index: int) -> DiskImage: ...


def _public(row: dict[str, Any], agent: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec's mount shape, plus what restore-mounter knows now."""
    out = {
        "mount_id": row["id"], "backup_id": row["backup_id"], "disk_index": row["disk_index"],
        "mount_path": row["mount_path"], "nbd_device": row["device"], "filesystem_type": row["filesystem_type"],
        "status": row["status"], "created_at": row["created_at"], "expires_at": row["expires_at"],
        "filesystems": json.loads(row["filesystems"] or "[]"),
    }
    if row.get("error_message"):
        out["error"] = row["error_message"]
    if agent:
        out.update(expires_at=agent.get("expires_at"), last_activity_at=agent.get("last_activity_at"),
                   in_use=agent.get("in_use"), active_operations=agent.get("active_operations"))
    return out


class RestoreService:
    def __init__(self, db: Database, audit: Audit, mounter: RestoreMounter, images: BackupImages) -> None:
        self.db = db
        self.audit = audit
        self.mounter = mounter
        self.images = images

    async def mount(self, backup_id: str, disk_index: int, actor: str) -> dict[str, Any]:
        image = await self.images.image_for(backup_id, disk_index)
        if image.backup_status != "completed":
            raise Conflict("backup not restorable yet",
                           f"backup {backup_id} is {image.backup_status}; only a completed backup can be mounted")
        mount_id = f"rm-{secrets.token_hex(8)}"
        await self.db.execute("INSERT INTO restore_mounts (id, backup_id, disk_index, image_path, status, created_by,"
                              " created_at) VALUES (?, ?, ?, ?, 'mounting', ?, ?)",
                              (mount_id, backup_id, disk_index, image.path, actor, utcnow()))
        try:
            m = schema.to_dict(await self.mounter.mount(image.path, mount_id))
        except OmaError as e:
            await self.db.execute("UPDATE restore_mounts SET status = 'failed', error_message = ?, ended_at = ? "
                                  "WHERE id = ?", (str(e), utcnow(), mount_id))
            await self.audit.record(actor, "restore.mount", f"backup:{backup_id}", outcome="failed",
                                    disk_index=disk_index, error=str(e))
            raise
        await self.db.execute(
            "UPDATE restore_mounts SET status = 'mounted', mount_path = ?, device = ?, filesystem_type = ?, "
            "filesystems = ?, expires_at = ? WHERE id = ?",
            (m.get("mount_path"), m.get("device"), m.get("filesystem_type"), json.dumps(m.get("filesystems", [])),
             m.get("expires_at"), mount_id))
        await self.audit.record(actor, "restore.mount", f"backup:{backup_id}", mount_id=mount_id,
                                disk_index=disk_index)
        return _public(await self._row(mount_id), m)

    async def _row(self, mount_id: str) -> dict[str, Any]:
        row = await self.db.fetchone("SELECT * FROM restore_mounts WHERE id = ?", (mount_id,))
        if row is None:
            raise NotFound("mount not found", f"restore mount {mount_id} does not exist")
        return row

    async def _active(self, mount_id: str) -> dict[str, Any]:
        row = await self._row(mount_id)
        if row["status"] not in ACTIVE:
            raise NotFound("mount not active", f"restore mount {mount_id} is {row['status']}")
        return row

    async def unmount(self, mount_id: str, actor: str, force: bool = False) -> dict[str, Any]:
        await self._active(mount_id)
        try:
            await self.mounter.unmount(mount_id, force=force)
        except NotFound:
            pass  # already gone (expired between our reads): the row catches up below
        await self.db.execute("UPDATE restore_mounts SET status = 'unmounted', ended_at = ? WHERE id = ?",
                              (utcnow(), mount_id))
        await self.audit.record(actor, "restore.unmount", f"mount:{mount_id}", force=force)
        return {"message": "backup unmounted successfully", "mount_id": mount_id}

    async def sync(self) -> dict[str, dict[str, Any]]:
        """Bring the rows in line with restore-mounter; returns its mounts by id."""
        agent = {m.mount_id: schema.to_dict(m) for m in await self.mounter.mounts()}
        rows = await self.db.fetchall("SELECT id FROM restore_mounts WHERE status IN ('mounting', 'mounted')")
        for r in rows:
            if r["id"] not in agent:
                await self.db.execute("UPDATE restore_mounts SET status = 'expired', ended_at = ? WHERE id = ? "
                                      "AND status IN ('mounting', 'mounted')", (utcnow(), r["id"]))
                log.info("restore mount ended by restore-mounter (idle expiry)", extra={"resource": r["id"]})
        return agent

    async def start(self) -> None:
        """A background service only in that it reconciles once at start-up."""
        await self.reconcile()

    async def stop(self) -> None:
        """Mounts outlive omad: restore-mounter holds them and expires them when idle."""

    async def reconcile(self) -> None:
        """At start-up: rows of mounts restore-mounter no longer holds end; its mounts we never recorded go."""
        try:
            agent = await self.sync()
        except OmaError as e:
            log.warning("restore mounts not reconciled: %s", e)
            return
        known = {r["id"] for r in await self.db.fetchall("SELECT id FROM restore_mounts WHERE status = 'mounted'")}
        for mount_id in {m for m in agent if m.startswith("rm-")} - known:
            with contextlib.suppress(OmaError):
                await self.mounter.unmount(mount_id, force=True)
                log.warning("removed a restore mount omad has no record of", extra={"resource": mount_id})

    async def mounts(self) -> dict[str, Any]:
        agent = await self.sync()
        rows = await self.db.fetchall("SELECT * FROM restore_mounts WHERE status IN ('mounting', 'mounted') "
                                      "ORDER BY created_at")
        items = [_public(r, agent.get(r["id"])) for r in rows]
        return {"mounts": items, "count": len(items)}

    async def files(self, mount_id: str, query: ListQuery) -> Listing:
        await self._active(mount_id)
        return await self.mounter.files(mount_id, query)

    async def file_info(self, mount_id: str, path: str) -> Entry:
        await self._active(mount_id)
        return await self.mounter.file_info(mount_id, path)

    @contextlib.asynccontextmanager
    async def open_file(self, mount_id: str, path: str) -> AsyncIterator[OpenFile]:
        """The file's read-only descriptor from restore-mounter, for omad to send (never read) itself."""
        await self._active(mount_id)
        async with self.mounter.open_file(mount_id, path) as f:
            yield f

    @contextlib.asynccontextmanager
    async def archive(self, mount_id: str, query: ArchiveQuery) -> AsyncIterator[aiohttp.ClientResponse]:
        """restore-mounter's archive of a directory, to be relayed as it arrives."""
        await self._active(mount_id)
        async with self.mounter.archive(mount_id, query) as resp:
            yield resp

    async def resources(self) -> Resources:
        return await self.mounter.resources()

    async def cleanup_status(self) -> CleanupStatus:
        return await self.mounter.cleanup_status()
