"""Restore mounts as omad sees them: a row per mount, restore-mounter as the truth about what is mounted."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from oma_common.errors import Conflict, NotFound, OmaError
from oma_common.rpc import AgentClient

from ..audit import Audit
from ..store import restore_mounts as store
from ..store.db import Database, utcnow
from ..store.restore_mounts import Mount, MountStatus, Mounted

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DiskImage:
    """The file restore-mounter should attach for one disk of one backup."""

    path: str
    backup_status: str


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
    return out


class RestoreService:
    def __init__(self, db: Database, audit: Audit, mounter: AgentClient, images: BackupImages) -> None:
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
            m = await self.mounter.call("POST", "/mounts", json={"image": image.path, "mount_id": mount_id},
                                        timeout=120)
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
            await self.mounter.call("DELETE", f"/mounts/{quote(mount_id, safe='')}",
                                    params={"force": "true" if force else "false"}, timeout=120)
        except NotFound:
            pass  # already gone (expired between our reads): the row catches up below
        async with self.db.transaction() as tx:
            await store.mark_unmounted(tx, mount_id, utcnow())
        await self.audit.record(actor, "restore.unmount", f"mount:{mount_id}", force=force)
        return {"message": "backup unmounted successfully", "mount_id": mount_id}

    async def sync(self) -> dict[str, dict[str, Any]]:
        """Bring the rows in line with restore-mounter; returns its mounts by id."""
        agent = {m["mount_id"]: m for m in (await self.mounter.call("GET", "/mounts"))["mounts"]}
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
                await self.mounter.call("DELETE", f"/mounts/{quote(mount_id, safe='')}", params={"force": "true"})
                log.warning("removed a restore mount omad has no record of", extra={"resource": mount_id})

    async def mounts(self) -> dict[str, Any]:
        agent = await self.sync()
        items = [_public(m, agent.get(m.id)) for m in await store.active(self.db)]
        return {"mounts": items, "count": len(items)}

    async def files(self, mount_id: str, **query: Any) -> dict[str, Any]:
        await self._active(mount_id)
        params = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in query.items() if v is not None}
        out = await self.mounter.call("GET", f"/mounts/{quote(mount_id, safe='')}/files", params=params)
        return out  # type: ignore[no-any-return]

    async def file_info(self, mount_id: str, path: str) -> dict[str, Any]:
        await self._active(mount_id)
        return await self.mounter.call("GET", f"/mounts/{quote(mount_id, safe='')}/file-info",  # type: ignore[no-any-return]
                                       params={"path": path})

    @contextlib.asynccontextmanager
    async def stream(self, mount_id: str, what: str, params: dict[str, str],
                     headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        """restore-mounter's download or archive response, to be relayed as it arrives."""
        await self._active(mount_id)
        async with self.mounter.open("GET", f"/mounts/{quote(mount_id, safe='')}/{what}", params=params,
                                     headers=headers, stream=True, timeout=300, pass_status=(416,)) as resp:
            yield resp

    async def resources(self) -> dict[str, Any]:
        return await self.mounter.call("GET", "/resources")  # type: ignore[no-any-return]

    async def cleanup_status(self) -> dict[str, Any]:
        return await self.mounter.call("GET", "/cleanup-status")  # type: ignore[no-any-return]
