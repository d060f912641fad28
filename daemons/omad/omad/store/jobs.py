"""The owner of `jobs` and `job_steps`: job records, their statuses, and the transitions that change them.

A job is created `pending` or `running` and ends once, `completed` or `failed`: the ending transitions only
touch an active job, so a job that completed cannot be failed afterwards (nor a failed one completed or failed
again with another reason). Steps are numbered in the order they begin and end once each.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from typing import Any

from .base import Reader, get_or_404, record
from .db import utcnow, Writer

# The only writers of jobs.status and job_steps.status (tests/omad/test_store_rules.py holds us to it).
TRANSITIONS = ("start", "complete", "fail", "begin_step", "complete_step", "fail_step")


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


# The one definition of "still going": a VM with such a job is busy, and recovery looks at these after a restart.
ACTIVE: tuple[JobStatus, ...] = (JobStatus.PENDING, JobStatus.RUNNING)
ENDED: tuple[JobStatus, ...] = (JobStatus.COMPLETED, JobStatus.FAILED)
_ACTIVE_SQL = "(" + ", ".join(f"'{s.value}'" for s in ACTIVE) + ")"  # ACTIVE in SQL text, from the enum


class StepStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class NewJob:
    """A job to create: what `create` and `create_many` insert."""

    id: str
    job_type: str
    display_name: str
    context_id: str | None = None
    status: JobStatus = JobStatus.RUNNING
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in ACTIVE:
            raise ValueError(f"a job is created pending or running, not {self.status}")


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    job_type: str
    status: str  # a JobStatus; other values a hand-edited row may hold are kept as they are
    progress: float
    context_id: str | None
    display_name: str
    current_step: str | None
    error_message: str | None
    started_at: str | None
    completed_at: str | None
    created_at: str
    updated_at: str | None
    details: dict[str, Any]

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    status: str
    started_at: str
    completed_at: str | None
    error_message: str | None


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """What the scheduler follows of a job: its status and why it failed."""

    id: str
    status: str
    error_message: str | None


def _job(row: dict[str, Any]) -> Job:
    return record(Job, {**row, "details": json.loads(row.get("details") or "{}")})


# -- reading -------------------------------------------------------------------------------------------

async def get(db: Reader, job_id: str) -> Job:
    row = await get_or_404(db, "SELECT * FROM jobs WHERE id = ?", (job_id,), what="job", ident=job_id)
    return _job(row)


async def steps(db: Reader, job_id: str) -> list[Step]:
    return [record(Step, r) for r in await db.fetchall(
        "SELECT name, status, started_at, completed_at, error_message FROM job_steps WHERE job_id = ? "
        "ORDER BY seq", (job_id,))]


async def exists(db: Reader, job_id: str) -> bool:
    return bool(await db.scalar("SELECT 1 FROM jobs WHERE id = ?", (job_id,)))


async def active(db: Reader) -> list[Job]:
    """Every job still pending or running, oldest first (what a previous omad left behind at start-up)."""
    return [_job(r) for r in await db.fetchall(f"SELECT * FROM jobs WHERE status IN {_ACTIVE_SQL} "
                                               "ORDER BY created_at")]


async def active_for_context(db: Reader, context_id: str) -> str | None:
    """The id of a pending or running job of this VM context, if it has one."""
    return await db.scalar(  # type: ignore[no-any-return]
        f"SELECT id FROM jobs WHERE context_id = ? AND status IN {_ACTIVE_SQL} ORDER BY created_at, id LIMIT 1",
        (context_id,))


async def busy_contexts(db: Reader, context_ids: Sequence[str] | None = None) -> dict[str, str]:
    """VM context → one of its active jobs, for every context that has one (or for those of `context_ids`)."""
    if context_ids is None:
        rows = await db.fetchall(f"SELECT context_id, id FROM jobs WHERE status IN {_ACTIVE_SQL} "
                                 "AND context_id IS NOT NULL")
    else:
        # CROSS JOIN keeps SQLite from walking every active job: it looks up each context (jobs_context index).
        rows = await db.fetchall(f"SELECT j.context_id, j.id FROM json_each(?) AS w CROSS JOIN jobs j "
                                 f"ON j.context_id = w.value WHERE j.status IN {_ACTIVE_SQL}",
                                 (json.dumps(list(context_ids)),))
    return {r["context_id"]: r["id"] for r in rows}


async def outcomes(db: Reader, job_ids: Sequence[str]) -> dict[str, JobOutcome]:
    """Status and error of each of these jobs that exists."""
    return {r["id"]: JobOutcome(**r) for r in await db.fetchall(  # exactly the record's columns (a hot path)
        "SELECT id, status, error_message FROM jobs WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(list(job_ids)),))}


# -- creating ------------------------------------------------------------------------------------------

_INSERT = ("INSERT INTO jobs (id, job_type, status, progress, context_id, display_name, current_step, "
           "error_message, started_at, completed_at, created_at, updated_at, details) "
           "VALUES (?, ?, ?, 0, ?, ?, NULL, NULL, ?, NULL, ?, ?, ?)")


def _insert_params(job: NewJob, now: str) -> tuple[Any, ...]:
    return (job.id, job.job_type, str(job.status), job.context_id, job.display_name,
            now if job.status == JobStatus.RUNNING else None, now, now, json.dumps(job.details))


async def create(tx: Writer, job: NewJob) -> None:
    await tx.execute(_INSERT, _insert_params(job, utcnow()))


async def create_many(tx: Writer, jobs: Sequence[NewJob]) -> None:
    """Insert every job with one prepared statement, inside the caller's transaction (all or none)."""
    now = utcnow()
    await tx.executemany(_INSERT, [_insert_params(j, now) for j in jobs])


# -- the transitions: the only code that writes jobs.status and job_steps.status -------------------------

async def start(tx: Writer, job_id: str, *, now: str | None = None) -> bool:
    """pending → running; False when the job was not pending."""
    now = now or utcnow()
    return bool(await tx.execute(
        "UPDATE jobs SET status = ?, started_at = ?, updated_at = ? WHERE id = ? AND status = ?",
        (JobStatus.RUNNING, now, now, job_id, JobStatus.PENDING)))


async def complete(tx: Writer, job_id: str) -> bool:
    """An active job completes (progress 100); False when it had ended already (nothing changes)."""
    now = utcnow()
    return bool(await tx.execute(
        f"UPDATE jobs SET status = ?, error_message = NULL, completed_at = ?, updated_at = ?, progress = 100 "
        f"WHERE id = ? AND status IN {_ACTIVE_SQL}", (JobStatus.COMPLETED, now, now, job_id)))


async def fail(tx: Writer, job_id: str, reason: str | None) -> bool:
    """An active job fails with the reason; False when it had ended already (the first outcome stays)."""
    now = utcnow()
    return bool(await tx.execute(
        f"UPDATE jobs SET status = ?, error_message = ?, completed_at = ?, updated_at = ? "
        f"WHERE id = ? AND status IN {_ACTIVE_SQL}", (JobStatus.FAILED, reason, now, now, job_id)))


async def set_progress(tx: Writer, job_id: str, percent: float, current_step: str | None) -> None:
    await tx.execute("UPDATE jobs SET progress = ?, current_step = COALESCE(?, current_step), updated_at = ? "
                     "WHERE id = ?", (max(0.0, min(100.0, percent)), current_step, utcnow(), job_id))


async def merge_details(tx: Writer, job_id: str, values: dict[str, Any]) -> None:
    raw = await tx.scalar("SELECT details FROM jobs WHERE id = ?", (job_id,))
    details = json.loads(raw or "{}")
    details.update(values)
    await tx.execute("UPDATE jobs SET details = ?, updated_at = ? WHERE id = ?",
                     (json.dumps(details, default=str), utcnow(), job_id))


async def begin_step(tx: Writer, job_id: str, name: str) -> int:
    """A new step, running, numbered after the job's last one; it becomes the job's current step."""
    seq = int(await tx.scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM job_steps WHERE job_id = ?", (job_id,)))
    now = utcnow()
    await tx.execute("INSERT INTO job_steps (job_id, seq, name, status, started_at) VALUES (?, ?, ?, ?, ?)",
                     (job_id, seq, name, StepStatus.RUNNING, now))
    await tx.execute("UPDATE jobs SET current_step = ?, updated_at = ? WHERE id = ?", (name, now, job_id))
    return seq


async def complete_step(db: Writer, job_id: str, seq: int) -> None:
    await db.execute("UPDATE job_steps SET status = ?, completed_at = ? WHERE job_id = ? AND seq = ? AND status = ?",
                     (StepStatus.COMPLETED, utcnow(), job_id, seq, StepStatus.RUNNING))


async def fail_step(db: Writer, job_id: str, seq: int, reason: str) -> None:
    await db.execute("UPDATE job_steps SET status = ?, completed_at = ?, error_message = ? "
                     "WHERE job_id = ? AND seq = ? AND status = ?",
                     (StepStatus.FAILED, utcnow(), reason, job_id, seq, StepStatus.RUNNING))
