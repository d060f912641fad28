"""Restore mounts as omad sees them: a row per mount, restore-mounter as the truth about what is mounted.

A mount whose attachment died under it (its qemu-storage-daemon or qemu-nbd killed) is `broken`. restore-mounter
says so, with the cause; omad records it in the mount's row (status `broken`, the cause in error_message) as soon
as any answer tells it: the mounts or one mount read from restore-mounter, a file operation's 503 `mount_broken`,
restore-mounter's health report. From then on the row is the answer, also across restarts: the mount is listed
and shown `broken` with the way back (DELETE /restore/{id}, which removes all of it and ends the row, then POST
/restore/mount again), and its file operations answer 503 `mount_broken` without asking restore-mounter.
A broken mount is held (restore-mounter keeps its slot until DELETE or idle expiry) but no longer active.

A `mounting` row belongs to the POST /restore/mount making it, which ends it (mounted, or failed also when
cancelled); reads that bring the rows in line leave it alone, since restore-mounter may not have been reached
yet. One left by an omad that died mid-mount ends at the next start-up (reconcile).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from oma_common import schema
from oma_common.contracts.restore_mounter import ArchiveQuery, CleanupStatus, Entry, Listing, ListQuery, Resources
from oma_common.contracts.restore_mounter import Mount as AgentMount
from oma_common.errors import CALLS_OUT, Conflict, NotFound, OmaError, Unavailable
from oma_common.schema import spec

from ..audit import Audit
from ..clients.restore_mounter import OpenFile, RestoreMounter
from ..store import restore_mounts as store
from ..store.db import STORAGE_ERRORS, Database, utcnow
from ..store.restore_mounts import Mount, Mounted, MountStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskImage:
    """The file restore-mounter should attach for one disk of one backup."""

    path: str
    backup_status: str


class MountBroken(Unavailable):
    """What serves the mount died; unmount it and mount the backup again."""

    code = "mount_broken"


@dataclass(frozen=True)
class RestoreMount:
    """A restore mount: omad's record of it, with what restore-mounter says of it now when it was asked."""

    mount_id: str
    backup_id: str
    disk_index: int
    mount_path: str | None
    nbd_device: str | None
    filesystem_type: str | None
    created_at: str
    expires_at: str | None
    ended_at: str | None
    status: MountStatus = spec(description="broken: what served the mount died (`error` says what); its file "
                                           "operations answer 503 mount_broken until it is unmounted (`remount`)")
    filesystems: list[dict[str, Any]] = spec(description="each partition and what was mounted from it, as "
                                                         "restore-mounter reported them when mounting")
    error: str | None = spec(description="why the mount failed or is broken")
    remount: dict[str, Any] | None = spec(description="when broken: the way back (unmount, then mount again)")
    last_activity_at: str | None = spec(description="restore-mounter's, when it was asked")
    in_use: bool | None = spec(description="a download or archive holds it now (restore-mounter's)")
    active_operations: int | None = spec(description="restore-mounter's count of running file operations")


@dataclass(frozen=True)
class RestoreMountList:
    mounts: list[RestoreMount]
    count: int


def remount(m: Mount) -> dict[str, Any]:
    """The way back from a broken mount: unmount it (everything goes), then mount the same disk again."""
    return {"unmount": {"method": "DELETE", "path": f"/api/v1/restore/{m.id}"},
            "mount": {"method": "POST", "path": "/api/v1/restore/mount",
                      "body": {"backup_id": m.backup_id, "disk_index": m.disk_index}}}


def broken(m: Mount, cause: str) -> MountBroken:
    """restore-mounter's `mount_broken`, told in this API's terms."""
    return MountBroken("restore mount broken",
                       f"restore mount {m.id} is broken: {cause}. Unmount it (DELETE /api/v1/restore/{m.id}) and "
                       f"mount the backup again (POST /api/v1/restore/mount)",
                       mount_id=m.id, cause=cause, remount=remount(m))


class BackupImages(Protocol):
    """Where a backup's disk lives; raises NotFound for an unknown backup or disk."""

    async def image_for(self, backup_id: str, disk_index: int) -> DiskImage: ...


def _view(m: Mount, agent: AgentMount | None = None) -> RestoreMount:
    """The row as the API shows it; restore-mounter's answer adds what only it knows (expiry, activity)."""
    live = agent if agent is not None and m.held else None
    return RestoreMount(
        mount_id=m.id, backup_id=m.backup_id, disk_index=m.disk_index, status=m.status, mount_path=m.mount_path,
        nbd_device=m.device, filesystem_type=m.filesystem_type, filesystems=m.filesystems, created_at=m.created_at,
        expires_at=live.expires_at if live else m.expires_at, ended_at=m.ended_at, error=m.error_message,
        remount=remount(m) if m.status == MountStatus.BROKEN else None,
        last_activity_at=live.last_activity_at if live else None, in_use=live.in_use if live else None,
        active_operations=live.active_operations if live else None)


class RestoreService:
    def __init__(self, db: Database, audit: Audit, mounter: RestoreMounter, images: BackupImages) -> None:
        self.db = db
        self.audit = audit
        self.mounter = mounter
        self.images = images

    async def mount(self, backup_id: str, disk_index: int, actor: str) -> RestoreMount:
        image = await self.images.image_for(backup_id, disk_index)
        if image.backup_status != "completed":
            raise Conflict("backup not restorable yet",
                           f"backup {backup_id} is {image.backup_status}; only a completed backup can be mounted")
        mount_id = f"rm-{secrets.token_hex(8)}"
        async with self.db.transaction() as tx:
            await store.start(tx, mount_id, backup_id=backup_id, disk_index=disk_index, image_path=image.path,
                              actor=actor, now=utcnow())
        try:
            m = await self.mounter.mount(image.path, mount_id)
        except OmaError as e:
            if isinstance(e, CALLS_OUT):  # no answer heard (timed out, cut off): it may have made the mount
                await self._abandoned(mount_id, str(e))
            else:  # refused: restore-mounter made nothing
                async with self.db.transaction() as tx:
                    await store.fail(tx, mount_id, str(e), utcnow())
            await self.audit.record(actor, "restore.mount", f"backup:{backup_id}", outcome="failed",
                                    disk_index=disk_index, error=str(e))
            raise
        except BaseException as e:  # cancelled (the client went away, omad stops) or a bug: the row ends too
            await self._abandoned(mount_id, f"the mount was abandoned half-way ({type(e).__name__})")
            raise
        try:
            async with self.db.transaction() as tx:
                recorded = await store.mark_mounted(tx, mount_id, Mounted(
                    m.mount_path, m.device, m.filesystem_type, schema.to_dict(m.filesystems), m.expires_at))
        except BaseException as e:  # made but not recorded (cancelled, the database failed): it goes, the row ends
            await self._abandoned(mount_id, f"the mount was made but not recorded ({type(e).__name__})")
            raise
        if not recorded:  # unmounted while restore-mounter was making it: what it made goes too
            with contextlib.suppress(OmaError):
                await self.mounter.unmount(mount_id, force=True)
            raise Conflict("mount ended", f"restore mount {mount_id} was unmounted while it was being made")
        await self.audit.record(actor, "restore.mount", f"backup:{backup_id}", mount_id=mount_id,
                                disk_index=disk_index)
        return _view(await self._learn(await store.get(self.db, mount_id), m), m)

    async def _abandoned(self, mount_id: str, reason: str) -> None:
        """A mount whose POST did not hear restore-mounter's answer: its row fails, and what restore-mounter may
        have made of it goes (best effort: what is left is unrecorded, so the next start-up removes it). The mount
        goes also when the row cannot be ended (the database refusing writes: the next start-up ends it)."""
        try:
            async with self.db.transaction() as tx:
                await store.fail(tx, mount_id, reason, utcnow())
        except STORAGE_ERRORS as e:  # the caller's own error is the one to answer
            log.warning("restore mount abandoned (%s) but its row not ended: %s", reason, e,
                        extra={"resource": mount_id})
        finally:
            with contextlib.suppress(OmaError):
                await self.mounter.unmount(mount_id, force=True)

    async def _held(self, mount_id: str) -> Mount:
        m = await store.get(self.db, mount_id)
        if not m.held:
            raise NotFound("mount not active", f"restore mount {mount_id} is {m.status}")
        return m

    async def _usable(self, mount_id: str) -> Mount:
        """A held mount whose files can be read: a broken one answers 503 mount_broken from its row."""
        m = await self._held(mount_id)
        if m.status == MountStatus.BROKEN:
            raise broken(m, m.error_message or "restore-mounter reported it broken")
        return m

    async def _broke(self, m: Mount, cause: str) -> Mount:
        """restore-mounter says the mount is broken: its row says so from now on (logged once, when it changes)."""
        if m.status == MountStatus.MOUNTED:
            async with self.db.transaction() as tx:
                changed = await store.mark_broken(tx, m.id, cause)
            if changed:
                log.warning("restore mount broken: %s", cause, extra={"resource": m.id})
            return await store.get(self.db, m.id)
        return m

    async def _learn(self, m: Mount, agent: AgentMount | None) -> Mount:
        """A held row brought in line with restore-mounter's answer about it (None: it holds no such mount).
        A `mounting` row is left to the POST /restore/mount making it: restore-mounter may not have been
        reached yet, and that call ends the row either way (mounted or failed)."""
        if m.status == MountStatus.MOUNTING:
            return m
        if agent is None:
            async with self.db.transaction() as tx:
                expired = await store.expire(tx, m.id, utcnow())
            if expired:
                log.info("restore mount ended by restore-mounter (idle expiry)", extra={"resource": m.id})
            return await store.get(self.db, m.id)
        if agent.status == "broken":
            return await self._broke(m, agent.error or "restore-mounter reports it broken")
        return m

    @contextlib.asynccontextmanager
    async def _told(self, m: Mount) -> AsyncIterator[None]:
        """restore-mounter's `mount_broken` for a file operation: recorded, and told in this API's terms."""
        try:
            yield
        except OmaError as e:
            if e.code != MountBroken.code:
                raise
            cause = str(e.extra.get("cause") or e.details)
            await self._broke(m, cause)
            raise broken(m, cause) from e

    async def unmount(self, mount_id: str, actor: str, force: bool = False) -> dict[str, Any]:
        """Also the way back from a broken mount: restore-mounter removes all that is left of it."""
        m = await self._held(mount_id)
        try:
            await self.mounter.unmount(mount_id, force=force)
        except NotFound:
            pass  # already gone (expired between our reads): the row catches up below
        async with self.db.transaction() as tx:
            await store.mark_unmounted(tx, mount_id, utcnow())
        await self.audit.record(actor, "restore.unmount", f"mount:{mount_id}", force=force, was=m.status.value)
        return {"message": "backup unmounted successfully", "mount_id": mount_id}

    async def sync(self) -> dict[str, AgentMount]:
        """Bring the rows in line with restore-mounter (ended, broken); returns its mounts by id."""
        agent = {a.mount_id: a for a in await self.mounter.mounts()}
        for m in await store.held(self.db):
            await self._learn(m, agent.get(m.id))
        return agent

    async def start(self) -> None:
        """A background service only in that it reconciles once at start-up."""
        await self.reconcile()

    async def stop(self) -> None:
        """Mounts outlive omad: restore-mounter holds them and expires them when idle."""

    async def reconcile(self) -> None:
        """At start-up: rows of mounts restore-mounter no longer holds end, those it calls broken say so; its
        mounts we never recorded go."""
        try:
            agent = await self.sync()
        except OmaError as e:
            log.warning("restore mounts not reconciled: %s", e)
            return
        # No POST /restore/mount runs yet: a `mounting` row is one a previous omad died making. It ends here;
        # restore-mounter's mount of it, if it made one, is removed below as unrecorded.
        for m in await store.held(self.db):
            if m.status == MountStatus.MOUNTING:
                async with self.db.transaction() as tx:
                    await store.fail(tx, m.id, "omad stopped while mounting it; mount the backup again", utcnow())
                log.warning("restore mount left half-made by a previous omad ended", extra={"resource": m.id})
        known = {m.id for m in await store.held(self.db)}
        for mount_id in {m for m in agent if m.startswith("rm-")} - known:
            with contextlib.suppress(OmaError):
                await self.mounter.unmount(mount_id, force=True)
                log.warning("removed a restore mount omad has no record of", extra={"resource": mount_id})

    async def health_seen(self, components: Mapping[str, Mapping[str, Any]]) -> None:
        """restore-mounter's health report names its broken mounts: the rows that still say mounted learn it."""
        report = components.get("restore-mounter") or {}
        causes = {b["mount_id"]: str(b.get("error") or "restore-mounter reports it broken")
                  for b in report.get("broken_mounts") or () if isinstance(b, Mapping) and "mount_id" in b}
        if causes:
            for m in await store.held(self.db):
                if m.id in causes:
                    await self._broke(m, causes[m.id])

    async def mounts(self) -> RestoreMountList:
        agent = await self.sync()
        items = [_view(m, agent.get(m.id)) for m in await store.held(self.db)]
        return RestoreMountList(items, len(items))

    async def mount_state(self, mount_id: str) -> RestoreMount:
        """One mount, held or ended; a held one is checked with restore-mounter first."""
        m = await store.get(self.db, mount_id)
        if not m.held:
            return _view(m)
        try:
            agent: AgentMount | None = await self.mounter.state(mount_id)
        except NotFound:
            agent = None
        return _view(await self._learn(m, agent), agent)

    async def files(self, mount_id: str, query: ListQuery) -> Listing:
        m = await self._usable(mount_id)
        async with self._told(m):
            return await self.mounter.files(mount_id, query)

    async def file_info(self, mount_id: str, path: str) -> Entry:
        m = await self._usable(mount_id)
        async with self._told(m):
            return await self.mounter.file_info(mount_id, path)

    @contextlib.asynccontextmanager
    async def open_file(self, mount_id: str, path: str) -> AsyncIterator[OpenFile]:
        """The file's read-only descriptor from restore-mounter, for omad to send (never read) itself."""
        m = await self._usable(mount_id)
        async with self._told(m), self.mounter.open_file(mount_id, path) as f:
            yield f

    @contextlib.asynccontextmanager
    async def archive(self, mount_id: str, query: ArchiveQuery) -> AsyncIterator[aiohttp.ClientResponse]:
        """restore-mounter's archive of a directory, to be relayed as it arrives."""
        m = await self._usable(mount_id)
        async with self._told(m), self.mounter.archive(mount_id, query) as resp:
            yield resp

    async def resources(self) -> Resources:
        return await self.mounter.resources()

    async def cleanup_status(self) -> CleanupStatus:
        return await self.mounter.cleanup_status()
