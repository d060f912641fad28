"""Following running replications: the VMA's progress is polled into the job until it succeeds (every disk's
change id in: complete), fails, or goes silent (no progress, no change id and no NBD client for the idle
timeout: fail). The exports belong to nbd-pool and the VMA keeps writing while omad is away, so at start-up
every replication still running is adopted again, whatever omad did before (a restart, an upgrade, kill -9) —
but not one this omad is starting meanwhile (a failover's final sync resumed by the recovery): the VMA has not
been asked yet, so it would not know the job; that one is followed once started (`Replications.on_started`).

Completion is event-driven: the VMA stores each disk's change id here and says Succeeded right after, so when
the last disk's change id is in (or its pushed telemetry says it completed) the monitor is nudged and asks the
VMA at once, then again after 20 ms, 40 ms, ... up to the poll interval, rather than wait out the interval. The
rule stays: nothing completes without the VMA's Succeeded and every disk's change id. A nudge for a job not
followed here (being started, not adopted yet) does nothing; following a job starts with that check, so a
nudge that came too early is not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from oma_common.errors import NotFound, OmaError

from ..backup.completion import Telemetry
from ..clients.nbdpool import NbdPool
from ..clients.vma import VmaClient
from ..config import ReplicationConfig
from ..jobs.engine import JobEngine
from ..store import replications as store
from ..store.db import Database, utcnow
from .ending import NEVER_TAKEN, Ending, vma_took

log = logging.getLogger(__name__)

SUCCEEDED = ("succeeded", "completed")
FAILED = ("failed", "error", "cancelled")
# How many poll intervals a VMA that says it succeeded may take to have every change id stored.
_MISSING_IDS_POLLS = 5
# The first pause after a nudge found the VMA not done yet; it doubles up to the poll interval.
_NUDGED_BACKOFF_SECONDS = 0.02


def _seconds_since(stamp: str) -> float:
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return max(0.0, time.time() - then.timestamp())


class Monitor:
    def __init__(self, db: Database, jobs: JobEngine, vma: VmaClient, pool: NbdPool, ending: Ending,
                 cfg: ReplicationConfig, launching: Callable[[str], bool] = lambda _job_id: False) -> None:
        self.db = db
        self.launching = launching  # whether this omad is starting that replication now
        self.jobs = jobs
        self.vma = vma
        self.pool = pool
        self.ending = ending
        self.cfg = cfg
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}  # per followed job: poll the VMA now
        self._running = False

    async def recover(self, job: dict[str, Any]) -> None:
        """The job engine's recovery for replications: nothing to undo, start() adopts them."""
        rep = await store.find_one(self.db, job["id"])
        if rep is None:
            await self.jobs.finish(job["id"], "failed", "interrupted: omad restarted (no replication row)")

    async def start(self) -> None:
        self._running = True
        for rep in await store.running(self.db):
            if self.launching(rep.job_id):
                continue
            log.info("adopting the running replication", extra={"resource": rep.job_id})
            self.follow(rep.job_id)

    async def stop(self) -> None:
        """Stop following (the jobs stay running: the next omad adopts them)."""
        self._running = False
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def follow(self, job_id: str) -> None:
        if job_id in self._tasks or not self._running:
            return
        self._wake[job_id] = asyncio.Event()
        task = asyncio.ensure_future(self._follow(job_id))
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._forget(job_id))

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._wake.pop(job_id, None)

    def nudge(self, job_id: str) -> None:
        """The job may have finished (its last change id is in, or the VMA said so): poll the VMA now. Nothing
        for a job not followed here."""
        wake = self._wake.get(job_id)
        if wake is not None:
            wake.set()

    async def _pause(self, job_id: str, seconds: float) -> bool:
        """Wait `seconds` or until nudged; True when nudged."""
        wake = self._wake[job_id]
        if not wake.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), seconds)
        nudged = wake.is_set()
        wake.clear()  # a nudge from now on wakes the next pause
        return nudged

    async def _follow(self, job_id: str) -> None:
        interval = self.cfg.poll_interval_seconds
        # Every change id already in (it came before this job was followed): as if nudged. A database hiccup
        # here only costs the wait for the interval's poll.
        with contextlib.suppress(Exception):
            if all(d.change_id for d in await store.disks(self.db, job_id)):
                self.nudge(job_id)
        pause = interval
        nudged_at: float | None = None  # when the last nudge woke it
        lacking_since: float | None = None
        last_renew = time.monotonic()
        while True:
            if await self._pause(job_id, pause):
                # After a nudge the VMA is about to say Succeeded: ask again soon, less and less often.
                nudged_at = time.monotonic()
                pause = min(_NUDGED_BACKOFF_SECONDS, interval)
            else:
                pause = min(pause * 2, interval)
            try:
                rep = await store.find_one(self.db, job_id)
                if rep is None or not rep.active:
                    return
                if time.monotonic() - last_renew > self.cfg.lease_seconds / 3:
                    with contextlib.suppress(OmaError):
                        await self.pool.renew(job_id, self.cfg.lease_seconds)
                    last_renew = time.monotonic()
                asked = time.monotonic()
                outcome = await self._poll(rep)
                if outcome == "succeeded":
                    disks = await store.disks(self.db, job_id)
                    lacking = [d.disk_id for d in disks if not d.change_id]
                    if not lacking:
                        log.info("the VMA says the replication succeeded (asked %s, answered in %.3f s)",
                                 "at the poll interval" if nudged_at is None
                                 else f"{asked - nudged_at:.3f} s after the last nudge", time.monotonic() - asked,
                                 extra={"resource": job_id})
                        await self.ending.complete(job_id)
                        return
                    lacking_since = asked if lacking_since is None else lacking_since
                    if asked - lacking_since >= (_MISSING_IDS_POLLS - 1) * interval:
                        await self.ending.fail(job_id, "the VMA reported success without storing the change id of "
                                                       + ", ".join(lacking))
                        return
                elif outcome is not None:
                    await self.ending.fail(job_id, outcome)
                    return
                elif await self._idle(await store.get(self.db, job_id)):
                    await self.ending.fail(job_id, f"the VMA went silent: no progress, no change id and no NBD "
                                                   f"client for {self.cfg.idle_timeout_seconds:g} s")
                    return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("following the replication failed; trying again", extra={"resource": job_id})

    async def _poll(self, rep: store.Replication) -> str | None:
        """Record the VMA's progress; "succeeded", a failure reason, or None (running, or no answer)."""
        try:
            body = await self.vma.progress(rep.job_id)
        except NotFound:
            # A start a dead omad cut short before the VMA answered says so, whoever notices it first (the
            # monitor adopting it, or a failover resuming its final sync).
            if not await vma_took(self.db, rep.job_id):
                return NEVER_TAKEN
            return "the VMA does not know the job (it restarted, or the job was lost)"
        except OmaError as e:
            log.info("no progress from the VMA: %s", e, extra={"resource": rep.job_id})
            return None
        status = str(body.get("status") or "")
        timing = body.get("timing") if isinstance(body.get("timing"), dict) else {}
        done = int(body.get("bytes_transferred") or 0)
        moved = done != rep.bytes_transferred or status != rep.vma_status
        try:
            percent = float(body.get("percentage") or 0)
        except (TypeError, ValueError):
            percent = 0.0
        eta = timing.get("eta_seconds") if isinstance(timing, dict) else None
        await store.update_progress(
            self.db, rep.job_id, percent=min(100.0, max(0.0, percent)), bytes_transferred=done,
            total_bytes=int(body.get("total_bytes") or 0), operation=str(body.get("current_operation") or ""),
            vma_status=status, vma_sync_type=str(body.get("sync_type") or ""),
            vma_eta_seconds=int(eta) if isinstance(eta, (int, float)) else None, body=body, moved=moved,
            now=utcnow())
        await self.jobs.progress(rep.job_id, min(99.0, max(2.0, percent)), str(body.get("current_operation") or ""))
        lowered = status.lower()
        if lowered in SUCCEEDED:
            return "succeeded"
        if lowered in FAILED:
            return f"the VMA reported failure: {body.get('last_error') or body.get('current_operation') or status}"
        return None

    async def telemetry(self, job_id: str, report: Telemetry) -> dict[str, Any]:
        """The VMA's pushed progress (the backup client's body): recorded between polls; `failed` ends the job."""
        rep = await store.find_one(self.db, job_id)
        if rep is None:
            raise NotFound("Job not found", f"replication job {job_id} does not exist")
        if not rep.active:
            return {"status": "ignored", "job_id": job_id, "message": f"replication {job_id} is {rep.status}"}
        moved = report.bytes_transferred != rep.bytes_transferred or report.status != rep.vma_status
        await store.update_progress(
            self.db, job_id, percent=min(100.0, max(0.0, report.progress_percent)),
            bytes_transferred=report.bytes_transferred, total_bytes=report.total_bytes,
            operation=report.current_phase or rep.current_operation, vma_status=rep.vma_status,
            vma_sync_type=rep.vma_sync_type, vma_eta_seconds=report.eta_seconds, body=rep.vma_progress,
            moved=moved, now=utcnow())
        if report.status.lower() in SUCCEEDED:
            self.nudge(job_id)  # completed only once the VMA's progress says Succeeded and every change id is in
        if report.status.lower() == "failed":
            said = (report.error or {}).get("message") or "no reason given"
            await self.ending.fail(job_id, f"the VMA reported the replication failed: {said}")
            return {"status": "failed", "job_id": job_id, "message": "replication marked failed"}
        return {"status": "recorded", "job_id": job_id, "message": "telemetry recorded"}

    async def _idle(self, rep: store.Replication) -> bool:
        if _seconds_since(rep.last_activity_at) < self.cfg.idle_timeout_seconds:
            return False
        try:
            exports = [e for e in await self.pool.exports() if e.job_id == rep.job_id]
        except OmaError:
            return False  # cannot tell: not silent
        return not any(e.connection_count > 0 for e in exports)
