"""The job engine: job rows with named steps and progress, background tasks, and recovery at start-up.

A job is a row in `jobs`; its steps are rows in `job_steps`. Work either runs as a task the engine tracks
(`spawn`), or advances on events (a backup completes when the VMA reports every disk). At start-up every job
left `running` by a previous omad is handed to its type's recovery function, which compensates (undo) or
resumes; a job type without one is marked failed with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from oma_common.errors import NotFound, OmaError

from ..store.db import Database, Tx, utcnow
from . import ids

log = logging.getLogger(__name__)

ACTIVE = ("pending", "running")
Recovery = Callable[[dict[str, Any]], Awaitable[None]]


class JobEngine:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._recovery: dict[str, Recovery] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def on_recover(self, job_type: str, fn: Recovery) -> None:
        """Register how jobs of `job_type` left running by a previous omad are compensated or resumed."""
        self._recovery[job_type] = fn

    async def create(self, job_type: str, *, display_name: str, context_id: str | None = None,
                     job_id: str | None = None, status: str = "running", details: dict[str, Any] | None = None,
                     tx: Tx | None = None) -> str:
        jid = job_id or ids.job_id()
        now = utcnow()
        sql = ("INSERT INTO jobs (id, job_type, status, progress, context_id, display_name, current_step, "
               "error_message, started_at, completed_at, created_at, updated_at, details) "
               "VALUES (?, ?, ?, 0, ?, ?, NULL, NULL, ?, NULL, ?, ?, ?)")
        params = (jid, job_type, status, context_id, display_name, now if status == "running" else None, now, now,
                  json.dumps(details or {}))
        if tx is not None:
            await tx.execute(sql, params)
        else:
            await self.db.execute(sql, params)
        log.info("%s job created: %s", job_type, display_name, extra={"resource": jid})
        return jid

    async def get(self, job_id: str) -> dict[str, Any]:
        row = await self.db.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise NotFound("job not found", f"job {job_id} does not exist")
        row["details"] = json.loads(row.get("details") or "{}")
        row["steps"] = await self.db.fetchall(
            "SELECT name, status, started_at, completed_at, error_message FROM job_steps WHERE job_id = ? "
            "ORDER BY seq", (job_id,))
        return row

    async def progress(self, job_id: str, percent: float, current_step: str | None = None) -> None:
        await self.db.execute("UPDATE jobs SET progress = ?, current_step = COALESCE(?, current_step), "
                              "updated_at = ? WHERE id = ?", (max(0.0, min(100.0, percent)), current_step,
                                                              utcnow(), job_id))

    async def merge_details(self, job_id: str, **values: Any) -> None:
        async with self.db.transaction() as tx:
            raw = await tx.scalar("SELECT details FROM jobs WHERE id = ?", (job_id,))
            details = json.loads(raw or "{}")
            details.update(values)
            await tx.execute("UPDATE jobs SET details = ?, updated_at = ? WHERE id = ?",
                             (json.dumps(details, default=str), utcnow(), job_id))

    async def finish(self, job_id: str, status: str = "completed", error: str | None = None,
                     tx: Tx | None = None) -> None:
        now = utcnow()
        sql = ("UPDATE jobs SET status = ?, error_message = ?, completed_at = ?, updated_at = ?, "
               "progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END WHERE id = ?")
        params = (status, error, now, now, status, job_id)
        if tx is not None:
            await tx.execute(sql, params)
        else:
            await self.db.execute(sql, params)
        log.info("job %s%s", status, f": {error}" if error else "", extra={"resource": job_id})

    @contextlib.asynccontextmanager
    async def step(self, job_id: str, name: str) -> AsyncIterator[None]:
        """Record a named step: started, then completed or failed with the reason."""
        async with self.db.transaction() as tx:
            seq = await tx.scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM job_steps WHERE job_id = ?", (job_id,))
            await tx.execute("INSERT INTO job_steps (job_id, seq, name, status, started_at) "
                             "VALUES (?, ?, ?, 'running', ?)", (job_id, seq, name, utcnow()))
            await tx.execute("UPDATE jobs SET current_step = ?, updated_at = ? WHERE id = ?",
                             (name, utcnow(), job_id))
        try:
            yield
        except BaseException as e:
            reason = str(e) if isinstance(e, OmaError) else type(e).__name__ + (f": {e}" if str(e) else "")
            await self.db.execute("UPDATE job_steps SET status = 'failed', completed_at = ?, error_message = ? "
                                  "WHERE job_id = ? AND seq = ?", (utcnow(), reason, job_id, seq))
            raise
        await self.db.execute("UPDATE job_steps SET status = 'completed', completed_at = ? WHERE job_id = ? "
                              "AND seq = ?", (utcnow(), job_id, seq))

    def spawn(self, job_id: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` in the background; an exception that escapes it fails the job."""

        async def run() -> None:
            try:
                await work
            except asyncio.CancelledError:
                await self.finish(job_id, "failed", "interrupted: omad stopped while the job ran")
                raise
            except Exception as e:
                if not isinstance(e, OmaError):
                    log.exception("job failed unexpectedly", extra={"resource": job_id})
                await self.finish(job_id, "failed", str(e) if isinstance(e, OmaError) else f"internal error: {e}")
            finally:
                self._tasks.pop(job_id, None)

        task = asyncio.ensure_future(run())
        self._tasks[job_id] = task
        return task

    async def recover(self) -> int:
        """Hand every job a previous omad left active to its type's recovery; returns how many."""
        rows = await self.db.fetchall("SELECT * FROM jobs WHERE status IN ('pending', 'running') ORDER BY created_at")
        for row in rows:
            fn = self._recovery.get(row["job_type"])
            try:
                if fn is None:
                    await self.finish(row["id"], "failed", "interrupted: omad restarted while the job ran")
                else:
                    await fn(row)
            except Exception:
                log.exception("recovery failed", extra={"resource": row["id"]})
                await self.finish(row["id"], "failed", "interrupted: recovery after an omad restart failed")
        return len(rows)

    async def drain(self, timeout: float) -> None:
        """On shutdown: give running tasks `timeout` seconds, then cancel them (their jobs are marked)."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
