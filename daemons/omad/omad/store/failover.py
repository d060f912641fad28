"""The owner of `failover_jobs` and `failover_steps`: failover job records, their steps, and the transitions.

A failover job runs (`running`), and ends `completed`, or fails: `compensating` while its done steps are undone,
then `compensated` (everything undone) or `failed` (an undo failed too: leftovers to clean). A completed test
failover becomes `ended` once its end test completed. A step is recorded `running` before it runs, then
`completed` with what it produced, or `failed`; undoing it goes `compensating` → `compensated`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any

from .base import Reader, get_or_404, record
from .db import Tx, utcnow

TRANSITIONS = ("_end",  # the shared body of the job-ending transitions below
               "create", "complete", "start_compensating", "end_compensated", "fail", "mark_ended",
               "begin_step", "complete_step", "fail_step", "begin_undo", "complete_undo")


class FailoverStatus(enum.StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATED = "compensated"
    ENDED = "ended"


ACTIVE = (FailoverStatus.RUNNING, FailoverStatus.COMPENSATING)
_ACTIVE_SQL = "(" + ", ".join(f"'{s.value}'" for s in ACTIVE) + ")"


class StepStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"


class OnCrash(enum.StrEnum):
    """What recovery does with a job whose step was unfinished when omad died."""

    RESUME = "resume"  # run the step again (it checks what exists first) and carry on
    COMPENSATE = "compensate"  # undo it and every step before it


class Operation(enum.StrEnum):
    FAILOVER = "failover"
    END_TEST = "end_test"
    ROLLBACK = "rollback"


@dataclasses.dataclass(frozen=True)
class FailoverJob:
    job_id: str
    vm_context_id: str
    vm_name: str
    failover_type: str
    operation: str
    status: str
    parent_job_id: str | None
    options: dict[str, Any]
    error_message: str | None
    created_by: str
    created_at: str
    updated_at: str
    completed_at: str | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclasses.dataclass(frozen=True)
class FailoverStep:
    seq: int
    name: str
    status: str
    on_crash: str
    produced: dict[str, Any]
    error_message: str | None
    started_at: str
    completed_at: str | None
    compensated_at: str | None


@dataclasses.dataclass(frozen=True)
class NewFailover:
    job_id: str
    vm_context_id: str
    vm_name: str
    failover_type: str
    operation: Operation
    parent_job_id: str | None
    options: dict[str, Any]
    created_by: str


def _job(row: Mapping[str, Any]) -> FailoverJob:
    return record(FailoverJob, {**row, "options": json.loads(row.get("options") or "{}")})


def _step(row: Mapping[str, Any]) -> FailoverStep:
    return record(FailoverStep, {**row, "produced": json.loads(row.get("produced") or "{}")})


# -- reading -------------------------------------------------------------------------------------------

async def get(db: Reader, job_id: str) -> FailoverJob:
    return _job(await get_or_404(db, "SELECT * FROM failover_jobs WHERE job_id = ?", (job_id,),
                                 what="failover job", ident=job_id))


async def steps(db: Reader, job_id: str) -> list[FailoverStep]:
    return [_step(r) for r in await db.fetchall("SELECT * FROM failover_steps WHERE job_id = ? ORDER BY seq",
                                                (job_id,))]


async def find(db: Reader, *, vm_context_id: str | None = None, status: str | None = None,
               failover_type: str | None = None, limit: int = 100, offset: int = 0) -> list[FailoverJob]:
    rows = await db.fetchall(
        "SELECT * FROM failover_jobs WHERE (?1 IS NULL OR vm_context_id = ?1) AND (?2 IS NULL OR status = ?2) "
        "AND (?3 IS NULL OR failover_type = ?3) ORDER BY created_at DESC, job_id LIMIT ?4 OFFSET ?5",
        (vm_context_id, status, failover_type, limit, offset))
    return [_job(r) for r in rows]


async def active_for_context(db: Reader, context_id: str) -> FailoverJob | None:
    row = await db.fetchone(f"SELECT * FROM failover_jobs WHERE vm_context_id = ? AND status IN {_ACTIVE_SQL}",
                            (context_id,))
    return _job(row) if row is not None else None


async def active(db: Reader) -> list[FailoverJob]:
    return [_job(r) for r in await db.fetchall(f"SELECT * FROM failover_jobs WHERE status IN {_ACTIVE_SQL} "
                                               "ORDER BY created_at")]


async def standing(db: Reader, context_id: str) -> FailoverJob | None:
    """The VM's completed failover still in force (a test not ended yet, a live one not rolled back), if any."""
    row = await db.fetchone(
        "SELECT * FROM failover_jobs WHERE vm_context_id = ? AND operation = ? AND status = ? "
        "ORDER BY created_at DESC LIMIT 1", (context_id, Operation.FAILOVER, FailoverStatus.COMPLETED))
    return _job(row) if row is not None else None


async def last_failed(db: Reader, context_id: str) -> FailoverJob | None:
    row = await db.fetchone(
        "SELECT * FROM failover_jobs WHERE vm_context_id = ? AND status = ? ORDER BY created_at DESC LIMIT 1",
        (context_id, FailoverStatus.FAILED))
    return _job(row) if row is not None else None


# -- the transitions: the only code that writes failover_jobs.status and failover_steps.status ----------

async def create(tx: Tx, new: NewFailover) -> None:
    now = utcnow()
    await tx.execute(
        "INSERT INTO failover_jobs (job_id, vm_context_id, vm_name, failover_type, operation, status, "
        "parent_job_id, options, created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (new.job_id, new.vm_context_id, new.vm_name, new.failover_type, new.operation, FailoverStatus.RUNNING,
         new.parent_job_id, json.dumps(new.options), new.created_by, now, now))


async def _end(tx: Tx, job_id: str, to: FailoverStatus, frm: tuple[FailoverStatus, ...], error: str | None) -> bool:
    now = utcnow()
    marks = ", ".join("?" for _ in frm)
    return bool(await tx.execute(
        f"UPDATE failover_jobs SET status = ?, error_message = COALESCE(?, error_message), updated_at = ?, "
        f"completed_at = CASE WHEN ? THEN ? ELSE completed_at END WHERE job_id = ? AND status IN ({marks})",
        (to, error, now, to not in ACTIVE, now, job_id, *frm)))


async def complete(tx: Tx, job_id: str) -> bool:
    return await _end(tx, job_id, FailoverStatus.COMPLETED, (FailoverStatus.RUNNING,), None)


async def start_compensating(tx: Tx, job_id: str, reason: str | None) -> bool:
    return await _end(tx, job_id, FailoverStatus.COMPENSATING, ACTIVE, reason)


async def end_compensated(tx: Tx, job_id: str) -> bool:
    return await _end(tx, job_id, FailoverStatus.COMPENSATED, ACTIVE, None)


async def fail(tx: Tx, job_id: str, reason: str) -> bool:
    """Failed and not (fully) undone: what is left needs a cleanup."""
    return await _end(tx, job_id, FailoverStatus.FAILED, ACTIVE, reason)


async def mark_ended(tx: Tx, job_id: str) -> bool:
    """A completed failover was ended (its test ended, or it was rolled back) or its leftovers cleaned."""
    return await _end(tx, job_id, FailoverStatus.ENDED, (FailoverStatus.COMPLETED, FailoverStatus.FAILED), None)


async def begin_step(tx: Tx, job_id: str, seq: int, name: str, on_crash: OnCrash) -> None:
    """The step is recorded before it runs (again, on a resume: its earlier outcome is replaced)."""
    await tx.execute(
        "INSERT INTO failover_steps (job_id, seq, name, status, on_crash, started_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (job_id, seq) DO UPDATE SET status = excluded.status, error_message = NULL, "
        "completed_at = NULL", (job_id, seq, name, StepStatus.RUNNING, on_crash, utcnow()))


async def complete_step(tx: Tx, job_id: str, seq: int, produced: Mapping[str, Any]) -> None:
    await tx.execute("UPDATE failover_steps SET status = ?, produced = ?, completed_at = ? WHERE job_id = ? AND seq = ?",
                     (StepStatus.COMPLETED, json.dumps(produced, default=str), utcnow(), job_id, seq))


async def note_step(tx: Tx, job_id: str, seq: int, values: Mapping[str, Any]) -> None:
    """What a running step learnt before it acts (a state to restore), kept should omad die during the act."""
    raw = await tx.scalar("SELECT produced FROM failover_steps WHERE job_id = ? AND seq = ?", (job_id, seq))
    produced = {**json.loads(raw or "{}"), **values}
    await tx.execute("UPDATE failover_steps SET produced = ? WHERE job_id = ? AND seq = ?",
                     (json.dumps(produced, default=str), job_id, seq))


async def fail_step(tx: Tx, job_id: str, seq: int, reason: str) -> None:
    await tx.execute("UPDATE failover_steps SET status = ?, error_message = ?, completed_at = ? "
                     "WHERE job_id = ? AND seq = ?", (StepStatus.FAILED, reason, utcnow(), job_id, seq))


async def begin_undo(tx: Tx, job_id: str, seq: int) -> None:
    await tx.execute("UPDATE failover_steps SET status = ? WHERE job_id = ? AND seq = ? AND status != ?",
                     (StepStatus.COMPENSATING, job_id, seq, StepStatus.COMPENSATED))


async def complete_undo(tx: Tx, job_id: str, seq: int) -> None:
    await tx.execute("UPDATE failover_steps SET status = ?, compensated_at = ? WHERE job_id = ? AND seq = ?",
                     (StepStatus.COMPENSATED, utcnow(), job_id, seq))
