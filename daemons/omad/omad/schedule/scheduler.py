"""The scheduler inside omad: fires due schedules, turns their groups' VMs into jobs within the limits, follows
the jobs through the `jobs` table, retries failures, and closes each execution with its counts.

All state lives in the database (schedules.next_run_at, schedule_executions, schedule_execution_vms), and one
`tick()` moves everything forward from whatever it finds — so a restarted omad simply carries on: running
executions continue, and a run missed while omad was down runs once, recorded as late.

Per VM there is never more than one job: a VM with an active job in `jobs` (from another schedule, an API
call, anything) waits for it to end, and a launcher's Conflict (the backup domain's own per-VM check) means
the same. Ticks are serialised, so the check and the start of a job are never interleaved with another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound, OmaError

from ..audit import Audit
from ..store.db import Database, Tx
from . import cron
from .clock import Clock, iso, parse_iso
from .launcher import JobLauncher, Target, VmRef
from .schedules import load_execution, refresh_next_scheduled, target_of

log = logging.getLogger(__name__)

ACTIVE_JOB = ("pending", "running")
SUCCEEDED = ("completed", "succeeded")
MISSED_COUNT_LIMIT = 1000  # how many missed due times a late run bothers to count


@dataclasses.dataclass
class TickReport:
    """What one tick did."""

    fired: int = 0  # executions opened by due schedules (running or recorded as skipped)
    started: int = 0  # jobs created
    finished: int = 0  # jobs seen ending
    closed: int = 0  # executions ended


@dataclasses.dataclass
class _Open:
    """One VM of a running execution that is not done yet."""

    execution_id: int
    schedule_id: str
    context_id: str
    vm_name: str | None
    group_id: str
    status: str
    attempts: int
    job_id: str | None
    retry_at: str | None
    reason: str | None


class Scheduler:
    def __init__(self, db: Database, audit: Audit, launchers: Mapping[str, JobLauncher], clock: Clock, *,
                 poll_seconds: float = 5.0, late_after_seconds: float = 60.0, idle_seconds: float = 60.0,
                 stop_grace_seconds: float = 10.0) -> None:
        self.db = db
        self.audit = audit
        self.launchers = launchers
        self.clock = clock
        self.poll_seconds = poll_seconds  # how often running jobs are looked at
        self.late_after_seconds = late_after_seconds  # a run started later than this after its due time is late
        self.idle_seconds = idle_seconds  # longest sleep with nothing due: bounds the effect of a clock step
        self.stop_grace_seconds = stop_grace_seconds  # how long stop() lets a start in progress finish
        self._stopping = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ticks = 0
        self._ticked = asyncio.Condition()
        self._halted: set[str] = set()  # schedules disabled while the current tick runs

    # -- service -------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        await self._schedule_unscheduled()
        self._task = asyncio.ensure_future(self._run())
        log.info("scheduler started")

    async def stop(self) -> None:
        """Start nothing more; let a job start in progress finish and be recorded, then end the loop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.stop_grace_seconds)
            except asyncio.TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                log.warning("scheduler stopped while starting a job; its VM runs again after the restart")
            self._task = None
        log.info("scheduler stopped; running executions continue at the next start")

    def wake(self) -> None:
        """Something changed (a schedule, a group, a trigger): look again now rather than at the next poll."""
        self._wake.set()

    def halt(self, schedule_id: str) -> None:
        """The schedule was just disabled (its waiting VMs are skipped in the database): a tick in progress
        starts nothing more for it."""
        self._halted.add(schedule_id)

    async def wait_ticks(self, count: int) -> None:
        """Return once `count` ticks have completed since start (tests drive the loop with a fake clock)."""
        async with self._ticked:
            await self._ticked.wait_for(lambda: self._ticks >= count)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            if self._stopping:
                break
            delay = await self._delay()
            sleeper = asyncio.ensure_future(self.clock.sleep(delay))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in (sleeper, waker):
                    f.cancel()

    async def _delay(self) -> float:
        """Seconds until the next due time, or the poll interval while executions run."""
        delay = self.idle_seconds
        if await self.db.scalar("SELECT 1 FROM schedule_executions WHERE status = 'running' LIMIT 1"):
            delay = min(delay, self.poll_seconds)
        due = await self.db.scalar("SELECT MIN(next_run_at) FROM schedules WHERE enabled = 1")
        if due:
            delay = min(delay, max(0.0, (parse_iso(due) - self.clock.now()).total_seconds()))
        return delay

    async def _schedule_unscheduled(self) -> None:
        """Enabled schedules without a next run (written by hand, or unusable before) get one from now."""
        now = self.clock.now()
        for row in await self.db.fetchall("SELECT * FROM schedules WHERE enabled = 1 AND next_run_at IS NULL"):
            at = self._next(row, now)
            if at is not None:
                await self.db.execute("UPDATE schedules SET next_run_at = ? WHERE id = ?", (iso(at), row["id"]))
        await refresh_next_scheduled(self.db)

    @staticmethod
    def _next(row: Mapping[str, Any], after: datetime) -> datetime | None:
        try:
            return cron.parse(row["cron_expression"]).next_after(after, cron.zone(row["timezone"]))
        except Invalid as e:  # e.g. a time zone that a tzdata upgrade removed
            log.error("schedule %r cannot be computed: %s", row["name"], e.details, extra={"resource": row["id"]})
            return None

    # -- one tick ------------------------------------------------------------------------------------

    async def tick(self) -> TickReport:
        """Fire what is due, then move every running execution forward. Safe to call at any time."""
        report = TickReport()
        async with self._lock:
            self._halted.clear()  # what was disabled before now is in the database this tick reads
            now = self.clock.now()
            await self._fire_due(now, report)
            await self._advance(now, report)
        async with self._ticked:
            self._ticks += 1
            self._ticked.notify_all()
        return report

    async def trigger(self, schedule_id: str, *, actor: str) -> dict[str, Any]:
        """Run a schedule now (enabled or not); 409 while it runs and skip_if_running is on."""
        async with self._lock:
            now = self.clock.now()
            async with self.db.transaction() as tx:
                row = await tx.fetchone("SELECT * FROM schedules WHERE id = ?", (schedule_id,))
                if row is None:
                    raise NotFound("schedule not found", f"schedule {schedule_id} does not exist")
                running = await self._running(tx, schedule_id)
                if running and row["skip_if_running"]:
                    raise Conflict("schedule is running", f"schedule {row['name']!r} is still running (execution "
                                                          f"{running}) and skips runs meanwhile (skip_if_running)",
                                   execution_id=running)
                execution_id = await self._open(tx, row, scheduled_at=now, now=now,
                                                triggered_by=f"manual:{actor}", late=False, missed=0)
                await self.audit.record(actor, "schedule.trigger", f"schedule:{schedule_id}", tx=tx,
                                        execution_id=execution_id)
        self.wake()
        return await load_execution(self.db, execution_id)

    async def _fire_due(self, now: datetime, report: TickReport) -> None:
        due_rows = await self.db.fetchall("SELECT * FROM schedules WHERE enabled = 1 AND next_run_at IS NOT NULL "
                                          "AND next_run_at <= ? ORDER BY next_run_at, name", (iso(now),))
        for row in due_rows:
            due = parse_iso(row["next_run_at"])
            following = self._next(row, now)
            late = (now - due).total_seconds() > self.late_after_seconds
            missed = 0
            if late and following is not None:  # one run stands for every due time missed meanwhile
                missed = len(cron.parse(row["cron_expression"]).runs_between(
                    due, now, cron.zone(row["timezone"]), MISSED_COUNT_LIMIT))
            async with self.db.transaction() as tx:
                await self._open(tx, row, scheduled_at=due, now=now, triggered_by="scheduler", late=late,
                                 missed=missed)
                await tx.execute("UPDATE schedules SET next_run_at = ?, last_run_at = ? WHERE id = ?",
                                 (iso(following) if following else None, iso(now), row["id"]))
                await refresh_next_scheduled(tx)
            report.fired += 1

    @staticmethod
    async def _running(tx: Tx, schedule_id: str) -> int | None:
        return await tx.scalar("SELECT id FROM schedule_executions WHERE schedule_id = ? AND status = 'running' "
                               "ORDER BY id LIMIT 1", (schedule_id,))

    async def _open(self, tx: Tx, row: Mapping[str, Any], *, scheduled_at: datetime, now: datetime,
                    triggered_by: str, late: bool, missed: int) -> int:
        """Record an execution: running with its VMs in order, or skipped with the reason."""
        vms = await self._eligible(tx, row["id"])
        running = await self._running(tx, row["id"])
        status, message, completed = "running", None, None
        if running and row["skip_if_running"]:
            status, completed = "skipped", iso(now)
            message = f"skipped: the previous run (execution {running}) is still running"
        elif not vms:
            status, completed = "skipped", iso(now)
            message = "skipped: no enabled VM is in a group that uses this schedule"
        execution_id = await tx.execute(
            "INSERT INTO schedule_executions (schedule_id, scheduled_at, started_at, completed_at, status, "
            "triggered_by, late, missed_runs, vms_eligible, jobs_skipped, message) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row["id"], iso(scheduled_at), iso(now), completed, status, triggered_by, int(late), missed, len(vms),
             len(vms) if status == "skipped" else 0, message))
        if status == "running":
            await tx.executemany(
                "INSERT INTO schedule_execution_vms (execution_id, vm_context_id, group_id, position, status) "
                "VALUES (?, ?, ?, ?, 'pending')", [(execution_id, cid, gid, i) for i, (cid, gid) in enumerate(vms)])
        lateness = f", {(now - scheduled_at).total_seconds():.0f} s late ({missed} more missed)" if late else ""
        log.info("schedule %r: execution %d %s, %d VM(s)%s%s", row["name"], execution_id, status, len(vms),
                 lateness, f" — {message}" if message else "", extra={"resource": row["id"]})
        return execution_id

    @staticmethod
    async def _eligible(tx: Tx, schedule_id: str) -> list[tuple[str, str]]:
        """(context, group) of every VM the schedule protects, once each, in start order: groups by priority
        (lower first), then VMs by their priority in the group (lower first), then by name."""
        rows = await tx.fetchall(
            "SELECT m.vm_context_id, m.group_id FROM vm_machine_groups g "
            "JOIN vm_group_memberships m ON m.group_id = g.id "
            "JOIN vm_replication_contexts c ON c.context_id = m.vm_context_id "
            "WHERE g.schedule_id = ? AND m.enabled = 1 AND c.scheduler_enabled = 1 "
            "ORDER BY g.priority, g.name, g.id, m.priority, c.vm_name", (schedule_id,))
        seen: dict[str, str] = {}
        for r in rows:
            seen.setdefault(r["vm_context_id"], r["group_id"])  # a VM in two of its groups runs once
        return list(seen.items())

    # -- running executions --------------------------------------------------------------------------

    async def _advance(self, now: datetime, report: TickReport) -> None:
        executions = await self.db.fetchall("SELECT id, schedule_id FROM schedule_executions "
                                            "WHERE status = 'running' ORDER BY id")
        if not executions:
            return
        open_vms = [_Open(**r) for r in await self.db.fetchall(
            "SELECT v.execution_id, e.schedule_id, v.vm_context_id AS context_id, c.vm_name, v.group_id, v.status,"
            " v.attempts, v.job_id, v.retry_at, v.reason FROM schedule_executions e"
            " JOIN schedule_execution_vms v ON v.execution_id = e.id"
            " LEFT JOIN vm_replication_contexts c ON c.context_id = v.vm_context_id"
            " WHERE e.status = 'running' AND v.status IN ('pending', 'running', 'retry_wait')"
            " ORDER BY e.id, v.position")]
        schedules = {r["id"]: r for r in await self.db.fetchall(
            "SELECT * FROM schedules WHERE id IN (SELECT DISTINCT schedule_id FROM schedule_executions "
            "WHERE status = 'running')")}
        touched: set[int] = set()
        async with self.db.transaction() as tx:
            await self._collect_finished(tx, open_vms, schedules, now, report, touched)
            await self._release_retries(tx, open_vms, now, touched)
            await self._drop_ineligible(tx, open_vms, now, touched)
        await self._dispatch(open_vms, schedules, now, report, touched)
        async with self.db.transaction() as tx:
            for e in executions:
                if e["id"] in touched or not any(v.execution_id == e["id"] for v in open_vms):
                    await self._recount(tx, e["id"])
                if not any(v.execution_id == e["id"] and v.status in ("pending", "running", "retry_wait")
                           for v in open_vms):
                    await self._close(tx, e["id"], now)
                    report.closed += 1

    async def _collect_finished(self, tx: Tx, open_vms: list[_Open], schedules: dict[str, dict[str, Any]],
                                now: datetime, report: TickReport, touched: set[int]) -> None:
        """Jobs that ended since the last look: the VM is done, or waits for a retry."""
        running = [v for v in open_vms if v.status == "running"]
        if not running:
            return
        jobs = {r["id"]: r for r in await tx.fetchall(
            "SELECT id, status, error_message FROM jobs WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps([v.job_id for v in running]),))}
        ended: list[tuple[str, str, str | None]] = []
        completed: list[_Open] = []
        for v in running:
            job = jobs.get(v.job_id or "")
            if job is not None and job["status"] in ACTIVE_JOB:
                continue
            ok = job is not None and job["status"] in SUCCEEDED
            ended.append(("completed" if ok else "failed", iso(now), v.job_id))
            report.finished += 1
            touched.add(v.execution_id)
            if ok:
                completed.append(v)
            else:
                why = "its job row disappeared" if job is None else \
                    f"{job['status']}{': ' + job['error_message'] if job['error_message'] else ''}"
                await self._failed_attempt(tx, v, schedules[v.schedule_id], now, f"job {v.job_id} {why}")
        # The common case in bulk: every VM of a large execution may end between two polls.
        await tx.executemany("UPDATE schedule_execution_jobs SET status = ?, finished_at = ? WHERE job_id = ?", ended)
        await tx.executemany("UPDATE schedule_execution_vms SET status = 'completed', completed_at = ?, reason = NULL "
                             "WHERE execution_id = ? AND vm_context_id = ?",
                             [(iso(now), v.execution_id, v.context_id) for v in completed])
        for v in completed:
            v.status, v.reason = "completed", None

    async def _failed_attempt(self, tx: Tx, v: _Open, schedule: Mapping[str, Any], now: datetime, why: str) -> None:
        """A failed job or a refused start: retry after the schedule's delay while attempts remain."""
        if v.attempts <= schedule["retry_attempts"]:
            at = now + timedelta(minutes=schedule["retry_delay_minutes"])
            await self._set(tx, v, "retry_wait", retry_at=iso(at),
                            reason=f"{why}; retry {v.attempts} of {schedule['retry_attempts']} at {iso(at)}")
            log.info("%s: %s; retrying at %s", v.vm_name, why, iso(at), extra={"resource": v.context_id})
        else:
            await self._set(tx, v, "failed", completed_at=iso(now),
                            reason=f"{why} (after {v.attempts} attempt{'s' if v.attempts > 1 else ''})")
            log.warning("%s: %s; no retries left", v.vm_name, why, extra={"resource": v.context_id})

    async def _release_retries(self, tx: Tx, open_vms: list[_Open], now: datetime, touched: set[int]) -> None:
        for v in open_vms:
            if v.status == "retry_wait" and v.retry_at is not None and v.retry_at <= iso(now):
                await self._set(tx, v, "pending", retry_at=None)
                touched.add(v.execution_id)

    async def _drop_ineligible(self, tx: Tx, open_vms: list[_Open], now: datetime, touched: set[int]) -> None:
        """A VM that left the schedule's groups, was switched off or deleted since the run began is skipped."""
        waiting = [v for v in open_vms if v.status == "pending"]
        if not waiting:
            return
        still = {(r["vm_context_id"], r["schedule_id"]) for r in await tx.fetchall(
            "SELECT DISTINCT m.vm_context_id, g.schedule_id FROM vm_group_memberships m "
            "JOIN vm_machine_groups g ON g.id = m.group_id "
            "JOIN vm_replication_contexts c ON c.context_id = m.vm_context_id "
            "WHERE m.enabled = 1 AND c.scheduler_enabled = 1 AND m.vm_context_id IN "
            "(SELECT value FROM json_each(?))", (json.dumps(sorted({v.context_id for v in waiting})),))}
        for v in waiting:
            if (v.context_id, v.schedule_id) not in still:
                await self._set(tx, v, "skipped", completed_at=iso(now),
                                reason="skipped: no longer protected by this schedule (left its groups, "
                                       "disabled, or deleted)")
                touched.add(v.execution_id)

    async def _dispatch(self, open_vms: list[_Open], schedules: dict[str, dict[str, Any]], now: datetime,
                        report: TickReport, touched: set[int]) -> None:
        """Start the waiting VMs in order while the schedule's and each group's limits allow."""
        waiting = [v for v in open_vms if v.status == "pending"]
        if not waiting:
            return
        per_schedule = Counter(v.schedule_id for v in open_vms if v.status == "running")
        per_group = Counter(v.group_id for v in open_vms if v.status == "running")
        limits = {r["id"]: r["max_concurrent_vms"] for r in await self.db.fetchall(
            "SELECT id, max_concurrent_vms FROM vm_machine_groups WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted({v.group_id for v in waiting})),))}
        busy = {r["context_id"]: r["id"] for r in await self.db.fetchall(
            "SELECT context_id, id FROM jobs WHERE status IN ('pending', 'running') AND context_id IS NOT NULL")}
        started: list[tuple[str, str]] = []
        try:
            await self._start_waiting(waiting, schedules, limits, busy, per_schedule, per_group, started, now,
                                      report, touched)
        finally:
            if started:  # informational, so written once per tick rather than once per job
                async with self.db.transaction() as tx:
                    await tx.executemany("UPDATE vm_replication_contexts SET last_scheduled_job_id = ? "
                                         "WHERE context_id = ?", started)

    async def _start_waiting(self, waiting: list[_Open], schedules: dict[str, dict[str, Any]],
                             limits: dict[str, int], busy: dict[str, str], per_schedule: Counter[str],
                             per_group: Counter[str], started: list[tuple[str, str]], now: datetime,
                             report: TickReport, touched: set[int]) -> None:
        for v in waiting:
            if self._stopping:
                break  # omad stops: the VMs left wait for the next start
            schedule = schedules[v.schedule_id]
            if per_schedule[v.schedule_id] >= schedule["max_concurrent_jobs"]:
                continue
            if per_group[v.group_id] >= limits.get(v.group_id, schedule["max_concurrent_jobs"]):
                continue
            if v.context_id in busy:
                await self._note_wait(v, f"waiting: the VM is busy with job {busy[v.context_id]}")
                continue
            if v.schedule_id in self._halted:
                continue  # disabled while this tick ran: its waiting VMs were skipped meanwhile
            target = target_of(schedule)
            try:
                job_id = await self._launch(v, target)
            except Conflict as e:
                busy[v.context_id] = "?"
                await self._note_wait(v, f"waiting: {e.details}")
                continue
            except OmaError as e:
                async with self.db.transaction() as tx:
                    v.attempts += 1
                    await tx.execute("UPDATE schedule_execution_vms SET start_failures = start_failures + 1 "
                                     "WHERE execution_id = ? AND vm_context_id = ?", (v.execution_id, v.context_id))
                    await self._set(tx, v, v.status, attempts=v.attempts)
                    await self._failed_attempt(tx, v, schedule, now, f"start refused: {e}")
                touched.add(v.execution_id)
                continue
            async with self.db.transaction() as tx:
                v.attempts += 1
                v.job_id = job_id
                await self._set(tx, v, "running", attempts=v.attempts, job_id=job_id, retry_at=None, reason=None,
                                started_at=iso(now))
                await tx.execute("INSERT INTO schedule_execution_jobs (job_id, execution_id, vm_context_id, attempt, "
                                 "status, created_at) VALUES (?, ?, ?, ?, 'running', ?)",
                                 (job_id, v.execution_id, v.context_id, v.attempts, iso(now)))
            started.append((job_id, v.context_id))
            busy[v.context_id] = job_id
            per_schedule[v.schedule_id] += 1
            per_group[v.group_id] += 1
            report.started += 1
            touched.add(v.execution_id)

    async def _launch(self, v: _Open, target: Target) -> str:
        launcher = self.launchers.get(target.action)
        if launcher is None:
            raise Invalid("action not available", f"this omad cannot start a {target.action}")
        try:
            job_id = await launcher.start(VmRef(v.context_id, v.vm_name or ""), target)
        except OmaError:
            raise
        except Exception as e:  # a launcher bug must not stop the scheduler: the attempt fails, visibly
            log.exception("launcher failed", extra={"resource": v.context_id})
            raise OmaError("internal error", f"starting the {target.action} failed unexpectedly: {e}") from e
        log.info("%s: %s job %s started (schedule %r, attempt %d)", v.vm_name, target.action, job_id,
                 target.schedule_name, v.attempts + 1, extra={"resource": v.context_id})
        return job_id

    async def _note_wait(self, v: _Open, reason: str) -> None:
        if v.reason != reason:  # written once per change, not every tick
            async with self.db.transaction() as tx:
                await self._set(tx, v, v.status, reason=reason)

    @staticmethod
    async def _set(tx: Tx, v: _Open, status: str, **columns: Any) -> None:
        """Change one execution VM, in memory and in the database."""
        v.status = status
        for key in ("retry_at", "reason", "job_id", "attempts"):
            if key in columns:
                setattr(v, key, columns[key])
        sets = ["status = ?"] + [f"{k} = ?" for k in columns if k != "started_at"]
        params: list[Any] = [status] + [columns[k] for k in columns if k != "started_at"]
        if "started_at" in columns:
            sets.append("started_at = COALESCE(started_at, ?)")
            params.append(columns["started_at"])
        # The column names come from this module's own keyword arguments, never from input.
        await tx.execute(f"UPDATE schedule_execution_vms SET {', '.join(sets)} "
                         "WHERE execution_id = ? AND vm_context_id = ?", (*params, v.execution_id, v.context_id))

    @staticmethod
    async def _recount(tx: Tx, execution_id: int) -> None:
        """The counts, from the rows they count: they always match the jobs the execution created."""
        await tx.execute(
            "UPDATE schedule_executions SET "
            "jobs_created = (SELECT COUNT(*) FROM schedule_execution_jobs WHERE execution_id = :id), "
            "jobs_completed = (SELECT COUNT(*) FROM schedule_execution_jobs WHERE execution_id = :id "
            "AND status = 'completed'), "
            "jobs_failed = (SELECT COUNT(*) FROM schedule_execution_jobs WHERE execution_id = :id "
            "AND status = 'failed'), "
            "jobs_skipped = (SELECT COUNT(*) FROM schedule_execution_vms WHERE execution_id = :id "
            "AND status = 'skipped'), "
            "start_failures = (SELECT COALESCE(SUM(start_failures), 0) FROM schedule_execution_vms "
            "WHERE execution_id = :id) WHERE id = :id", {"id": execution_id})

    async def _close(self, tx: Tx, execution_id: int, now: datetime) -> None:
        counts = {r["status"]: r["n"] for r in await tx.fetchall(
            "SELECT status, COUNT(*) AS n FROM schedule_execution_vms WHERE execution_id = ? GROUP BY status",
            (execution_id,))}
        cancelled = await tx.scalar("SELECT 1 FROM schedule_execution_vms WHERE execution_id = ? AND "
                                    "reason LIKE 'cancelled:%' LIMIT 1", (execution_id,))
        done, failed, skipped = counts.get("completed", 0), counts.get("failed", 0), counts.get("skipped", 0)
        status = "failed" if failed else "completed" if done else "cancelled" if cancelled else "skipped"
        message = f"{done} of {done + failed + skipped} VM(s) protected, {failed} failed, {skipped} skipped"
        await tx.execute("UPDATE schedule_executions SET status = ?, completed_at = ?, message = ? WHERE id = ?",
                         (status, iso(now), message, execution_id))
        log.info("execution %d %s: %s", execution_id, status, message, extra={"resource": str(execution_id)})
