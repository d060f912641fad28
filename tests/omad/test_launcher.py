"""The backup launcher against the backup domain's expected interface: what it passes, the ids it accepts,
auto's fall-back to a full backup, busy VMs, and a started backup without a job row to follow."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from oma_common.errors import Conflict, Internal, Invalid, Unavailable
from omad.jobs.engine import JobEngine
from omad.schedule.launcher import BackupLauncher, Target, UnconnectedLauncher, VmRef
from omad.store.db import Database

VM = VmRef("ctx-web-20250101-000000", "web 01")


def target(backup_type: str = "auto", repository_id: str | None = "1", policy_id: str | None = None) -> Target:
    return Target("s-1", "nightly", "backup", backup_type, repository_id, policy_id)


@dataclasses.dataclass
class Backup:
    backup_id: str


class FakeBackups:
    """Stands where omad/backup's service will: creates the backup's job row, then answers as told."""

    def __init__(self, engine: JobEngine, answer: str = "str") -> None:
        self.engine = engine
        self.answer = answer
        self.calls: list[tuple[Any, ...]] = []
        self.previous = False  # a completed backup exists: incrementals are allowed

    async def start(self, vm_name: str, repository_id: str | None, backup_type: str,
                    policy_id: str | None = None) -> Any:
        self.calls.append((vm_name, repository_id, backup_type, policy_id))
        if backup_type == "incremental" and not self.previous:
            raise Invalid("no previous backup", f"{vm_name} has no completed backup in repository {repository_id}")
        if await self.engine.db.scalar("SELECT 1 FROM jobs WHERE context_id = ? AND status = 'running'",
                                       (VM.context_id,)):
            raise Conflict("backup in progress", f"{vm_name} is being backed up")
        job_id = await self.engine.create("backup", display_name=f"backup of {vm_name}", context_id=VM.context_id)
        if self.answer == "str":
            return job_id
        if self.answer == "dict":
            return {"backup_id": job_id, "status": "started", "disk_results": []}
        if self.answer == "object":
            return Backup(job_id)
        return {"backup_id": "backup-without-a-job-row"}


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[JobEngine]:
    db = Database(tmp_path / "l.db")
    await db.open()
    await db.migrate()
    try:
        yield JobEngine(db)
    finally:
        await db.close()


@pytest.mark.parametrize("answer", ["str", "dict", "object"])
async def test_starts_through_the_backup_service_and_returns_the_job(engine: JobEngine, answer: str) -> None:
    backups = FakeBackups(engine, answer)
    launcher = BackupLauncher(backups, engine)
    job_id = await launcher.start(VM, target("full", policy_id="7"))
    assert (await engine.get(job_id))["job_type"] == "backup"
    assert backups.calls == [("web 01", "1", "full", "7")]


async def test_auto_is_incremental_when_possible_and_full_otherwise(engine: JobEngine) -> None:
    backups = FakeBackups(engine)
    launcher = BackupLauncher(backups, engine)
    first = await launcher.start(VM, target("auto"))
    assert [c[2] for c in backups.calls] == ["incremental", "full"]
    with pytest.raises(Conflict):  # the VM is busy: the scheduler waits, it does not count a failure
        await launcher.start(VM, target("auto"))
    await engine.finish(first)
    backups.previous, backups.calls = True, []
    await launcher.start(VM, target("auto"))
    assert [c[2] for c in backups.calls] == ["incremental"]


async def test_a_backup_without_a_job_row_is_refused_loudly(engine: JobEngine) -> None:
    launcher = BackupLauncher(FakeBackups(engine, "no row"), engine)
    with pytest.raises(Internal, match="has no job row"):
        await launcher.start(VM, target("full"))


async def test_checks_and_the_unconnected_stand_in(engine: JobEngine) -> None:
    with pytest.raises(Invalid) as e:
        await BackupLauncher(FakeBackups(engine), engine).check(target(repository_id=None))
    assert e.value.extra["field"] == "repository_id"
    await BackupLauncher(FakeBackups(engine), engine).check(target(repository_id=None, policy_id="3"))
    stand_in = UnconnectedLauncher("backup")
    await stand_in.check(target())
    with pytest.raises(Unavailable, match="no backup service"):
        await stand_in.start(VM, target())
