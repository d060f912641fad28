"""Restore mounts as omad sees them: a row per mount, restore-mounter as the truth about what is mounted.

A mount whose attachment died under it (its qemu-storage-daemon or qemu-nbd killed) is `broken`: restore-mounter
says so, with the cause, and omad shows it as the mount's status (the row stays `mounted`: the mount and its
resources exist until it is unmounted). Its file operations answer 503 `mount_broken` with the cause and the
way back: DELETE /restore/{id} (which removes all of it), then POST /restore/mount again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from oma_common import schema
from oma_common.contracts.restore_mounter import ArchiveQuery, CleanupStatus, Entry, Listing, ListQuery, Resources
from oma_common.errors import Conflict, NotFound, OmaError, Unavailable

from ..audit import Audit
from ..store import restore_mounts as store
from ..clients.restore_mounter import OpenFile, RestoreMounter
from ..store.db import Database, utcnow
from ..store.restore_mounts import Mount, MountStatus, Mounted

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DiskImage:
    """The file restore-mounter should attach for one disk of one backup."""

    path: str
    backup_status: str


class MountBroken(Unavailable):
    """What serves the mount died; unmount it and mount the backup again."""

    code = "mount_broken"


BROKEN = "broken"  # restore-mounter's status of such a mount, shown as the mount's status


def remount(m: Mount) -> dict[str, Any]:
    """The way back from a broken mount: unmount it (everything goes), then mount the same disk again."""
    return {"unmount": {"method": "DELETE", "path": f"/api/v1/restore/{m.id}"},
            "mount": {"method": "POST", "path": "/api/v1/restore/mount",
                      "body": {"backup_id": m.backup_id, "disk_index": m.disk_index}}}


@contextlib.contextmanager
def explained(m: Mount) -> Iterator[None]:
    """restore-mounter's `mount_broken`, told in this API's terms."""
    try:
        yield
    except OmaError as e:
        if e.code != MountBroken.code:
            raise
        cause = str(e.extra.get("cause") or e.details)
        raise MountBroken("restore mount broken",
                          f"restore mount {m.id} is broken: {cause}. Unmount it (DELETE /api/v1/restore/{m.id}) and "
                          f"mount the backup again (POST /api/v1/restore/mount)",
                          mount_id=m.id, cause=cause, remount=remount(m)) from e


class BackupImages(Protocol):
    """Where a backup's disk lives; raises NotFound for an unknown backup or disk."""

    async def image_for(self, backup_id: str, disk_index: int) -> DiskImage: ...


def _public(m: Mount, agent: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec's mount shape, plus what restore-mounter knows now."""
    out = {
        "mount_id": m.id, "backup_id": m.backup_id, "disk_index": m.disk_index, "mount_path": m.mount_path,
        "nbd_device": m.device, "filesystem_type": m.filesystem_type, "status": m.status, "created_at": m.created_at,
        "expires_at": m.expires_at, "filesystems": m.filesystems,
    }
    if m.error_message:
        out["error"] = m.error_message
    if agent:
        out.update(expires_at=agent.get("expires_at"), last_activity_at=agent.get("last_activity_at"),
                   in_use=agent.get("in_use"), active_operations=agent.get("active_operations"))
        if agent.get("status") == BROKEN:
            out.update(status=BROKEN, error=agent.get("error"), remount=remount(m))
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
        async with self.db.transaction() as tx:
            await store.start(tx, mount_id, backup_id=backup_id, disk_index=disk_index, image_path=image.path,
                              actor=actor, now=utcnow())
        try:
            m = schema.to_dict(await self.mounter.mount(image.path, mount_id))
        except OmaError as e:
            async with self.db.transaction() as tx:
                await store.fail(tx, mount_id, str(e), utcnow())
            await self.audit.record(actor, "restore.mount", f"backup:{backup_id}", outcome="failed",
                                    disk_index=disk_index, error=str(e))
            raise
        async with self.db.transaction() as tx:
            await store.mark_mounted(tx, mount_id, Mounted(m.get("mount_path"), m.get("device"),
                                                           m.get("filesystem_type"), m.get("filesystems", []),
                                                           m.get("expires_at")))
        await self.audit.record(actor, "restore.mount", f"backup:{backup_id}", mount_id=mount_id,
                                disk_index=disk_index)
        return _public(await store.get(self.db, mount_id), m)

    async def _active(self, mount_id: str) -> Mount:
        m = await store.get(self.db, mount_id)
        if not m.active:
            raise NotFound("mount not active", f"restore mount {mount_id} is {m.status}")
        return m

    async def unmount(self, mount_id: str, actor: str, force: bool = False) -> dict[str, Any]:
        await self._active(mount_id)
        try:
            await self.mounter.unmount(mount_id, force=force)
        except NotFound:
            pass  # already gone (expired between our reads): the row catches up below
        async with self.db.transaction() as tx:
            await store.mark_unmounted(tx, mount_id, utcnow())
        await self.audit.record(actor, "restore.unmount", f"mount:{mount_id}", force=force)
        return {"message": "backup unmounted successfully", "mount_id": mount_id}

    async def sync(self) -> dict[str, dict[str, Any]]:
        """Bring the rows in line with restore-mounter; returns its mounts by id."""
        agent = {m.mount_id: schema.to_dict(m) for m in await self.mounter.mounts()}
        for m in await store.active(self.db):
            if m.id not in agent:
                async with self.db.transaction() as tx:
                    await store.expire(tx, m.id, utcnow())
                log.info("restore mount ended by restore-mounter (idle expiry)", extra={"resource": m.id})
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
        known = {m.id for m in await store.active(self.db) if m.status == MountStatus.MOUNTED}
        for mount_id in {m for m in agent if m.startswith("rm-")} - known:
            with contextlib.suppress(OmaError):
                await self.mounter.unmount(mount_id, force=True)
                log.warning("removed a restore mount omad has no record of", extra={"resource": mount_id})

    async def mounts(self) -> dict[str, Any]:
        agent = await self.sync()
        items = [_public(m, agent.get(m.id)) for m in await store.active(self.db)]
        return {"mounts": items, "count": len(items)}

    async def files(self, mount_id: str, query: ListQuery) -> Listing:
        m = await self._active(mount_id)
        with explained(m):
            return await self.mounter.files(mount_id, query)

    async def file_info(self, mount_id: str, path: str) -> Entry:
        m = await self._active(mount_id)
        with explained(m):
            return await self.mounter.file_info(mount_id, path)

    @contextlib.asynccontextmanager
    async def open_file(self, mount_id: str, path: str) -> AsyncIterator[OpenFile]:
        """The file's read-only descriptor from restore-mounter, for omad to send (never read) itself."""
        m = await self._active(mount_id)
        with explained(m):
            async with self.mounter.open_file(mount_id, path) as f:
                yield f

    @contextlib.asynccontextmanager
    async def archive(self, mount_id: str, query: ArchiveQuery) -> AsyncIterator[aiohttp.ClientResponse]:
        """restore-mounter's archive of a directory, to be relayed as it arrives."""
        m = await self._active(mount_id)
        with explained(m):
            async with self.mounter.archive(mount_id, query) as resp:
                yield resp

    async def resources(self) -> Resources:
        return await self.mounter.resources()

    async def cleanup_status(self) -> CleanupStatus:
        return await self.mounter.cleanup_status()
