"""The VMA's change ids: what a disk's next sync continues from, and what a sync reports it reached.

Never silently wrong: a reported id is kept on the job's disk and offered to the next sync only once this sync
completed (ending.py); a disk whose volume is new starts over with "" (replications.py); a reported
`previous_change_id` other than the one this sync was offered marks the disk for a full copy next time.

Once the last disk's id is in, the VMA is about to say Succeeded: `on_all_stored` tells the monitor to ask it now.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from oma_common.errors import Conflict, NotFound

from ..store import contexts as contexts_store
from ..store import replications as store
from ..store.db import Database, utcnow
from ..jobs.locks import KeyedLocks
from .ending import lock_key

log = logging.getLogger(__name__)


class ChangeIds:
    def __init__(self, db: Database, locks: KeyedLocks) -> None:
        self.db = db
        self.locks = locks
        self.on_all_stored: list[Callable[[str], None]] = []  # callbacks(job_id): every disk's change id is in

    async def current(self, vm_path: str, disk_id: str) -> dict[str, Any]:
        """Always an answer: "" when there is none (the VMA then copies the whole disk)."""
        change_id = await contexts_store.change_id_by_path(self.db, vm_path, disk_id)
        message = "change id found" if change_id else "no change id stored: copy the whole disk"
        return {"vm_path": vm_path, "disk_id": disk_id, "change_id": change_id, "message": message}

    async def store(self, job_id: str, disk_id: str, change_id: str, previous_change_id: str | None) -> dict[str, Any]:
        async with self.locks.hold(lock_key(job_id), wait=True):
            rep = await store.find_one(self.db, job_id)
            if rep is None:
                raise NotFound("Job not found", f"replication job {job_id} does not exist")
            if not rep.active:
                raise Conflict("replication ended", f"replication job {job_id} is {rep.status}; "
                                                    "its change ids can no longer change")
            disks = await store.disks(self.db, job_id)
            disk = next((d for d in disks if d.disk_id == disk_id), None)
            if disk is None:
                raise NotFound("disk not found", f"replication job {job_id} has no disk {disk_id}")
            # The VMA continued from something else than what it was offered: the volume may not hold what
            # the new id stands for, so the next sync of this disk is a full copy.
            mismatch = previous_change_id is not None and previous_change_id != disk.base_change_id
            if mismatch:
                log.warning("%s: the VMA continued from %r, offered %r; the next sync copies it in full", disk_id,
                            previous_change_id, disk.base_change_id, extra={"resource": job_id})
            now = utcnow()
            async with self.db.transaction() as tx:
                await store.record_change_id(tx, job_id, disk_id, change_id=change_id,
                                             previous_change_id=previous_change_id, mismatch=mismatch, now=now)
                await contexts_store.add_cbt(tx, rep.vm_context_id, job_id=job_id, disk_id=disk_id,
                                             change_id=change_id, previous_change_id=previous_change_id,
                                             sync_type="incremental" if previous_change_id else "full",
                                             bytes_transferred=None, success=False, now=now)
            complete = all(d.change_id for d in disks if d.disk_id != disk_id)
        if complete:
            for callback in self.on_all_stored:
                callback(job_id)
        return {"job_id": job_id, "disk_id": disk_id, "change_id": change_id,
                "message": "change id recorded" + ("; it did not continue the stored one, so the next sync "
                                                   "copies the disk in full" if mismatch else "")}
