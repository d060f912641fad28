"""The scheduler inside omad: fires due schedules, turns their groups' VMs into jobs within the limits, follows
the jobs through the `jobs` table, retries failures, and closes each execution with its counts.

All state lives in the database (schedules.next_run_at, schedule_executions, schedule_execution_vms), and one
`tick()` moves everything forward from whatever it finds — so a restarted omad simply carries on: running
executions continue, and a run missed while omad was down runs once, recorded as late.

Per VM there is never more than one job: a VM with an active job in `jobs` (from another schedule, an API
call, anything) waits for it to end — or, for an action whose launcher `skips_busy` (replication), is skipped
in this run — and a launcher's Conflict (the domain's own per-VM check) means the same.

Ticks are serialised by one lock, held only to decide and to record: a tick opens the due executions, follows
the jobs and chooses the VMs to start (within the limits), then the starts run outside the lock — up to
`start_concurrency` at once across every schedule, since one start can take seconds (a replication's first sync
creates and attaches CloudStack volumes) — and each outcome is recorded under the lock as it comes. A VM whose
start is in flight is still `pending` in the database and known to this process only: ticks meanwhile leave it
alone and count it against the limits, and if omad ends before its outcome is recorded it is started again
after the restart (the domain refuses a VM it is still working on, as busy), as a start cut short always was.
A recording that fails (the database locked or the disk full) is tried again a few times, then at every tick
before anything else: until it is written its VMs stay in flight, so none is started twice for one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from oma_common.errors import Conflict, Invalid, OmaError

from ..audit import Audit
from ..store import groups as group_store
from ..store import jobs as job_store
from ..store import schedules as store
from ..store.db import Database, Tx
from ..store.schedules import (AttemptStatus, ExecutionStatus, NewExecution, OpenVm, Schedule, Started, VmKey,
                               VmStatus)
from . import cron
from .clock import Clock, iso, parse_iso
from .launcher import JobLauncher, Outcome, Start, StartSlots, Target, VmRef
from .schedules import load_execution, target_of

log = logging.getLogger(__name__)

# What counts as a job that succeeded: "succeeded" is no status omad writes, but rows from other writers use it.
SUCCEEDED = (job_store.JobStatus.COMPLETED, "succeeded")
MISSED_COUNT_LIMIT = 1000  # how many missed due times a late run bothers to count


@dataclasses.dataclass
class TickReport:
    """What one tick did."""

    fired: int = 0  # executions opened by due schedules (running or recorded as skipped)
    started: int = 0  # jobs created (counted as the starts, which outlive the tick's lock, are recorded)
    finished: int = 0  # jobs seen ending
    closed: int = 0  # executions ended


@dataclasses.dataclass
class _Open:
    """One VM of a running execution that is not done yet: its row as read, and its state as this tick changes
    it."""

    row: OpenVm
    status: str
    attempts: int
    job_id: str | None
    retry_at: str | None
    reason: str | None

    @classmethod
    def of(cls, row: OpenVm) -> _Open:
        return cls(row, row.status, row.attempts, row.job_id, row.retry_at, row.reason)

    @property
    def key(self) -> VmKey:
        return self.row.execution_id, self.row.context_id


@dataclasses.dataclass
class _Ended:
    """A start that ended, waiting to be recorded."""

    vm: _Open
    outcome: Outcome | None  # None: not begun, its schedule was disabled meanwhile
    target: Target
    schedule: Schedule
    skips_busy: bool
    report: TickReport


@dataclasses.dataclass
class _Round:
    """What a tick's choice or a set of ended starts did, written in one transaction."""

    started: list[Started] = dataclasses.field(default_factory=list)
    refused: list[tuple[_Open, OmaError]] = dataclasses.field(default_factory=list)
    waits: list[tuple[_Open, str]] = dataclasses.field(default_factory=list)
    skips: list[tuple[_Open, str]] = dataclasses.field(default_factory=list)  # busy VMs of a launcher that skips
    final: dict[VmKey, str] = dataclasses.field(default_factory=dict)  # refused starts not retried, and why


class Scheduler:
    def __init__(self, db: Database, audit: Audit, launchers: Mapping[str, JobLauncher], clock: Clock, *,
                 poll_seconds: float = 5.0, late_after_seconds: float = 60.0, idle_seconds: float = 60.0,
                 stop_grace_seconds: float = 10.0, start_concurrency: int = 4,
                 record_retry_seconds: Sequence[float] = (0.25, 1.0, 4.0)) -> None:
        self.db = db
        self.audit = audit
        self.launchers = launchers
        self.clock = clock
        self.poll_seconds = poll_seconds  # how often running jobs are looked at
        self.late_after_seconds = late_after_seconds  # a run started later than this after its due time is late
        self.idle_seconds = idle_seconds  # longest sleep with nothing due: bounds the effect of a clock step
        self.stop_grace_seconds = stop_grace_seconds  # how long stop() lets the starts in progress finish
        # The pauses before each new try of a failed recording of the starts' outcomes (the database locked by
        # another process, the disk full); after the last, each tick tries again.
        self.record_retry_seconds = tuple(record_retry_seconds)
        self._stopping = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ticks = 0
        self._ticked = asyncio.Condition()
        # Schedules disabled with starts in flight (or since the tick began), and why: their starts that have not
        # begun do not begin (their VMs are recorded skipped with that reason), those begun are recorded as they
        # end, but a busy VM or a refused start is not asked again.
        self._halted: dict[str, str] = {}
        # Starts run outside the lock, this many at once; one waiting for its turn does not begin once its
        # schedule is disabled.
        self._slots = StartSlots(start_concurrency, lambda one: one.target.schedule_id not in self._halted)
        self._in_flight: dict[VmKey, _Open] = {}  # chosen VMs whose start's outcome is not recorded yet
        self._launches: set[asyncio.Task[bool]] = set()
        self._ended: list[_Ended] = []  # starts that ended, not recorded yet
        self._recorder: asyncio.Task[None] | None = None

    # -- service -------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        self._slots.reopen()
        await self._schedule_unscheduled()
        self._task = asyncio.ensure_future(self._run())
        log.info("scheduler started")

    async def stop(self) -> None:
        """Start nothing more; let the starts in progress finish and be recorded, then end the loop."""
        self._stopping = True
        self._slots.close()
        self._wake.set()
        tasks: set[asyncio.Task[Any]] = set(self._launches)
        if self._task is not None:
            tasks.add(self._task)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.stop_grace_seconds)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if late:
                log.warning("scheduler stopped while starting jobs; their VMs run again after the restart")
        await self._all_recorded()  # what ended before the grace ran out
        if self._ended:  # the recorder gave up on them: one last try
            async with self._lock:
                error = await self._record_now()
            if error is not None:
                self._unrecorded(error, "lost as omad stops: their VMs are started again after the restart (the "
                                        "domain refuses one whose job still runs, as busy)")
        self._task = None
        log.info("scheduler stopped; running executions continue at the next start")

    def wake(self) -> None:
        """Something changed (a schedule, a group, a trigger): look again now rather than at the next poll."""
        self._wake.set()

    @contextlib.asynccontextmanager
    async def disabling(self) -> AsyncIterator[Callable[[str, str], list[VmKey]]]:
        """Around a transaction that may disable schedules: no tick decides or records meanwhile (the lock; the
        starts in progress run on, so this waits for no start). It yields `halt(schedule_id, reason)`, to call
        when the schedule is disabled: its starts waiting for a slot will not begin (their VMs are recorded
        skipped with `reason`), and it returns the VMs whose start is in flight, which the transaction must
        leave `pending` for their outcome to be recorded. If the transaction fails, nothing was halted."""
        async with self._lock:
            before = dict(self._halted)
            try:
                yield self._halt
            except BaseException:
                self._halted = before
                raise

    def _halt(self, schedule_id: str, reason: str) -> list[VmKey]:
        self._halted[schedule_id] = reason
        queued = {(s.execution_id, s.vm.context_id) for s in self._slots.queued}  # will not begin now
        return [key for key, v in self._in_flight.items() if v.row.schedule_id == schedule_id and key not in queued]

    async def wait_ticks(self, count: int) -> None:
        """Return once `count` ticks have completed since start and the starts in flight are recorded (tests
        drive the loop with a fake clock)."""
        async with self._ticked:
            await self._ticked.wait_for(lambda: self._ticks >= count)
        while self._launches:
            await asyncio.wait(set(self._launches))

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self._step(TickReport(), set())  # its starts run on; one that frees a slot wakes the loop
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
        if await store.any_running(self.db):
            delay = min(delay, self.poll_seconds)
        due = await store.next_due(self.db)
        if due:
            delay = min(delay, max(0.0, (parse_iso(due) - self.clock.now()).total_seconds()))
        return delay

    async def _schedule_unscheduled(self) -> None:
        """Enabled schedules without a next run (written by hand, or unusable before) get one from now."""
        now = self.clock.now()
        async with self.db.transaction() as tx:
            for s in await store.unscheduled(tx):
                at = self._next(s, now)
                if at is not None:
                    await store.set_next_run(tx, s.id, iso(at))
            await store.refresh_next_scheduled(tx)

    @staticmethod
    def _next(s: Schedule, after: datetime) -> datetime | None:
        try:
            return cron.parse(s.cron_expression).next_after(after, cron.zone(s.timezone))
        except Invalid as e:  # e.g. a time zone that a tzdata upgrade removed
            log.error("schedule %r cannot be computed: %s", s.name, e.details, extra={"resource": s.id})
            return None

    # -- one tick ------------------------------------------------------------------------------------

    async def tick(self) -> TickReport:
        """Fire what is due, move every running execution forward and start what may start; return once this
        tick's starts are recorded, or their recording given up to the next tick (other ticks run meanwhile: the
        lock is not held while starting). A start
        refused frees its slot, so the tick looks again at the VMs the limits held back; every VM is tried at
        most once per tick. Safe to call at any time."""
        report = TickReport()
        tried: set[VmKey] = set()
        while True:
            launches = await self._step(report, tried)
            if not launches:
                break
            await asyncio.wait(launches)  # not cancelled with this call: they are the scheduler's
            if self._stopping or not any(t.result() for t in launches if not t.cancelled()):
                break
        return report

    async def _step(self, report: TickReport, tried: set[VmKey]) -> list[asyncio.Task[bool]]:
        """Under the lock: fire what is due, follow the running executions, choose the VMs to start; returns
        the tasks starting them."""
        async with self._lock:
            # What was disabled before now is in the database this step reads; a schedule with starts in
            # flight stays halted for them.
            flying = {v.row.schedule_id for v in self._in_flight.values()}
            self._halted = {k: why for k, why in self._halted.items() if k in flying}
            if self._ended and (self._recorder is None or self._recorder.done()):  # the recorder gave up on them
                error = await self._record_now()
                if error is not None:
                    self._unrecorded(error, "kept for the next tick; their VMs stay pending, started by no one")
            now = self.clock.now()
            await self._fire_due(now, report)
            launches = await self._advance(now, report, tried)
        async with self._ticked:
            self._ticks += 1
            self._ticked.notify_all()
        return launches

    async def trigger(self, schedule_id: str, *, actor: str) -> dict[str, Any]:
        """Run a schedule now (enabled or not); 409 while it runs and skip_if_running is on."""
        async with self._lock:
            now = self.clock.now()
            async with self.db.transaction() as tx:
                s = await store.get(tx, schedule_id)
                running = await store.running_execution(tx, schedule_id)
                if running and s.skip_if_running:
                    raise Conflict("schedule is running", f"schedule {s.name!r} is still running (execution "
                                                          f"{running}) and skips runs meanwhile (skip_if_running)",
                                   execution_id=running)
                vms = (await group_store.eligible(tx, [schedule_id]))[schedule_id]
                [execution_id] = await self._open(tx, [(s, self._execution(
                    s, vms, running, scheduled_at=now, now=now, triggered_by=f"manual:{actor}", late=False,
                    missed=0))])
                await self.audit.record(actor, "schedule.trigger", f"schedule:{schedule_id}", tx=tx,
                                        execution_id=execution_id)
        self.wake()
        return await load_execution(self.db, execution_id)

    async def _fire_due(self, now: datetime, report: TickReport) -> None:
        """Open an execution for every due schedule, all in one transaction."""
        due = await store.due(self.db, iso(now))
        if not due:
            return
        async with self.db.transaction() as tx:
            eligible = await group_store.eligible(tx, [s.id for s in due])
            running = await store.running_execution_of(tx, [s.id for s in due])
            fired: list[tuple[str, str | None]] = []  # (schedule, its next run)
            opening: list[tuple[Schedule, NewExecution]] = []
            for s in due:
                assert s.next_run_at is not None
                at = parse_iso(s.next_run_at)
                following = self._next(s, now)
                late = (now - at).total_seconds() > self.late_after_seconds
                missed = 0
                if late and following is not None:  # one run stands for every due time missed meanwhile
                    missed = len(cron.parse(s.cron_expression).runs_between(at, now, cron.zone(s.timezone),
                                                                            MISSED_COUNT_LIMIT))
                opening.append((s, self._execution(s, eligible[s.id], running.get(s.id), scheduled_at=at, now=now,
                                                   triggered_by="scheduler", late=late, missed=missed)))
                fired.append((s.id, iso(following) if following else None))
            report.fired += len(await self._open(tx, opening))
            await store.fired(tx, fired, at=iso(now))
            await store.refresh_next_scheduled(tx)

    @staticmethod
    def _execution(s: Schedule, vms: list[tuple[str, str]], running: int | None, *, scheduled_at: datetime,
                   now: datetime, triggered_by: str, late: bool, missed: int) -> NewExecution:
        """An execution of `vms` (the eligible ones, in order): running, or skipped with the reason (the
        schedule's `running` execution goes on and skip_if_running is set, or no VM is eligible)."""
        message = None
        if running and s.skip_if_running:
            message = f"skipped: the previous run (execution {running}) is still running"
        elif not vms:
            message = "skipped: no enabled VM is in a group that uses this schedule"
        return NewExecution(s.id, iso(scheduled_at), iso(now), triggered_by, late, missed, vms,
                            skipped_because=message)

    @staticmethod
    async def _open(tx: Tx, opening: list[tuple[Schedule, NewExecution]]) -> list[int]:
        """Record the executions (in one batch); returns their ids in order."""
        ids = await store.open_executions(tx, [new for _, new in opening])
        for (s, new), execution_id in zip(opening, ids):
            status = ExecutionStatus.SKIPPED if new.skipped_because else ExecutionStatus.RUNNING
            lateness = ""
            if new.late:
                seconds = (parse_iso(new.started_at) - parse_iso(new.scheduled_at)).total_seconds()
                lateness = f", {seconds:.0f} s late ({new.missed_runs} more missed)"
            tx.after_commit(functools.partial(  # the journal names only executions that were stored
                log.info, "schedule %r: execution %d %s, %d VM(s)%s%s", s.name, execution_id, status, len(new.vms),
                lateness, f" — {new.skipped_because}" if new.skipped_because else "", extra={"resource": s.id}))
        return ids

    # -- running executions --------------------------------------------------------------------------

    async def _advance(self, now: datetime, report: TickReport, tried: set[VmKey]) -> list[asyncio.Task[bool]]:
        executions = await store.running_executions(self.db)
        if not executions:
            return []
        open_vms = [_Open.of(r) for r in await store.open_vms(self.db)]
        schedules = await store.with_running_execution(self.db)
        touched: set[int] = set()
        async with self.db.transaction() as tx:
            await self._collect_finished(tx, open_vms, schedules, now, report, touched)
            await self._release_retries(tx, open_vms, now, touched)
            await self._drop_ineligible(tx, open_vms, now, touched)
        launches = await self._dispatch(open_vms, schedules, now, report, touched, tried)
        listed = {v.row.execution_id for v in open_vms}  # executions with VMs left when the tick began
        # (a VM whose start is in flight is pending: its execution stays open)
        still_open = {v.row.execution_id for v in open_vms if v.status in store.OPEN}
        async with self.db.transaction() as tx:
            await store.recount(tx, [e.id for e in executions if e.id in touched or e.id not in listed])
            for i in [e.id for e in executions if e.id not in still_open]:
                await self._close(tx, i, now)
                report.closed += 1
        return launches

    async def _collect_finished(self, tx: Tx, open_vms: list[_Open], schedules: Mapping[str, Schedule],
                                now: datetime, report: TickReport, touched: set[int]) -> None:
        """Jobs that ended since the last look: the VM is done, or waits for a retry."""
        running = [v for v in open_vms if v.status == VmStatus.RUNNING]
        if not running:
            return
        jobs = await job_store.outcomes(tx, [v.job_id or "" for v in running])
        ended: list[tuple[str, AttemptStatus]] = []
        completed: list[_Open] = []
        for v in running:
            job = jobs.get(v.job_id or "")
            if job is not None and job.status in job_store.ACTIVE:
                continue
            ok = job is not None and job.status in SUCCEEDED
            ended.append((v.job_id or "", AttemptStatus.COMPLETED if ok else AttemptStatus.FAILED))
            report.finished += 1
            touched.add(v.row.execution_id)
            if ok:
                completed.append(v)
            else:
                why = "its job row disappeared" if job is None else \
                    f"{job.status}{': ' + job.error_message if job.error_message else ''}"
                await self._failed_attempt(tx, v, schedules[v.row.schedule_id], now, f"job {v.job_id} {why}")
        # The common case in bulk: every VM of a large execution may end between two polls.
        await store.attempts_ended(tx, ended, at=iso(now))
        await store.vms_completed(tx, [v.key for v in completed], at=iso(now))
        for v in completed:
            v.status, v.reason = VmStatus.COMPLETED, None

    @staticmethod
    async def _failed_attempt(tx: Tx, v: _Open, schedule: Schedule, now: datetime, why: str, *,
                              not_retried: str | None = None) -> None:
        """A failed job or a refused start: retry after the schedule's delay while attempts remain — none when
        `not_retried` says why, nor while the schedule is disabled (in a run started by hand too: a disabled
        schedule starts nothing on its own)."""
        if not_retried is None and not schedule.enabled:
            not_retried = "the schedule is disabled"
        if not_retried:
            v.status, v.reason = VmStatus.FAILED, f"{why}; not retried ({not_retried})"
            await store.vm_failed(tx, v.key, reason=v.reason, at=iso(now))
            tx.after_commit(functools.partial(log.warning, "%s: %s; not retried", v.row.vm_name, why,
                                              extra={"resource": v.row.context_id}))
        elif v.attempts <= schedule.retry_attempts:
            at = iso(now + timedelta(minutes=schedule.retry_delay_minutes))
            v.status, v.retry_at = VmStatus.RETRY_WAIT, at
            v.reason = f"{why}; retry {v.attempts} of {schedule.retry_attempts} at {at}"
            await store.vm_retry_wait(tx, v.key, retry_at=at, reason=v.reason)
            tx.after_commit(functools.partial(log.info, "%s: %s; retrying at %s", v.row.vm_name, why, at,
                                              extra={"resource": v.row.context_id}))
        else:
            v.status = VmStatus.FAILED
            v.reason = f"{why} (after {v.attempts} attempt{'s' if v.attempts > 1 else ''})"
            await store.vm_failed(tx, v.key, reason=v.reason, at=iso(now))
            tx.after_commit(functools.partial(log.warning, "%s: %s; no retries left", v.row.vm_name, why,
                                              extra={"resource": v.row.context_id}))

    @staticmethod
    async def _release_retries(tx: Tx, open_vms: list[_Open], now: datetime, touched: set[int]) -> None:
        for v in open_vms:
            if v.status == VmStatus.RETRY_WAIT and v.retry_at is not None and v.retry_at <= iso(now):
                v.status, v.retry_at = VmStatus.PENDING, None
                await store.vm_released(tx, v.key)
                touched.add(v.row.execution_id)

    async def _drop_ineligible(self, tx: Tx, open_vms: list[_Open], now: datetime, touched: set[int]) -> None:
        """A VM that left the schedule's groups, was switched off or deleted since the run began is skipped
        (one whose start is in flight gets its outcome recorded first)."""
        waiting = [v for v in open_vms if v.status == VmStatus.PENDING and v.key not in self._in_flight]
        if not waiting:
            return
        still = await group_store.protected(tx, [v.row.context_id for v in waiting])
        gone = [v for v in waiting if (v.row.context_id, v.row.schedule_id) not in still]
        for v in gone:
            v.status = VmStatus.SKIPPED
            v.reason = "skipped: no longer protected by this schedule (left its groups, disabled, or deleted)"
            touched.add(v.row.execution_id)
        await store.vms_skipped(tx, [(v.key, v.reason or "") for v in gone], at=iso(now))

    # -- starting jobs -------------------------------------------------------------------------------

    async def _dispatch(self, open_vms: list[_Open], schedules: Mapping[str, Schedule], now: datetime,
                        report: TickReport, touched: set[int], tried: set[VmKey]) -> list[asyncio.Task[bool]]:
        """Choose the waiting VMs to start, in order, while the schedule's and each group's limits allow
        (assuming each start succeeds), and start them outside the lock: one task per action, through its
        launcher's `start_many`. A VM whose start is in flight holds its slot and is left alone."""
        waiting = [v for v in open_vms if v.status == VmStatus.PENDING and v.key not in self._in_flight]
        if not waiting or self._stopping:
            return []
        flying = list(self._in_flight.values())  # pending in the database: counted here, not in open_vms
        taking = [v for v in open_vms if v.status == VmStatus.RUNNING] + flying
        per_schedule = Counter(v.row.schedule_id for v in taking)
        per_group = Counter(v.row.group_id for v in taking)
        limits = await group_store.limits(self.db, [v.row.group_id for v in waiting])
        busy = await job_store.busy_contexts(self.db)
        done = _Round()
        claimed = {v.row.context_id for v in flying}  # looked at again once that start's outcome is known
        chosen = self._choose(waiting, schedules, limits, busy, per_schedule, per_group, tried, claimed, done)
        await self._record(done, schedules, now, touched)  # the busy VMs: skipped, or why they wait
        for v in chosen:
            self._in_flight[v.key] = v
        return [self._launch(action, batch, schedules, report)
                for action, batch in _by_action(chosen, schedules).items()]

    def _choose(self, waiting: list[_Open], schedules: Mapping[str, Schedule], limits: Mapping[str, int],
                busy: dict[str, str], per_schedule: Counter[str], per_group: Counter[str], tried: set[VmKey],
                claimed: set[str], done: _Round) -> list[_Open]:
        """The VMs this step starts, in order, with their slots taken. `claimed`: VMs with a start in flight,
        and those chosen here (a VM may wait in two schedules' executions)."""
        chosen: list[_Open] = []
        for v in waiting:
            if v.key in tried or v.status != VmStatus.PENDING:
                continue
            schedule = schedules[v.row.schedule_id]
            if per_schedule[v.row.schedule_id] >= schedule.max_concurrent_jobs:
                continue
            if per_group[v.row.group_id] >= limits.get(v.row.group_id, schedule.max_concurrent_jobs):
                continue
            if v.row.context_id in claimed:
                continue  # looked at again once its other start's outcome is known
            if v.row.schedule_id in self._halted:
                continue  # disabled meanwhile: its waiting VMs were skipped in the database
            if v.row.context_id in busy:
                tried.add(v.key)
                why = f"the VM is busy with job {busy[v.row.context_id]}"
                if self._skips_busy(schedule.action):
                    done.skips.append((v, f"skipped: {why}"))
                else:
                    done.waits.append((v, f"waiting: {why}"))
                continue
            tried.add(v.key)
            claimed.add(v.row.context_id)
            per_schedule[v.row.schedule_id] += 1
            per_group[v.row.group_id] += 1
            chosen.append(v)
        return chosen

    def _skips_busy(self, action: str) -> bool:
        launcher = self.launchers.get(action)
        return launcher is not None and launcher.skips_busy

    def _launch(self, action: str, batch: list[_Open], schedules: Mapping[str, Schedule], report: TickReport
                ) -> asyncio.Task[bool]:
        task = asyncio.ensure_future(self._starts(action, batch, dict(schedules), report))
        self._launches.add(task)
        task.add_done_callback(self._launches.discard)
        return task

    async def _starts(self, action: str, batch: list[_Open], schedules: Mapping[str, Schedule],
                      report: TickReport) -> bool:
        """Start the batch through the action's launcher, outside the lock; each outcome goes to the recorder
        as it comes. Returns whether a start ended without a job (its slot is free for another VM)."""
        launcher = self.launchers.get(action)
        skips_busy = launcher is not None and launcher.skips_busy
        starts = {Start(VmRef(v.row.context_id, v.row.vm_name or ""), target_of(schedules[v.row.schedule_id]),
                        v.row.execution_id, v.row.group_id): v for v in batch}
        reported: set[Start] = set()
        freed = left = False  # a slot freed; a VM left `pending` without a job (skipped, or refused and counted)

        def ended(start: Start, outcome: Outcome | None) -> None:
            nonlocal freed, left
            reported.add(start)
            v = starts[start]
            freed |= isinstance(outcome, OmaError)
            left |= outcome is None or isinstance(outcome, OmaError) and (
                skips_busy or not isinstance(outcome, Conflict) or v.row.schedule_id in self._halted)
            self._post(_Ended(v, outcome, start.target, schedules[v.row.schedule_id], skips_busy, report))

        try:
            if launcher is None:
                for start in starts:
                    ended(start, Invalid("action not available", f"this omad cannot start a {action}"))
            else:
                async with contextlib.aclosing(launcher.start_many(list(starts), self._slots)) as outcomes:
                    async for start, outcome in outcomes:
                        ended(start, outcome)
        except Exception as e:  # a launcher bug must not stop the scheduler: the attempts fail, visibly
            log.exception("launcher failed", extra={"resource": action})
            for start in starts:
                if start not in reported:
                    ended(start, OmaError("internal error", f"starting the {action} failed unexpectedly: {e}"))
        finally:
            for start, v in list(starts.items()):
                if start in reported:
                    continue
                if v.row.schedule_id in self._halted:  # not begun (or cut short), its schedule disabled: skipped
                    ended(start, None)
                else:  # not begun or cut short as omad stops: it stays pending, started again after the restart
                    self._in_flight.pop(v.key, None)
        await self._all_recorded()
        if left:
            self.wake()  # a VM the limits held back may start now (a VM that waits for a busy one does not)
        return freed

    def _post(self, ended: _Ended) -> None:
        self._ended.append(ended)
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.ensure_future(self._record_ended())

    async def _record_ended(self) -> None:
        """Record the starts that ended: at each turn of the lock, all that came meanwhile in one transaction. One
        that fails is tried again after each pause of `record_retry_seconds`, outside the lock; after the last,
        the outcomes stay unrecorded and in flight (their VMs `pending`, left alone by the ticks and counted
        against the limits), and each tick tries them again before it decides anything. So a VM is never
        started twice for one outcome, and its run stays open until its job is recorded and followed."""
        failures = 0
        while self._ended:
            async with self._lock:
                error = await self._record_now()
            if error is None:
                failures = 0
            elif failures < len(self.record_retry_seconds):
                pause = self.record_retry_seconds[failures]
                failures += 1
                self._unrecorded(error, f"trying again in {pause:.2f} s (try {failures + 1} of "
                                        f"{len(self.record_retry_seconds) + 1})", level=logging.WARNING)
                await asyncio.sleep(pause)  # real time: the database's trouble, not the schedule's clock
            else:
                self._unrecorded(error, "kept for the next tick; their VMs stay pending, started by no one")
                return

    async def _record_now(self) -> Exception | None:
        """Under the lock: record every ended start waiting, in one transaction; returns why it failed, if it did
        (they then wait for the next try, as they were)."""
        batch, self._ended = self._ended, []
        if not batch:
            return None
        done = _Round()
        for e in batch:  # on a copy of the VM: a failed try leaves it as it was chosen, for the next
            self._started_or_refused(dataclasses.replace(e.vm), e.outcome, e.target, done, e.skips_busy,
                                     self._halted.get(e.vm.row.schedule_id))
        try:
            await self._record(done, {e.vm.row.schedule_id: e.schedule for e in batch}, self.clock.now(), set(),
                               recount=True)
        except Exception as error:  # noqa: BLE001 - whatever failed, the outcomes must not be lost
            self._ended = batch + self._ended
            return error
        for e in batch:
            self._in_flight.pop(e.vm.key, None)
            e.report.started += isinstance(e.outcome, str)
        return None

    def _unrecorded(self, error: Exception, then: str, *, level: int = logging.ERROR) -> None:
        """Log the outcomes not recorded, one line per run, with the jobs they started."""
        runs: dict[int, list[_Ended]] = {}
        for e in self._ended:
            runs.setdefault(e.vm.row.execution_id, []).append(e)
        for execution_id, ended in runs.items():
            jobs = ", ".join(f"{e.vm.row.vm_name}: {e.outcome if isinstance(e.outcome, str) else 'no job'}"
                             for e in ended)
            log.log(level, "schedule %r, execution %d: the outcome of %d start(s) (%s) could not be recorded: %s; "
                           "%s", ended[0].schedule.name, execution_id, len(ended), jobs,
                    str(error) or type(error).__name__, then, extra={"resource": ended[0].schedule.id})

    async def _all_recorded(self) -> None:
        """Return once every start that ended is recorded."""
        while self._recorder is not None and not self._recorder.done():
            await asyncio.shield(self._recorder)

    @staticmethod
    def _started_or_refused(v: _Open, outcome: Outcome | None, target: Target, done: _Round, skips_busy: bool,
                            halted: str | None) -> None:
        """Note an ended start in `done`. `halted`: why its schedule was disabled while the start ran — a job
        started is followed like any other, but a start not begun or refused as busy is skipped, and a refused
        one is not retried."""
        if outcome is None:
            done.skips.append((v, halted or "skipped: its start did not begin"))
        elif isinstance(outcome, Conflict) and (skips_busy or halted):
            done.skips.append((v, f"{halted}; {outcome.details}" if halted else f"skipped: {outcome.details}"))
        elif isinstance(outcome, Conflict):
            done.waits.append((v, f"waiting: {outcome.details}"))
            done.refused.append((v, outcome))
        elif isinstance(outcome, OmaError):
            done.refused.append((v, outcome))
            if halted:
                done.final[v.key] = halted
        else:
            v.attempts += 1
            v.status, v.job_id, v.retry_at, v.reason = VmStatus.RUNNING, outcome, None, None
            done.started.append(Started(v.row.execution_id, v.row.context_id, v.attempts, outcome))
            log.info("%s: %s job %s started (schedule %r, attempt %d)", v.row.vm_name, target.action, outcome,
                     target.schedule_name, v.attempts, extra={"resource": v.row.context_id})

    async def _record(self, done: _Round, schedules: Mapping[str, Schedule], now: datetime, touched: set[int],
                      *, recount: bool = False) -> None:
        """One transaction: the started VMs and their jobs, refused starts, new reasons to wait, skips (and the
        executions' counts when `recount`: no tick follows to recount them)."""
        waits = [(v, why) for v, why in done.waits if v.reason != why]  # written once per change, not every tick
        if not (done.started or done.refused or waits or done.skips):
            return
        async with self.db.transaction() as tx:
            await store.vms_started(tx, done.started, at=iso(now))
            await store.vms_skipped(tx, [(v.key, why) for v, why in done.skips], at=iso(now))
            await store.note_scheduled_jobs(tx, done.started)  # informational: shown with the VM
            for v, e in done.refused:
                if isinstance(e, Conflict):
                    continue  # the VM is busy: it waits, without counting an attempt
                v.attempts += 1
                await store.vm_start_refused(tx, v.key, attempts=v.attempts)
                await self._failed_attempt(tx, v, schedules[v.row.schedule_id], now, f"start refused: {e}",
                                           not_retried=done.final.get(v.key))
                touched.add(v.row.execution_id)
            await store.vm_waiting(tx, [(v.key, why) for v, why in waits])
            if recount:
                await store.recount(tx, sorted({v.row.execution_id for v, _ in done.refused} |
                                               {v.row.execution_id for v, _ in done.skips} |
                                               {s.execution_id for s in done.started}))
        for v, why in waits:
            v.reason = why
        for v, why in done.skips:
            v.status, v.reason = VmStatus.SKIPPED, why
            log.info("%s: %s", v.row.vm_name, why, extra={"resource": v.row.context_id})
        touched.update(s.execution_id for s in done.started)
        touched.update(v.row.execution_id for v, _ in done.skips)

    async def _close(self, tx: Tx, execution_id: int, now: datetime) -> None:
        counts, cancelled = await store.vm_outcomes(tx, execution_id)
        done, failed, skipped = counts.get("completed", 0), counts.get("failed", 0), counts.get("skipped", 0)
        status = ExecutionStatus.FAILED if failed else ExecutionStatus.COMPLETED if done else \
            ExecutionStatus.CANCELLED if cancelled else ExecutionStatus.SKIPPED
        message = f"{done} of {done + failed + skipped} VM(s) protected, {failed} failed, {skipped} skipped"
        await store.close_execution(tx, execution_id, status, message=message, at=iso(now))
        tx.after_commit(lambda: log.info("execution %d %s: %s", execution_id, status, message,
                                         extra={"resource": str(execution_id)}))


def _by_action(vms: Sequence[_Open], schedules: Mapping[str, Schedule]) -> dict[str, list[_Open]]:
    """The VMs per action (one launcher each), in order."""
    out: dict[str, list[_Open]] = {}
    for v in vms:
        out.setdefault(schedules[v.row.schedule_id].action, []).append(v)
    return out
