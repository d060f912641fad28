"""What the VMA's backup client tells us while a backup runs: telemetry, each disk's completion, and the
change id to continue from.

A backup completes when its last disk does: its exports are stopped and ports freed (the images are then
closed, nothing writes into them any more), each image is measured and checked, and the change ids become
the base of the next incremental. Telemetry with status "failed" fails the backup and undoes it.
"""

from __future__ import annotations

import asyncio

import dataclasses
import logging
import os
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound, OmaError
from oma_common.web import now_rfc3339

from ..adapters.localfs import LocalFs
from ..adapters.qemu_img import QemuImg
from ..config import BackupConfig
from ..inventory.contexts import Contexts
from ..jobs.engine import JobEngine
from ..jobs.locks import KeyedLocks
from ..store import backups as store
from ..store.db import STORAGE_ERRORS, Database, utcnow
from .teardown import Teardown, job_ended, lock_key

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DiskProgress:
    disk_index: int
    bytes_transferred: int = 0
    total_bytes: int = 0
    status: str = ""
    progress_percent: float = 0.0


@dataclasses.dataclass
class Telemetry:
    """The backup client's progress report (CONTRACTS.md "Backups"); unknown fields are ignored."""

    status: str = "running"
    job_id: str = ""
    job_type: str = ""
    current_phase: str = ""
    bytes_transferred: int = 0
    total_bytes: int = 0
    transfer_speed_bps: int = 0
    eta_seconds: int | None = None
    progress_percent: float = 0.0
    disks: list[DiskProgress] = dataclasses.field(default_factory=list)
    error: dict[str, Any] | None = None
    timestamp: str = ""


class Completion:
    def __init__(self, db: Database, jobs: JobEngine, locks: KeyedLocks, contexts: Contexts, qemu_img: QemuImg,
                 fs: LocalFs, teardown: Teardown, cfg: BackupConfig) -> None:
        self.db = db
        self.jobs = jobs
        self.locks = locks
        self.contexts = contexts
        self.qemu_img = qemu_img
        self.fs = fs
        self.teardown = teardown
        self.cfg = cfg
        # Called with the backup's id once it is completed (immutability locks, immediate copy rules).
        self.on_completed: list[Callable[[str], Awaitable[None]]] = []
        self._checksums: set[asyncio.Future[None]] = set()

    # -- completion ----------------------------------------------------------------------------------

    async def complete_disk(self, backup_id: str, disk_index: int, change_id: str,
                            bytes_transferred: int) -> dict[str, Any]:
        async with self.locks.hold(lock_key(backup_id), wait=True):  # disks completing at once queue here
            backup = await store.get(self.db, backup_id)
            if backup.status == store.BackupStatus.FAILED:
                raise Conflict("backup failed", f"backup {backup_id} failed ({backup.error_message}); its images "
                                                "were removed")
            disk = await store.disk(self.db, backup_id, disk_index)
            if disk is None:
                _, count = await store.disk_counts(self.db, backup_id)
                raise Invalid("no such disk", f"backup {backup_id} has disks 0..{count - 1}, not {disk_index}")
            if disk.status == store.DiskStatus.COMPLETED:
                if disk.change_id != change_id:
                    raise Conflict("disk already completed", f"disk {disk_index} of {backup_id} was completed with "
                                                             f"change id {disk.change_id!r}")
                return await self._answer(backup_id, disk_index, change_id, "already recorded")
            async with self.db.transaction() as tx:
                left = await store.complete_disk(tx, backup_id, disk_index, change_id=change_id,
                                                 bytes_transferred=bytes_transferred, now=utcnow())
            log.info("disk %d completed (change id %s, %d bytes)", disk_index, change_id, bytes_transferred,
                     extra={"resource": backup_id})
            if left == 0:
                await self._finish(backup_id)
            return await self._answer(backup_id, disk_index, change_id, "")

    async def finish_if_done(self, backup_id: str) -> bool:
        """Close an active backup whose every disk is completed (omad died while closing it); False otherwise."""
        async with self.locks.hold(lock_key(backup_id), wait=True):
            if await store.status_of(self.db, backup_id) not in store.ACTIVE:
                return False
            done, total = await store.disk_counts(self.db, backup_id)
            if total == 0 or done < total:
                return False
            await self._finish(backup_id)
            return True

    async def _finish(self, backup_id: str) -> None:
        """The last disk is in: close the exports, measure and check the images, record the backup."""
        await self.teardown.release(backup_id)
        root = Path((await store.get(self.db, backup_id)).root_path)
        disks = await store.disks(self.db, backup_id)
        sizes: dict[int, int] = {}
        paths: dict[int, Path] = {}
        for d in disks:
            path = root / d.qcow2_path
            try:
                info = await self.qemu_img.info(path, force_share=True)
                if self.cfg.check_images:
                    check = await self.qemu_img.check(path, force_share=True)
                    if not check.ok:
                        raise Invalid("image corrupt", f"qemu-img check found {check.corruptions} corruption(s) "
                                                       f"in {path}")
            except OmaError as e:
                await self.teardown.fail_locked(backup_id, f"the written image of disk {d.disk_index} is "
                                                           f"unusable: {e}")
                return
            sizes[d.disk_index] = info.actual_size
            paths[d.disk_index] = path
            if await self.fs.owner(path) != os.geteuid():
                # qemu-nbd (root) writes into the file omad created; it must stay omad's to be removed later.
                log.warning("%s is not owned by omad's user any more", path, extra={"resource": backup_id})
        try:
            async with self.db.transaction() as tx:
                now = utcnow()
                sent = sum(d.bytes_transferred for d in disks)
                await store.complete(tx, backup_id, sizes=sizes, bytes_transferred=sent, now=now)
                await self.jobs.finish(backup_id, "completed", tx=tx)
                await job_ended(tx, await store.get(tx, backup_id), succeeded=True, reason=None, now=now)
        except STORAGE_ERRORS as e:
            # Every disk is in and the exports are closed: closed once the database takes writes again (a
            # completion the VMA sends again finds its disk recorded and would not close it).
            self.jobs.settle_later(backup_id, e, lambda: self.finish_if_done(backup_id))
            raise
        log.info("backup completed: %d image(s), %d bytes stored", len(sizes), sum(sizes.values()),
                 extra={"resource": backup_id})
        for hook in self.on_completed:
            try:
                await hook(backup_id)
            except Exception:  # noqa: BLE001 - the backup is recorded; a hook's failure is its own
                log.exception("after-completion step failed", extra={"resource": backup_id})
        # The reference checksums read every byte written (minutes for a large disk): not inside the VMA's
        # /complete call. Verification records any that a stop of omad left missing.
        task = asyncio.ensure_future(self._record_checksums(backup_id, paths))
        self._checksums.add(task)
        task.add_done_callback(self._checksums.discard)

    async def _record_checksums(self, backup_id: str, paths: dict[int, Path]) -> None:
        """What verification and copies check the images against from now on."""
        for index, path in paths.items():
            try:
                digest = await self.fs.sha256(path, timeout=self.cfg.qemu_img_timeout_seconds * 10)
            except OmaError as e:
                log.warning("no checksum for disk %d yet: %s", index, e, extra={"resource": backup_id})
                continue
            try:
                await store.record_checksum(self.db, backup_id, index, digest)
            except STORAGE_ERRORS as e:  # verification records it later (it was a task's unretrieved exception)
                log.warning("checksum of disk %d not recorded yet: %s", index, e, extra={"resource": backup_id})

    async def settle(self) -> None:
        """Wait for the checksums being recorded (tests, and a clean shutdown)."""
        while self._checksums:
            await asyncio.gather(*list(self._checksums), return_exceptions=True)

    async def _answer(self, backup_id: str, disk_index: int, change_id: str, note: str) -> dict[str, Any]:
        status = await store.status_of(self.db, backup_id)
        done, total = await store.disk_counts(self.db, backup_id)
        if status == store.BackupStatus.COMPLETED:
            message = f"disk {disk_index} recorded; backup completed ({total} disk(s))"
        elif status == store.BackupStatus.FAILED:
            message = f"disk {disk_index} recorded, but the backup failed while it was being closed"
        else:
            message = f"disk {disk_index} recorded; {total - done} of {total} disk(s) still to complete"
        return {"status": "completed", "backup_id": backup_id, "disk_id": disk_index, "change_id": change_id,
                "message": f"{message}{f' ({note})' if note else ''}", "timestamp": now_rfc3339(),
                "backup_status": status, "disks_completed": done, "disks_total": total}

    # -- change ids ----------------------------------------------------------------------------------

    async def change_id(self, vm_name: str, disk_index: int) -> dict[str, Any]:
        """The change id an incremental of this disk continues from (404 when there is none).

        While a backup of the VM runs, the answer is the one that backup's image continues (its parent's),
        so that a VM backed up into several repositories never gets changes relative to another chain; a
        disk that backup copies in full gets a 404, on which the VMA copies in full.
        """
        context = await self.contexts.by_name(vm_name)
        cid = context["context_id"]
        active = await store.active_for_vm(self.db, cid)
        if active is not None:
            disk = await store.disk(self.db, active.backup_id, disk_index)
            if disk is None or not disk.backing_file or not disk.previous_change_id or not active.parent_backup_id:
                raise NotFound("no change id", f"the running backup {active.backup_id} of VM {vm_name!r} "
                                               f"copies disk {disk_index} in full")
            parent = await store.get(self.db, active.parent_backup_id)
            return self._change_id(vm_name, disk_index, disk.previous_change_id, parent)
        found = await store.latest_change_id(self.db, cid, disk_index)
        if found is None:
            raise NotFound("no change id", f"no completed backup of disk {disk_index} of VM {vm_name!r}")
        return self._change_id(vm_name, disk_index, found[1], found[0])

    @staticmethod
    def _change_id(vm_name: str, disk_index: int, change_id: str, backup: store.Backup) -> dict[str, Any]:
        # disk_id as text: the spec's example answer, which the client in the field decodes, has it so.
        return {"vm_name": vm_name, "disk_id": str(disk_index), "change_id": change_id,
                "backup_id": backup.backup_id, "backup_job_id": backup.backup_id,
                "backup_type": backup.backup_type, "completed_at": backup.completed_at}

    # -- telemetry -----------------------------------------------------------------------------------

    async def telemetry(self, job_id: str, report: Telemetry) -> dict[str, Any]:
        status = await store.get_status(self.db, job_id)
        if status not in store.ACTIVE:
            return {"status": "ignored", "job_id": job_id, "message": f"backup {job_id} is {status}"}
        phase = report.current_phase or report.status
        async with self.db.transaction() as tx:
            await store.record_progress(tx, job_id, phase=phase, bytes_transferred=report.bytes_transferred,
                                        total_bytes=report.total_bytes, transfer_speed_bps=report.transfer_speed_bps,
                                        eta_seconds=report.eta_seconds, progress_percent=report.progress_percent,
                                        now=utcnow())
            for d in report.disks:
                await store.record_disk_progress(tx, job_id, d.disk_index, bytes_transferred=d.bytes_transferred,
                                                 total_bytes=d.total_bytes, progress_percent=d.progress_percent)
        await self.jobs.progress(job_id, report.progress_percent, current_step=f"VMA: {phase}")
        if report.status.lower() == "failed":
            said = (report.error or {}).get("message") or "no reason given"
            await self.teardown.fail(job_id, f"the VMA reported the backup failed: {said}")
            return {"status": "failed", "job_id": job_id, "message": "backup marked failed and undone"}
        return {"status": "ok", "job_id": job_id, "message": "progress recorded"}

