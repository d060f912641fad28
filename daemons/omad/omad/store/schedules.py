"""The owner of `schedules`, `schedule_executions`, `schedule_execution_vms` and `schedule_execution_jobs`, and of
the two columns the scheduler keeps on each VM context (next_scheduled_at, last_scheduled_job_id).

Each status column has its enum, and the named transitions below are the only code that writes it. The VM
transitions take many VMs at once, so that a tick starting or ending a thousand jobs writes them in one batch.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from typing import Any

from .base import Reader, get_or_404, name_free, record
from .db import Writer

# The only writers of the executions' and their VMs' and jobs' status columns (tests/omad/test_store_rules.py).
TRANSITIONS = ("open_executions", "close_execution", "vms_started", "vms_completed", "vm_retry_wait", "vm_failed",
               "vm_released", "vms_skipped", "cancel_waiting", "attempts_ended")


class Action(enum.StrEnum):
    """What a schedule starts for each VM of its groups (schedules.action)."""

    BACKUP = "backup"
    REPLICATION = "replication"


class ExecutionStatus(enum.StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class VmStatus(enum.StrEnum):
    """A VM of an execution."""

    PENDING = "pending"  # waiting for a slot (or for its VM's other job to end)
    RUNNING = "running"  # its job runs
    RETRY_WAIT = "retry_wait"  # its last attempt failed; it starts again at retry_at
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


OPEN: tuple[VmStatus, ...] = (VmStatus.PENDING, VmStatus.RUNNING, VmStatus.RETRY_WAIT)  # not done yet


class AttemptStatus(enum.StrEnum):
    """A job an execution created (schedule_execution_jobs), as last seen in `jobs`."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class Schedule:
    id: str
    name: str
    description: str
    cron_expression: str
    timezone: str
    enabled: bool
    skip_if_running: bool
    max_concurrent_jobs: int
    retry_attempts: int
    retry_delay_minutes: int
    action: str
    backup_type: str
    replication_type: str | None
    repository_id: str | None
    policy_id: str | None
    next_run_at: str | None
    last_run_at: str | None
    created_by: str
    created_at: str
    updated_at: str


@dataclasses.dataclass(frozen=True)
class Execution:
    id: int
    schedule_id: str
    scheduled_at: str
    started_at: str | None
    completed_at: str | None
    status: str
    triggered_by: str
    late: bool
    missed_runs: int
    vms_eligible: int
    jobs_created: int
    jobs_completed: int
    jobs_failed: int
    jobs_skipped: int
    start_failures: int
    message: str | None


@dataclasses.dataclass(frozen=True)
class NewExecution:
    schedule_id: str
    scheduled_at: str
    started_at: str
    triggered_by: str
    late: bool
    missed_runs: int
    vms: Sequence[tuple[str, str]]  # (context, group) in start order
    skipped_because: str | None = None  # recorded as skipped with this message, its VMs not listed


@dataclasses.dataclass(frozen=True)
class ExecutionVm:
    """A VM of an execution, as the API shows it."""

    vm_context_id: str
    vm_name: str | None
    group_id: str
    group_name: str | None
    status: str
    attempts: int
    start_failures: int
    job_id: str | None
    retry_at: str | None
    reason: str | None
    started_at: str | None
    completed_at: str | None


@dataclasses.dataclass(frozen=True)
class ExecutionJob:
    job_id: str
    vm_context_id: str
    attempt: int
    status: str
    created_at: str
    finished_at: str | None


@dataclasses.dataclass(frozen=True)
class OpenVm:
    """A VM of a running execution that is not done yet, with its schedule and VM name."""

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


@dataclasses.dataclass(frozen=True)
class Started:
    """A VM whose job was created: its attempt number and job."""

    execution_id: int
    context_id: str
    attempt: int
    job_id: str


VmKey = tuple[int, str]  # (execution id, VM context id)


def _schedule(row: dict[str, Any]) -> Schedule:
    return record(Schedule, {**row, "enabled": bool(row["enabled"]), "skip_if_running": bool(row["skip_if_running"])})


def _execution(row: dict[str, Any]) -> Execution:
    return record(Execution, {**row, "late": bool(row["late"])})


# -- schedules -----------------------------------------------------------------------------------------

async def list_all(db: Reader) -> list[Schedule]:
    return [_schedule(r) for r in await db.fetchall("SELECT * FROM schedules ORDER BY name")]


async def get(db: Reader, schedule_id: str) -> Schedule:
    return _schedule(await get_or_404(db, "SELECT * FROM schedules WHERE id = ?", (schedule_id,), what="schedule",
                                      ident=schedule_id))


async def exists(db: Reader, schedule_id: str) -> bool:
    return bool(await db.scalar("SELECT 1 FROM schedules WHERE id = ?", (schedule_id,)))


async def name_is_free(db: Reader, name: str) -> None:
    await name_free(db, "SELECT 1 FROM schedules WHERE name = ?", (name,), what="schedule", name=name)


async def due(db: Reader, now: str) -> list[Schedule]:
    """Enabled schedules whose next run is at or before `now`, earliest first."""
    return [_schedule(r) for r in await db.fetchall(
        "SELECT * FROM schedules WHERE enabled = 1 AND next_run_at IS NOT NULL AND next_run_at <= ? "
        "ORDER BY next_run_at, name", (now,))]


async def unscheduled(db: Reader) -> list[Schedule]:
    """Enabled schedules without a next run (written by hand, or not computable before)."""
    return [_schedule(r) for r in await db.fetchall("SELECT * FROM schedules WHERE enabled = 1 AND "
                                                    "next_run_at IS NULL")]


async def next_due(db: Reader) -> str | None:
    """The earliest next run of the enabled schedules."""
    return await db.scalar("SELECT MIN(next_run_at) FROM schedules WHERE enabled = 1")  # type: ignore[no-any-return]


async def with_running_execution(db: Reader) -> dict[str, Schedule]:
    return {r["id"]: _schedule(r) for r in await db.fetchall(
        "SELECT * FROM schedules WHERE id IN (SELECT DISTINCT schedule_id FROM schedule_executions "
        "WHERE status = 'running')")}


async def insert(tx: Writer, s: Schedule) -> None:
    await tx.execute(
        "INSERT INTO schedules (id, name, description, cron_expression, timezone, enabled, skip_if_running,"
        " max_concurrent_jobs, retry_attempts, retry_delay_minutes, action, backup_type, replication_type,"
        " repository_id, policy_id, next_run_at, last_run_at, created_by, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (s.id, s.name, s.description, s.cron_expression, s.timezone, int(s.enabled), int(s.skip_if_running),
         s.max_concurrent_jobs, s.retry_attempts, s.retry_delay_minutes, s.action, s.backup_type,
         s.replication_type, s.repository_id, s.policy_id, s.next_run_at, s.last_run_at, s.created_by,
         s.created_at, s.updated_at))


async def update(tx: Writer, s: Schedule) -> None:
    """Write the schedule's settings and next run (not its creation nor its last run)."""
    await tx.execute(
        "UPDATE schedules SET name = ?, description = ?, cron_expression = ?, timezone = ?, enabled = ?,"
        " skip_if_running = ?, max_concurrent_jobs = ?, retry_attempts = ?, retry_delay_minutes = ?,"
        " action = ?, backup_type = ?, replication_type = ?, repository_id = ?, policy_id = ?,"
        " next_run_at = ?, updated_at = ? WHERE id = ?",
        (s.name, s.description, s.cron_expression, s.timezone, int(s.enabled), int(s.skip_if_running),
         s.max_concurrent_jobs, s.retry_attempts, s.retry_delay_minutes, s.action, s.backup_type,
         s.replication_type, s.repository_id, s.policy_id, s.next_run_at, s.updated_at, s.id))


async def set_next_run(tx: Writer, schedule_id: str, next_run_at: str | None) -> None:
    await tx.execute("UPDATE schedules SET next_run_at = ? WHERE id = ?", (next_run_at, schedule_id))


async def fired(tx: Writer, schedules: Sequence[tuple[str, str | None]], *, at: str) -> None:
    """These schedules (id, next run) ran at `at`; each runs next at its next run."""
    await tx.executemany("UPDATE schedules SET next_run_at = ?, last_run_at = ? WHERE id = ?",
                         [(next_run_at, at, schedule_id) for schedule_id, next_run_at in schedules])


async def delete(tx: Writer, schedule_id: str) -> None:
    await tx.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,))  # executions cascade; groups unlink


# A VM's next scheduled time: the earliest next run of the enabled schedules of the groups it is an enabled
# member of; NULL when the scheduler leaves it alone. Only rows whose value changes are written.
_REFRESH_NEXT = """
WITH next AS (
    SELECT m.vm_context_id AS id, MIN(s.next_run_at) AS at
    FROM vm_group_memberships m
    JOIN vm_machine_groups g ON g.id = m.group_id
    JOIN schedules s ON s.id = g.schedule_id
    WHERE m.enabled = 1 AND s.enabled = 1
    GROUP BY m.vm_context_id
)
UPDATE vm_replication_contexts AS c SET next_scheduled_at = n.at
FROM (SELECT c2.context_id AS id, CASE WHEN c2.scheduler_enabled = 1 THEN next.at END AS at
      FROM vm_replication_contexts c2 LEFT JOIN next ON next.id = c2.context_id) AS n
WHERE n.id = c.context_id AND c.next_scheduled_at IS NOT n.at
"""


async def refresh_next_scheduled(tx: Writer) -> None:
    """Bring every VM context's next_scheduled_at up to date (after any change of schedules or groups)."""
    await tx.execute(_REFRESH_NEXT)


async def note_scheduled_jobs(tx: Writer, started: Sequence[Started]) -> None:
    """Each VM context remembers the last job the scheduler made for it (shown with the VM)."""
    await tx.executemany("UPDATE vm_replication_contexts SET last_scheduled_job_id = ? WHERE context_id = ?",
                         [(s.job_id, s.context_id) for s in started])


# -- executions ----------------------------------------------------------------------------------------

async def get_execution(db: Reader, execution_id: int) -> Execution:
    return _execution(await get_or_404(db, "SELECT * FROM schedule_executions WHERE id = ?", (execution_id,),
                                       what="execution", ident=execution_id))


async def running_execution(db: Reader, schedule_id: str) -> int | None:
    """The schedule's oldest running execution, if any."""
    return (await running_execution_of(db, [schedule_id])).get(schedule_id)


async def running_execution_of(db: Reader, schedule_ids: Sequence[str]) -> dict[str, int]:
    """Schedule id → its oldest running execution, for those of these schedules that have one."""
    return {r["schedule_id"]: r["id"] for r in await db.fetchall(
        "SELECT schedule_id, MIN(id) AS id FROM schedule_executions WHERE status = 'running' AND schedule_id IN "
        "(SELECT value FROM json_each(?)) GROUP BY schedule_id", (json.dumps(list(schedule_ids)),))}


async def any_running(db: Reader) -> bool:
    return bool(await db.scalar("SELECT 1 FROM schedule_executions WHERE status = 'running' LIMIT 1"))


async def running_executions(db: Reader) -> list[Execution]:
    return [_execution(r) for r in await db.fetchall("SELECT * FROM schedule_executions WHERE status = 'running' "
                                                     "ORDER BY id")]


async def latest_executions(db: Reader) -> dict[str, Execution]:
    """Schedule id → its latest execution."""
    return {r["schedule_id"]: _execution(r) for r in await db.fetchall(
        "SELECT * FROM schedule_executions WHERE id IN (SELECT MAX(id) FROM schedule_executions "
        "GROUP BY schedule_id)")}


async def executions_page(db: Reader, schedule_id: str, *, limit: int, offset: int, status: str | None
                          ) -> tuple[list[Execution], int]:
    """A page of the schedule's executions, newest first, and how many there are in all."""
    rows = await db.fetchall(
        "SELECT * FROM schedule_executions WHERE schedule_id = ? AND (? IS NULL OR status = ?) ORDER BY id DESC "
        "LIMIT ? OFFSET ?", (schedule_id, status, status, limit, offset))
    total = await db.scalar("SELECT COUNT(*) FROM schedule_executions WHERE schedule_id = ? AND "
                            "(? IS NULL OR status = ?)", (schedule_id, status, status))
    return [_execution(r) for r in rows], int(total)


async def execution_vms(db: Reader, execution_id: int) -> list[ExecutionVm]:
    return [record(ExecutionVm, r) for r in await db.fetchall(
        "SELECT v.vm_context_id, c.vm_name, v.group_id, g.name AS group_name, v.status, v.attempts, "
        "v.start_failures, v.job_id, v.retry_at, v.reason, v.started_at, v.completed_at "
        "FROM schedule_execution_vms v LEFT JOIN vm_replication_contexts c ON c.context_id = v.vm_context_id "
        "LEFT JOIN vm_machine_groups g ON g.id = v.group_id WHERE v.execution_id = ? ORDER BY v.position",
        (execution_id,))]


async def execution_jobs(db: Reader, execution_id: int) -> list[ExecutionJob]:
    return [record(ExecutionJob, r) for r in await db.fetchall(
        "SELECT job_id, vm_context_id, attempt, status, created_at, finished_at FROM schedule_execution_jobs "
        "WHERE execution_id = ? ORDER BY created_at, job_id", (execution_id,))]


async def open_vms(db: Reader) -> list[OpenVm]:
    """Every VM of a running execution that is not done, in start order (execution, then position)."""
    return [OpenVm(**r) for r in await db.fetchall(  # exactly the record's columns: no record() on this hot path
        "SELECT v.execution_id, e.schedule_id, v.vm_context_id AS context_id, c.vm_name, v.group_id, v.status,"
        " v.attempts, v.job_id, v.retry_at, v.reason FROM schedule_executions e"
        " JOIN schedule_execution_vms v ON v.execution_id = e.id"
        " LEFT JOIN vm_replication_contexts c ON c.context_id = v.vm_context_id"
        " WHERE e.status = 'running' AND v.status IN ('pending', 'running', 'retry_wait')"
        " ORDER BY e.id, v.position")]


async def open_executions(tx: Writer, news: Sequence[NewExecution]) -> list[int]:
    """Record executions (of different schedules), each running with its VMs pending in order, or skipped with
    the reason; returns their ids in order. One statement for the executions, one batch for their VMs."""
    if len({n.schedule_id for n in news}) != len(news):
        raise ValueError("one execution per schedule at a time")
    rows = [[n.schedule_id, n.scheduled_at, n.started_at, n.started_at if n.skipped_because else None,
             ExecutionStatus.SKIPPED if n.skipped_because else ExecutionStatus.RUNNING, n.triggered_by, int(n.late),
             n.missed_runs, len(n.vms), len(n.vms) if n.skipped_because else 0, n.skipped_because] for n in news]
    columns = ("schedule_id, scheduled_at, started_at, completed_at, status, triggered_by, late, missed_runs, "
               "vms_eligible, jobs_skipped, message")
    values = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(rows[0]))) if rows else ""
    # executemany cannot tell the ids; RETURNING can (in no set order, so by schedule).
    ids = {r["schedule_id"]: r["id"] for r in await tx.fetchall(
        f"INSERT INTO schedule_executions ({columns}) SELECT {values} FROM json_each(?) ORDER BY key "
        "RETURNING id, schedule_id", (json.dumps(rows),))} if rows else {}
    await tx.executemany(
        "INSERT INTO schedule_execution_vms (execution_id, vm_context_id, group_id, position, status) "
        "VALUES (?, ?, ?, ?, 'pending')",
        [(ids[n.schedule_id], cid, gid, i) for n in news if not n.skipped_because
         for i, (cid, gid) in enumerate(n.vms)])
    return [ids[n.schedule_id] for n in news]


async def recount(tx: Writer, execution_ids: Sequence[int]) -> None:
    """The counts, from the rows they count: they always match the jobs the executions created."""
    await tx.execute(
        "UPDATE schedule_executions AS e SET "
        "jobs_created = (SELECT COUNT(*) FROM schedule_execution_jobs WHERE execution_id = e.id), "
        "jobs_completed = (SELECT COUNT(*) FROM schedule_execution_jobs WHERE execution_id = e.id "
        "AND status = 'completed'), "
        "jobs_failed = (SELECT COUNT(*) FROM schedule_execution_jobs WHERE execution_id = e.id "
        "AND status = 'failed'), "
        "jobs_skipped = (SELECT COUNT(*) FROM schedule_execution_vms WHERE execution_id = e.id "
        "AND status = 'skipped'), "
        "start_failures = (SELECT COALESCE(SUM(start_failures), 0) FROM schedule_execution_vms "
        "WHERE execution_id = e.id) WHERE e.id IN (SELECT value FROM json_each(?))",
        (json.dumps(list(execution_ids)),))


async def vm_outcomes(db: Reader, execution_id: int) -> tuple[dict[str, int], bool]:
    """How many of the execution's VMs are in each status, and whether any was cancelled."""
    counts = {r["status"]: r["n"] for r in await db.fetchall(
        "SELECT status, COUNT(*) AS n FROM schedule_execution_vms WHERE execution_id = ? GROUP BY status",
        (execution_id,))}
    cancelled = await db.scalar("SELECT 1 FROM schedule_execution_vms WHERE execution_id = ? AND "
                                "reason LIKE 'cancelled:%' LIMIT 1", (execution_id,))
    return counts, bool(cancelled)


async def close_execution(tx: Writer, execution_id: int, status: ExecutionStatus, *, message: str, at: str) -> None:
    """A running execution ends."""
    await tx.execute("UPDATE schedule_executions SET status = ?, completed_at = ?, message = ? WHERE id = ? "
                     "AND status = 'running'", (status, at, message, execution_id))


# -- the VMs of an execution: the only writers of schedule_execution_vms.status ----------------------------

_VM = "WHERE execution_id = ? AND vm_context_id = ?"


async def vms_started(tx: Writer, started: Sequence[Started], *, at: str) -> None:
    """Waiting VMs whose jobs were created: running, and each attempt's job recorded (one batch)."""
    await tx.executemany(
        f"UPDATE schedule_execution_vms SET status = 'running', attempts = ?, job_id = ?, retry_at = NULL, "
        f"reason = NULL, started_at = COALESCE(started_at, ?) {_VM} AND status = 'pending'",
        [(s.attempt, s.job_id, at, s.execution_id, s.context_id) for s in started])
    # An attempt is recorded only on a VM that now follows its job: a row no tick follows would stay running.
    await tx.executemany(
        "INSERT INTO schedule_execution_jobs (job_id, execution_id, vm_context_id, attempt, status, created_at) "
        f"SELECT ?, ?, ?, ?, 'running', ? WHERE EXISTS (SELECT 1 FROM schedule_execution_vms {_VM} "
        "AND status = 'running' AND job_id = ?)",
        [(s.job_id, s.execution_id, s.context_id, s.attempt, at, s.execution_id, s.context_id, s.job_id)
         for s in started])


async def vms_completed(tx: Writer, keys: Sequence[VmKey], *, at: str) -> None:
    await tx.executemany(f"UPDATE schedule_execution_vms SET status = 'completed', completed_at = ?, reason = NULL "
                         f"{_VM} AND status = 'running'", [(at, e, c) for e, c in keys])


async def vm_start_refused(tx: Writer, key: VmKey, *, attempts: int) -> None:
    """A start was refused (no job was created): one more attempt and start failure; the status stays."""
    await tx.execute(f"UPDATE schedule_execution_vms SET attempts = ?, start_failures = start_failures + 1 {_VM}",
                     (attempts, *key))


async def vm_retry_wait(tx: Writer, key: VmKey, *, retry_at: str, reason: str) -> None:
    await tx.execute(f"UPDATE schedule_execution_vms SET status = 'retry_wait', retry_at = ?, reason = ? {_VM} "
                     "AND status IN ('pending', 'running')", (retry_at, reason, *key))


async def vm_failed(tx: Writer, key: VmKey, *, reason: str, at: str) -> None:
    await tx.execute(f"UPDATE schedule_execution_vms SET status = 'failed', completed_at = ?, reason = ? {_VM} "
                     "AND status IN ('pending', 'running')", (at, reason, *key))


async def vm_released(tx: Writer, key: VmKey) -> None:
    """A VM's retry is due: it waits for a slot again."""
    await tx.execute(f"UPDATE schedule_execution_vms SET status = 'pending', retry_at = NULL {_VM} "
                     "AND status = 'retry_wait'", key)


async def vms_skipped(tx: Writer, skipped: Sequence[tuple[VmKey, str]], *, at: str) -> None:
    """Waiting VMs (key, reason) that get no job in their execution (one batch)."""
    await tx.executemany(f"UPDATE schedule_execution_vms SET status = 'skipped', completed_at = ?, reason = ? {_VM} "
                         "AND status = 'pending'", [(at, reason, *key) for key, reason in skipped])


async def vm_waiting(tx: Writer, keys: Sequence[tuple[VmKey, str]]) -> None:
    """Why waiting VMs still wait (the status stays)."""
    await tx.executemany(f"UPDATE schedule_execution_vms SET reason = ? {_VM}", [(why, *k) for k, why in keys])


async def cancel_waiting(tx: Writer, schedule_id: str, *, reason: str, at: str, keep: Sequence[VmKey] = ()) -> None:
    """The schedule was disabled: the VMs of its running executions not started yet are skipped, except `keep`
    (VMs whose start is in progress: their outcome is recorded when it comes)."""
    await tx.execute(
        "UPDATE schedule_execution_vms SET status = 'skipped', retry_at = NULL, reason = ?, completed_at = ? "
        "WHERE status IN ('pending', 'retry_wait') AND execution_id IN "
        "(SELECT id FROM schedule_executions WHERE schedule_id = ? AND status = 'running') "
        "AND (execution_id, vm_context_id) NOT IN "
        "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))",
        (reason, at, schedule_id, json.dumps([list(k) for k in keep])))


async def attempts_ended(tx: Writer, ended: Sequence[tuple[str, AttemptStatus]], *, at: str) -> None:
    """The jobs (id, outcome) that ended since the last look."""
    await tx.executemany("UPDATE schedule_execution_jobs SET status = ?, finished_at = ? WHERE job_id = ? "
                         "AND status = 'running'", [(str(status), at, job_id) for job_id, status in ended])

