"""Ending a replication: completing it (change ids become the next sync's base, each volume gets a new sync stamp
at its end) or failing it; either way its exports stop and its ports are released, while its volumes stay
attached for the next sync.

Both run under the job's lock, so a change id arriving meanwhile waits and then finds the job ended.

Completing is ordered: first the exports stop (nbd-pool's qemu-nbd flushes and exits: no NBD client can write any
more), then the stamps, then the records. A stamp says "this volume holds what this sync wrote", so it is
written only once nothing of the sync can still arrive, and a CloudStack snapshot taken before it shows the
older stamp; the records come last, so a stamp that was not written is never recorded. The disks' stamps are
independent of each other (one volume each, volume-agent locks per volume) and are written at once. Each part's
time is logged ("completion took ...").
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from oma_common.errors import OmaError
from oma_common.together import every

from ..clients.nbdpool import NbdPool
from ..clients.volume_agent import VolumeAgent
from ..jobs.engine import JobEngine
from ..jobs.locks import KeyedLocks
from ..store import contexts as contexts_store
from ..store import jobs as jobs_store
from ..store import replications as store
from ..store.contexts import ContextStatus
from ..store.db import Database, utcnow

log = logging.getLogger(__name__)


# The step whose completion means the VMA took the replication (the start records it; the monitor reads it).
VMA_STEP = "start VMA replication"
# Why a replication the VMA never took ends: omad died between recording it and the VMA's answer.
NEVER_TAKEN = "interrupted: omad stopped before the VMA took the replication"


def lock_key(job_id: str) -> str:
    return f"replication:{job_id}"


async def vma_took(db: Database, job_id: str) -> bool:
    """Whether the VMA answered this replication's start (its step completed)."""
    return any(s.name == VMA_STEP and s.status == jobs_store.StepStatus.COMPLETED
               for s in await jobs_store.steps(db, job_id))


def _summary(rep: store.Replication, status: str, reason: str | None, now: str) -> dict[str, Any]:
    out: dict[str, Any] = {"job_id": rep.job_id, "job_type": "replication", "operation": rep.replication_type,
                           "status": status, "bytes_transferred": rep.bytes_transferred, "started_at": rep.started_at,
                           "completed_at": now}
    if reason:
        out["error_message"] = reason
    return out


class Ending:
    def __init__(self, db: Database, jobs: JobEngine, pool: NbdPool, volumes: VolumeAgent, locks: KeyedLocks) -> None:
        self.db = db
        self.jobs = jobs
        self.pool = pool
        self.volumes = volumes
        self.locks = locks

    async def _stamp(self, job_id: str, disk: store.ReplicationDisk) -> str | None:
        """Write a new stamp at the end of the disk's volume (past the disk); None when it could not be written,
        so the next sync of that disk copies it in full rather than trust a volume it cannot recognise."""
        if not disk.volume_id:
            return None
        stamp = uuid.uuid4().hex
        try:
            await self.volumes.write_stamp(disk.volume_id, stamp)
        except OmaError as e:
            log.warning("could not stamp volume %s of %s (%s): its next sync copies it in full", disk.volume_id,
                        disk.disk_id, e, extra={"resource": job_id})
            return None
        return stamp

    async def release(self, job_id: str) -> None:
        """Stop the job's exports and free its ports (best effort: nbd-pool's leases expire anyway)."""
        try:
            await self.pool.release_job(job_id)
        except OmaError as e:
            log.warning("could not release the exports: %s", e, extra={"resource": job_id})

    async def complete(self, job_id: str) -> bool:
        """The VMA succeeded and every disk's change id is in: offer those ids to the next sync (a disk whose
        reported base was not the one offered starts over instead), move the context to ready_for_failover."""
        async with self.locks.hold(lock_key(job_id), wait=True):
            rep = await store.find_one(self.db, job_id)
            if rep is None or not rep.active:
                return False
            disks = await store.disks(self.db, job_id)
            t0 = time.monotonic()
            await self.release(job_id)
            t1 = time.monotonic()
            # Stamped after the VMA's last write: a snapshot taken before this point shows an older stamp.
            # Every stamp ends before anything is raised: none is still being written once the job's lock is
            # released (a later completion would write another stamp beside it).
            written = await every(*(self._stamp(job_id, d) for d in disks))
            stamps = {d.disk_id: s for d, s in zip(disks, written)}
            t2 = time.monotonic()
            now = utcnow()
            sent = {d.get("disk_id", ""): int(d.get("bytes_transferred") or 0)
                    for d in rep.vma_progress.get("disk_progresses") or [] if isinstance(d, dict)}
            async with self.db.transaction() as tx:
                if not await store.complete(tx, job_id, now):
                    return False
                await self.jobs.finish(job_id, "completed", tx=tx)
                for d in disks:
                    keep = d.change_id if d.change_id and not d.change_id_mismatch else None
                    await contexts_store.set_change_id(tx, rep.vm_context_id, d.disk_id, keep, now)
                    if d.volume_id:
                        await store.set_sync_stamp(tx, rep.vm_context_id, d.disk_id, d.volume_id, stamps[d.disk_id],
                                                   now)
                await contexts_store.mark_cbt(tx, job_id, success=True,
                                              bytes_by_disk={k: v for k, v in sent.items() if k})
                await contexts_store.job_ended(tx, rep.vm_context_id, job_id, succeeded=True,
                                               summary=_summary(rep, "completed", None, now), now=now,
                                               status=ContextStatus.READY_FOR_FAILOVER)
            t3 = time.monotonic()
        log.info("replication completed; completion took %.3f s: exports stopped and ports released %.3f s, "
                 "%d stamp(s) written %.3f s, records %.3f s", t3 - t0, t1 - t0, len(disks), t2 - t1, t3 - t2,
                 extra={"resource": job_id})
        return True

    async def fail(self, job_id: str, reason: str, *, cancelled: bool = False) -> bool:
        """Fail (or cancel) an active replication; False when it had already ended."""
        async with self.locks.hold(lock_key(job_id), wait=True):
            rep = await store.find_one(self.db, job_id)
            if rep is None or not rep.active:
                return False
            log.warning("replication %s: %s", "cancelled" if cancelled else "failed", reason,
                        extra={"resource": job_id})
            await self.release(job_id)
            now = utcnow()
            status = "cancelled" if cancelled else "failed"
            async with self.db.transaction() as tx:
                if not await store.fail(tx, job_id, reason, now, cancelled=cancelled):
                    return False
                await self.jobs.finish(job_id, "failed", reason, tx=tx)  # a job row ends completed or failed
                await contexts_store.mark_cbt(tx, job_id, success=False, bytes_by_disk={})
                await contexts_store.job_ended(tx, rep.vm_context_id, job_id, succeeded=False,
                                               summary=_summary(rep, status, reason, now), now=now,
                                               status=ContextStatus.FAILED)
        return True
