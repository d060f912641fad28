"""store/jobs.py: a job ends once (a completed job cannot be failed afterwards, a failed one keeps its first
reason), steps are recorded in the order they begin, and a batch of jobs is created whole or not at all."""

from __future__ import annotations

import sqlite3

import pytest

from oma_common.errors import NotFound
from omad.jobs.engine import JobEngine
from omad.store import jobs
from omad.store.db import Database
from omad.store.jobs import JobStatus, NewJob


@pytest.fixture
def engine(db: Database) -> JobEngine:
    return JobEngine(db)


async def test_a_completed_job_cannot_be_failed_afterwards(engine: JobEngine, db: Database) -> None:
    jid = await engine.create("backup", display_name="backup of vm1")
    await engine.progress(jid, 30)
    assert await engine.finish(jid, "completed") is True
    assert await engine.finish(jid, "failed", "too late") is False
    assert await jobs.fail(db, jid, "too late") is False
    job = await jobs.get(db, jid)
    assert (job.status, job.error_message, job.progress) == (JobStatus.COMPLETED, None, 100)


async def test_fail_records_the_reason_and_the_first_reason_stays(engine: JobEngine, db: Database) -> None:
    jid = await engine.create("backup", display_name="backup of vm1")
    assert await engine.finish(jid, "failed", "nbd-pool unavailable: socket missing")
    assert not await engine.finish(jid, "failed", "a second opinion")
    assert not await engine.finish(jid, "completed")
    job = await jobs.get(db, jid)
    assert job.status == JobStatus.FAILED and job.error_message == "nbd-pool unavailable: socket missing"
    assert job.completed_at is not None and not job.active


async def test_a_pending_job_starts_once(engine: JobEngine, db: Database) -> None:
    jid = await engine.create("backup_copy", display_name="copy", status="pending")
    job = await jobs.get(db, jid)
    assert job.status == JobStatus.PENDING and job.started_at is None
    assert await engine.start(jid) and not await engine.start(jid)
    job = await jobs.get(db, jid)
    assert job.status == JobStatus.RUNNING and job.started_at is not None
    assert await jobs.active_for_context(db, "nobody") is None


async def test_steps_are_recorded_in_order(engine: JobEngine, db: Database) -> None:
    jid = await engine.create("backup", display_name="backup of vm1")
    names = ["create images", "allocate ports", "start exports", "start VMA backup"]
    for name in names[:-1]:
        async with engine.step(jid, name):
            pass
    with pytest.raises(RuntimeError):
        async with engine.step(jid, names[-1]):
            raise RuntimeError("VMA refused")
    steps = await jobs.steps(db, jid)
    assert [s.name for s in steps] == names
    assert [s.status for s in steps] == ["completed"] * 3 + ["failed"]
    assert steps[-1].error_message == "RuntimeError: VMA refused"
    assert all(s.completed_at is not None and s.started_at <= s.completed_at for s in steps)
    assert (await jobs.get(db, jid)).current_step == "start VMA backup"


async def test_an_unknown_job_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound, match="job not found"):
        await jobs.get(db, "job-nope")


async def test_a_thousand_jobs_in_one_call_are_all_there(engine: JobEngine, db: Database) -> None:
    batch = [engine.new("backup", display_name=f"backup of vm{i}", context_id=f"ctx-vm{i}", details={"i": i})
             for i in range(1000)]
    created = await engine.create_many(batch)
    assert created == [j.id for j in batch] and len(set(created)) == 1000
    assert await db.scalar("SELECT COUNT(*) FROM jobs") == 1000
    busy = await jobs.busy_contexts(db)
    assert len(busy) == 1000 and busy["ctx-vm7"] == batch[7].id
    job = await jobs.get(db, batch[999].id)
    assert (job.status, job.context_id, job.details, job.started_at is not None) == \
        (JobStatus.RUNNING, "ctx-vm999", {"i": 999}, True)


async def test_a_failure_in_the_middle_of_a_batch_leaves_none(engine: JobEngine, db: Database) -> None:
    taken = await engine.create("backup", display_name="already there")
    batch = [engine.new("backup", display_name=f"backup of vm{i}") for i in range(1000)]
    batch[500] = NewJob(taken, "backup", "the same id again")  # the primary key refuses it mid-batch
    with pytest.raises(sqlite3.IntegrityError):
        await engine.create_many(batch)
    assert await db.scalar("SELECT COUNT(*) FROM jobs") == 1  # the batch's first 500 rolled back with it

    # Inside a caller's transaction, the batch goes with the caller's other writes.
    batch[500] = engine.new("backup", display_name="backup of vm500")
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await engine.create_many(batch, tx=tx)
            raise RuntimeError("the caller fails after the batch")
    assert await db.scalar("SELECT COUNT(*) FROM jobs") == 1


def test_the_active_statuses_are_defined_once() -> None:
    assert jobs.ACTIVE == (JobStatus.PENDING, JobStatus.RUNNING)
    with pytest.raises(ValueError):
        NewJob("job-x", "backup", "ended at birth", status=JobStatus.COMPLETED)
