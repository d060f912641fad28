"""The job engine: job rows with named steps and progress, background tasks, and recovery at start-up.

A job is a row in `jobs`; its steps are rows in `job_steps` (both owned by store/jobs.py, whose transitions end
a job once: a job that completed is not failed afterwards). Many jobs are created in one transaction with
`create_many` (a scheduler tick starting a thousand VMs). Work either runs as a task the engine tracks
(`spawn`), or advances on events (a backup completes when the VMA reports every disk). At start-up every job
left `running` by a previous omad is handed to its type's recovery function, which compensates (undo) or
resumes; a job type without one is marked failed with the reason.

A spawned job whose end cannot be written (the disk is full, the database locked by another process) is in the
state a crash leaves: its rows may be half-ended. It is settled the same way, without a restart: once the
database takes writes again, its type's recovery runs (tried after 0.25, 1 and 4 s, then every 15 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

from oma_common.errors import OmaError

from ..store import jobs as store
from ..store.db import STORAGE_ERRORS, Database, Tx
from ..store.jobs import JobStatus, NewJob
from . import ids

log = logging.getLogger(__name__)

__all__ = ["JobEngine", "JobStatus", "NewJob"]

Recovery = Callable[[dict[str, Any]], Awaitable[None]]
SETTLE_DELAYS = (0.25, 1.0, 4.0, 15.0)  # seconds between tries to settle a job; the last one repeats


class JobEngine:
    def __init__(self, db: Database, settle_delays: Sequence[float] = SETTLE_DELAYS) -> None:
        self.db = db
        self._recovery: dict[str, Recovery] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._settle_delays = tuple(settle_delays)
        self._settling: dict[str, asyncio.Task[None]] = {}  # jobs whose end could not be written, by id

    def on_recover(self, job_type: str, fn: Recovery) -> None:
        """Register how jobs of `job_type` left running by a previous omad are compensated or resumed."""
        self._recovery[job_type] = fn

    @staticmethod
    def new(job_type: str, *, display_name: str, context_id: str | None = None, job_id: str | None = None,
            status: str = "running", details: dict[str, Any] | None = None) -> NewJob:
        """A job to create (with a fresh id unless given), for `create_many`."""
        return NewJob(job_id or ids.job_id(), job_type, display_name, context_id, JobStatus(status), details or {})

    async def create(self, job_type: str, *, display_name: str, context_id: str | None = None,
                     job_id: str | None = None, status: str = "running", details: dict[str, Any] | None = None,
                     tx: Tx | None = None) -> str:
        job = self.new(job_type, display_name=display_name, context_id=context_id, job_id=job_id, status=status,
                       details=details)
        await store.create(tx or self.db, job)
        (tx or self.db).after_commit(lambda: log.info("%s job created: %s", job_type, display_name,
                                                      extra={"resource": job.id}))
        return job.id

    async def create_many(self, jobs: Sequence[NewJob], *, tx: Tx | None = None) -> list[str]:
        """Create every job in one transaction (the caller's, or one of its own): all of them or none."""
        def logged() -> None:
            for job in jobs:
                log.info("%s job created: %s", job.job_type, job.display_name, extra={"resource": job.id})

        if tx is not None:
            await store.create_many(tx, jobs)
            tx.after_commit(logged)
        else:
            async with self.db.transaction() as own:
                await store.create_many(own, jobs)
            logged()
        return [job.id for job in jobs]

    async def get(self, job_id: str) -> dict[str, Any]:
        """The job as the API shows it: its columns, its details document and its steps in order."""
        out = dataclasses.asdict(await store.get(self.db, job_id))
        out["steps"] = [dataclasses.asdict(s) for s in await store.steps(self.db, job_id)]
        return out

    async def progress(self, job_id: str, percent: float, current_step: str | None = None) -> None:
        await store.set_progress(self.db, job_id, percent, current_step)

    async def merge_details(self, job_id: str, **values: Any) -> None:
        async with self.db.transaction() as tx:
            await store.merge_details(tx, job_id, values)

    async def start(self, job_id: str) -> bool:
        """A pending job begins running; False when it was not pending."""
        return await store.start(self.db, job_id)

    async def finish(self, job_id: str, status: str = "completed", error: str | None = None,
                     tx: Tx | None = None) -> bool:
        """End an active job, completed or failed (with the reason); False when it had ended already: the
        first outcome stays."""
        ending = JobStatus(status)
        if ending == JobStatus.COMPLETED:
            changed = await store.complete(tx or self.db, job_id)
        elif ending == JobStatus.FAILED:
            changed = await store.fail(tx or self.db, job_id, error)
        else:
            raise ValueError(f"a job ends completed or failed, not {status}")
        if changed:  # the journal names only an end that was stored
            (tx or self.db).after_commit(lambda: log.info("job %s%s", status, f": {error}" if error else "",
                                                          extra={"resource": job_id}))
        else:
            log.info("job already ended; not %s%s", status, f": {error}" if error else "",
                     extra={"resource": job_id})
        return changed

    @contextlib.asynccontextmanager
    async def step(self, job_id: str, name: str) -> AsyncIterator[None]:
        """Record a named step: started, then completed or failed with the reason."""
        async with self.db.transaction() as tx:
            seq = await store.begin_step(tx, job_id, name)
        try:
            yield
        except BaseException as e:
            reason = str(e) if isinstance(e, OmaError) else type(e).__name__ + (f": {e}" if str(e) else "")
            try:
                await store.fail_step(self.db, job_id, seq, reason)
            except STORAGE_ERRORS as refused:  # the step's own error is the one that tells what happened
                log.warning("step %r failed (%s); its failure not recorded: %s", name, reason, refused,
                            extra={"resource": job_id})
            raise
        await store.complete_step(self.db, job_id, seq)

    def spawn(self, job_id: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` in the background; an exception that escapes it fails the job."""

        async def run() -> None:
            try:
                await work
            except asyncio.CancelledError:
                try:
                    await self.finish(job_id, "failed", "interrupted: omad stopped while the job ran")
                except STORAGE_ERRORS as e:  # the next start's recovery ends it
                    log.warning("job interrupted; its end not recorded: %s", e, extra={"resource": job_id})
                raise
            except STORAGE_ERRORS as e:
                self.settle_later(job_id, e)  # a write of the job's own failed: its rows may be half-ended
            except Exception as e:
                if not isinstance(e, OmaError):
                    log.exception("job failed unexpectedly", extra={"resource": job_id})
                try:
                    await self.finish(job_id, "failed", str(e) if isinstance(e, OmaError) else f"internal error: {e}")
                except STORAGE_ERRORS as again:
                    self.settle_later(job_id, again)
            finally:
                if self._tasks.get(job_id) is task:
                    del self._tasks[job_id]

        task = asyncio.ensure_future(run())
        self._tasks[job_id] = task
        return task

    def settle_later(self, job_id: str, cause: OmaError,
                     settle: Callable[[], Awaitable[object]] | None = None) -> None:
        """Settle a job whose end could not be written once the database takes writes again (see the module):
        by `settle` when given (a domain that knows how its end was meant to be written, e.g. a backup's undo
        with its reason), else by its type's recovery. Tried until it raises no storage error; a job already
        being settled is left to that."""
        if job_id in self._settling:
            return
        log.warning("job stopped but its end could not be recorded (%s: %s); it is settled once the database "
                    "takes writes again", cause.message, cause.details, extra={"resource": job_id})
        task = asyncio.ensure_future(self._settle(job_id, cause, settle))
        self._settling[job_id] = task
        task.add_done_callback(lambda _: self._settling.pop(job_id, None))

    async def _settle(self, job_id: str, cause: OmaError, settle: Callable[[], Awaitable[object]] | None) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(self._settle_delays[min(attempt, len(self._settle_delays) - 1)])
            try:
                job = await store.get(self.db, job_id)
                if not job.active:
                    return
                fn = self._recovery.get(job.job_type)
                if settle is not None:
                    await settle()
                elif fn is None:
                    await self.finish(job_id, "failed", f"stopped: {cause.message}")
                else:
                    await fn(dataclasses.asdict(job))
            except STORAGE_ERRORS:
                continue
            except Exception:
                log.exception("settling the job failed", extra={"resource": job_id})
                with contextlib.suppress(Exception):
                    await self.finish(job_id, "failed", f"stopped: {cause.message}; settling it failed")
                return
            log.info("job settled after the database took writes again", extra={"resource": job_id})
            return

    async def settled(self) -> None:
        """Wait until every job whose end could not be written is settled (tests; shutdown cancels them)."""
        while self._settling:
            await asyncio.gather(*self._settling.values(), return_exceptions=True)

    async def recover(self) -> int:
        """Hand every job a previous omad left active to its type's recovery; returns how many."""
        jobs = await store.active(self.db)
        for job in jobs:
            fn = self._recovery.get(job.job_type)
            try:
                if fn is None:
                    await self.finish(job.id, "failed", "interrupted: omad restarted while the job ran")
                else:
                    await fn(dataclasses.asdict(job))
            except Exception:
                log.exception("recovery failed", extra={"resource": job.id})
                await self.finish(job.id, "failed", "interrupted: recovery after an omad restart failed")
        return len(jobs)

    async def drain(self, timeout: float) -> None:
        """On shutdown: give running tasks `timeout` seconds, then cancel them (their jobs are marked)."""
        settling = list(self._settling.values())
        for t in settling:
            t.cancel()  # the next start's recovery settles those jobs
        await asyncio.gather(*settling, return_exceptions=True)
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
