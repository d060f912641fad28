"""Ending a backup that did not succeed: record why, stop its exports, free its ports, remove its images.

Every path that gives up on a backup comes here (a failed start, the VMA reporting failure, the idle
watchdog, an omad restart), so the undo is the same whatever went wrong. It runs inside the backup's lock:
a completion that arrives meanwhile waits, then finds the backup failed and is refused. Releasing nbd-pool's side is best effort: if the agent cannot be reached now, the watchdog's sweep
releases what a finished backup still holds later. Only this backup's own images are removed, never the
backing files of its parent.
"""

from __future__ import annotations

import logging
from typing import Any

from oma_common.errors import NotFound, OmaError

from ..adapters.localfs import LocalFs
from ..clients.nbdpool import NbdPool
from ..jobs.engine import JobEngine
from ..jobs.locks import KeyedLocks
from ..store import backups as store
from ..store import contexts as contexts_store
from ..store.db import STORAGE_ERRORS, Database, Tx, utcnow

log = logging.getLogger(__name__)


async def job_ended(tx: Tx, backup: store.Backup, *, succeeded: bool, reason: str | None, now: str) -> None:
    """The VM's context counts the backup's end and keeps it as its last operation."""
    summary: dict[str, Any] = {"job_id": backup.backup_id, "job_type": "backup", "operation": backup.backup_type,
                               "status": "completed" if succeeded else "failed",
                               "bytes_transferred": backup.bytes_transferred, "completed_at": now}
    if reason:
        summary["error_message"] = reason
    await contexts_store.job_ended(tx, backup.vm_context_id, backup.backup_id, succeeded=succeeded,
                                   summary=summary, now=now)


def lock_key(backup_id: str) -> str:
    return f"backup:{backup_id}"


class Teardown:
    def __init__(self, db: Database, jobs: JobEngine, pool: NbdPool, fs: LocalFs, locks: KeyedLocks) -> None:
        self.db = db
        self.jobs = jobs
        self.pool = pool
        self.fs = fs
        self.locks = locks

    async def fail(self, backup_id: str, reason: str) -> bool:
        """Fail an active backup and undo it; False when it had already ended (nothing is done)."""
        async with self.locks.hold(lock_key(backup_id), wait=True):
            return await self.fail_locked(backup_id, reason)

    async def fail_locked(self, backup_id: str, reason: str) -> bool:
        """`fail` for a caller that already holds the backup's lock.

        The undo comes first and the status last, so that a backup reads `failed` only once nothing of it is
        left; completions wait on the lock meanwhile. A crash in between leaves it active, and the recovery
        at the next start undoes it again (every step may be repeated).
        """
        status = await store.status_of(self.db, backup_id)
        if status not in store.ACTIVE:
            return False
        log.warning("failing the backup: %s", reason, extra={"resource": backup_id})
        await self.release(backup_id)
        await self.remove_images(backup_id)
        now = utcnow()
        try:
            async with self.db.transaction() as tx:
                await store.fail(tx, backup_id, reason, now)
                await self.jobs.finish(backup_id, "failed", reason, tx=tx)
                await job_ended(tx, await store.get(tx, backup_id), succeeded=False, reason=reason, now=now)
        except STORAGE_ERRORS as e:
            # Undone but not recorded: failed with this reason once the database takes writes again (not left
            # active until the idle watchdog, which never judges a pending backup, or the next start).
            self.jobs.settle_later(backup_id, e, lambda: self.fail(backup_id, reason))
            raise
        return True

    async def release(self, backup_id: str) -> bool:
        """Stop the backup's exports and free its ports; False when nbd-pool could not be asked."""
        try:
            out = await self.pool.release_job(backup_id)
        except NotFound:
            return True  # nbd-pool holds nothing for it
        except OmaError as e:
            log.warning("could not release exports and ports (%s); the watchdog will retry", e,
                        extra={"resource": backup_id})
            return False
        log.info("released %d export(s) and %d port(s)", out.stopped_exports, out.released_count,
                 extra={"resource": backup_id})
        return True

    async def remove_images(self, backup_id: str) -> None:
        """Remove the backup's own images (missing ones are fine) and its VM directory once empty."""
        files = await store.image_paths(self.db, backup_id)
        try:
            removed = await self.fs.remove(files)
        except OmaError as e:
            log.error("could not remove the images: %s", e, extra={"resource": backup_id})
            return
        for directory in {f.parent for f in files}:
            await self.fs.remove_dir_if_empty(directory)
        if removed:
            log.info("removed %d image(s)", len(removed), extra={"resource": backup_id})
