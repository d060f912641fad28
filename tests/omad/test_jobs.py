"""The job engine: steps recorded in order with their outcome, background failures recorded, recovery after a
restart hands each active job to its type's function, and shutdown marks interrupted work."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oma_common.errors import Conflict, Unavailable
from omad.jobs import ids
from omad.jobs.engine import JobEngine
from omad.jobs.locks import KeyedLocks
from omad.store.db import Database


@pytest.fixture
def engine(db: Database) -> JobEngine:
    return JobEngine(db)


async def test_steps_and_progress_are_recorded(engine: JobEngine) -> None:
    jid = await engine.create("backup", display_name="backup of vm1")
    assert ids.job_id() != jid and jid.startswith("job-")
    async with engine.step(jid, "create images"):
        await engine.progress(jid, 40)
    with pytest.raises(Unavailable):
        async with engine.step(jid, "start exports"):
            raise Unavailable("nbd-pool unavailable", "socket missing")
    await engine.finish(jid, "failed", "nbd-pool unavailable")
    job = await engine.get(jid)
    assert job["status"] == "failed" and job["progress"] == 40 and job["current_step"] == "start exports"
    assert [(s["name"], s["status"]) for s in job["steps"]] == [("create images", "completed"),
                                                                 ("start exports", "failed")]
    assert "socket missing" in job["steps"][1]["error_message"]
    await engine.merge_details(jid, disks=2)
    assert (await engine.get(jid))["details"] == {"disks": 2}


async def test_background_failure_fails_the_job(engine: JobEngine) -> None:
    jid = await engine.create("copy", display_name="copy")

    async def work() -> None:
        raise RuntimeError("disk on fire")

    await engine.spawn(jid, work())
    job = await engine.get(jid)
    assert job["status"] == "failed" and "disk on fire" in job["error_message"]


async def test_recovery_and_drain(engine: JobEngine) -> None:
    seen: list[dict[str, Any]] = []

    async def recover(row: dict[str, Any]) -> None:
        seen.append(row)
        await engine.finish(row["id"], "failed", "cleaned up after restart")

    engine.on_recover("backup", recover)
    a = await engine.create("backup", display_name="a")
    b = await engine.create("mystery", display_name="b")
    done = await engine.create("backup", display_name="c")
    await engine.finish(done, "completed")
    assert await engine.recover() == 2
    assert [r["id"] for r in seen] == [a]
    assert (await engine.get(b))["error_message"].startswith("interrupted")

    slow = await engine.create("backup", display_name="slow")
    engine.spawn(slow, asyncio.sleep(3600))
    await engine.drain(0.05)
    assert (await engine.get(slow))["status"] == "failed"


async def test_keyed_locks_reject_or_queue() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    async with locks.hold("vm:a", what="VM a"):
        assert locks.busy("vm:a")
        with pytest.raises(Conflict, match="VM a is busy"):
            async with locks.hold("vm:a", what="VM a"):
                pass
        async with locks.hold("vm:b"):
            order.append("b")

        async def queued() -> None:
            async with locks.hold("vm:a", wait=True):
                order.append("a2")

        task = asyncio.ensure_future(queued())
        await asyncio.sleep(0)
        order.append("a1")
    await task
    assert order == ["b", "a1", "a2"] and not locks.busy("vm:a")
