"""Backups a previous omad left active: re-adopted when they can still complete, undone when they cannot.

omad's death does not end a backup: nbd-pool's qemu-nbd exports survive it (they are nbd-pool's children,
and nbd-pool survives omad), and the VMA keeps writing into them. So at start-up, before omad serves, each
backup the previous omad left `running` is judged:
  - its exports must all be alive: for every disk not yet completed, nbd-pool lists a running export of
    that name, on that disk's port, for this backup (and with the qemu-nbd pid recorded, when one was);
  - its port leases must still be held (renewing them proves it, and restarts their clock);
  - the VMA, when it can be asked (`GET /progress/{backup_id}`), must still know the job and not report it
    failed. A VMA that cannot be reached says nothing either way: the idle watchdog judges later.
A backup that passes is re-adopted: its idle clock restarts now, the VMA's completions and telemetry
arrive as usual, and the watchdog keeps watching it. One whose every disk was already completed (omad died
while closing it) is closed now. Any other — a backup still `pending` (omad died while starting it: the VMA
may never have been asked), or one whose exports or leases are gone, or that the VMA lost — is failed and
undone as every failure is (teardown.py), with the reason.

If nbd-pool cannot be asked at all, the backup is re-adopted as well (with a warning): nbd-pool's
exports outlive its own restarts too, and the watchdog fails the backup once nbd-pool answers and the
backup has been idle for its limit.
"""

from __future__ import annotations

import logging
from typing import Any

from oma_common.errors import NotFound, OmaError

from ..clients.nbdpool import NbdPool
from ..clients.vma import VmaClient
from ..config import BackupConfig
from ..jobs.engine import JobEngine
from ..store import backups as store
from ..store.db import Database, utcnow
from .completion import Completion
from .teardown import Teardown

log = logging.getLogger(__name__)

VMA_QUESTION_SECONDS = 5.0
UNDONE = "its exports were stopped and its images removed"


class Recovery:
    def __init__(self, db: Database, jobs: JobEngine, pool: NbdPool, vma: VmaClient, teardown: Teardown,
                 completion: Completion, cfg: BackupConfig) -> None:
        self.db = db
        self.jobs = jobs
        self.pool = pool
        self.vma = vma
        self.teardown = teardown
        self.completion = completion
        self.cfg = cfg

    async def recover(self, job: dict[str, Any]) -> None:
        """The job engine's recovery of a `backup` job left active (runs before omad serves)."""
        backup_id = job["id"]
        backup = await store.find_one(self.db, backup_id)
        if backup is None:
            await self.jobs.finish(backup_id, "failed", "interrupted: omad restarted (no backup row)")
            return
        if backup.status == store.BackupStatus.RUNNING:
            gone = await self.lost(backup_id)
            if gone is None:
                await self.readopt(backup_id)
                return
            reason = f"interrupted: omad restarted while the backup ran, and {gone}; {UNDONE}"
        elif backup.status == store.BackupStatus.PENDING:
            reason = f"interrupted: omad restarted while the backup was starting; {UNDONE}"
        else:
            # Ended already (the job row lagged behind): make the job agree with the backup.
            await self.jobs.finish(backup_id, str(backup.status))
            return
        if not await self.teardown.fail(backup_id, reason):
            status = await store.status_of(self.db, backup_id)
            await self.jobs.finish(backup_id, str(status))

    async def lost(self, backup_id: str) -> str | None:
        """Why a running backup cannot complete any more, or None when it still can."""
        disks = await store.disks(self.db, backup_id)
        open_disks = [d for d in disks if d.status != store.DiskStatus.COMPLETED]
        if not open_disks:
            return None  # every disk is in: only the closing is left
        try:
            exports = await self.pool.exports()
        except OmaError as e:
            log.warning("cannot ask nbd-pool for the backup's exports (%s); re-adopting it, the watchdog "
                        "judges it once nbd-pool answers", e, extra={"resource": backup_id})
            return None
        for d in open_disks:
            found = [e for e in exports if e.export_name == d.nbd_export_name]
            alive = [e for e in found if e.status == "running" and e.port == d.nbd_port
                     and e.job_id in (None, backup_id) and (d.qemu_nbd_pid is None or e.pid == d.qemu_nbd_pid)]
            if not alive:
                return f"the export of disk {d.disk_index} ({d.nbd_export_name}) is gone"
        try:
            await self.pool.renew(backup_id, self.cfg.lease_seconds)
        except NotFound:
            return "its port leases are gone"
        except OmaError as e:
            log.warning("could not renew the port leases (%s); the watchdog retries", e,
                        extra={"resource": backup_id})
        return await self._vma_lost(backup_id)

    async def _vma_lost(self, backup_id: str) -> str | None:
        try:
            # Briefly: omad serves nothing until every left-over backup is judged.
            progress = await self.vma.progress(backup_id, timeout=VMA_QUESTION_SECONDS)
        except NotFound:
            return "the VMA no longer knows the job"
        except OmaError as e:
            log.info("cannot ask the VMA about the backup (%s); the idle watchdog judges it", e,
                     extra={"resource": backup_id})
            return None
        status = str(progress.get("status", "")).lower()
        if status == "failed":
            said = progress.get("last_error") or "no reason given"
            if isinstance(said, dict):
                said = said.get("message") or "no reason given"
            return f"the VMA reports the job failed ({said})"
        return None

    async def readopt(self, backup_id: str) -> None:
        """Keep the backup running: its idle clock restarts now; close it if every disk is in already."""
        async with self.jobs.step(backup_id, "re-adopted after an omad restart"):
            async with self.db.transaction() as tx:
                await store.touch(tx, backup_id, utcnow())
        log.info("re-adopted after an omad restart: its exports are alive", extra={"resource": backup_id})
        if await self.completion.finish_if_done(backup_id):
            log.info("every disk had completed before the restart: closed it", extra={"resource": backup_id})
