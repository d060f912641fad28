"""The backup and replication launchers against their domains' interfaces (stand-ins that record rows the same
way): what they pass, the ids they accept, auto's fall-back to a full backup, busy VMs, a job that failed after
it was recorded, a started backup without a job row, the repository check, and a replication's CloudStack
config (the VM's, else the default)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from oma_common.errors import Conflict, Internal, Invalid, NotFound, Unavailable
from omad.backup.backups import StartRequest
from omad.jobs.engine import JobEngine
from omad.replication import replications as replication
from omad.schedule.launcher import BackupLauncher, ReplicationLauncher, Start, Target, VmRef
from omad.store.db import Database

VM = VmRef("ctx-web-20250101-000000", "web 01")


def target(backup_type: str = "auto", repository_id: str | None = "1", policy_id: str | None = None) -> Target:
    return Target("s-1", "nightly", "backup", backup_type, repository_id, policy_id)


@dataclasses.dataclass
class Backup:
    backup_id: str


class FakeBackups:
    """Stands where omad/backup's service is: records the backup's job row, then answers as told."""

    def __init__(self, engine: JobEngine, answer: str = "dict") -> None:
        self.engine = engine
        self.answer = answer
        self.calls: list[tuple[Any, ...]] = []
        self.previous = False  # a completed backup exists: incrementals are allowed
        self.fail_after_record = False

    async def start(self, req: StartRequest, *, actor: str) -> Any:
        self.calls.append((req.vm_name, req.repository_id, req.backup_type, req.policy_id, req.tags, actor))
        if req.backup_type == "incremental" and not self.previous:
            raise Invalid("no previous backup", f"{req.vm_name} has nothing to continue in {req.repository_id}")
        active = await self.engine.db.scalar("SELECT id FROM jobs WHERE context_id = ? AND status = 'running'",
                                             (VM.context_id,))
        if active:
            raise Conflict("backup running", f"{req.vm_name} is being backed up", backup_id=active)
        job_id = await self.engine.create("backup", display_name=f"backup of {req.vm_name}", context_id=VM.context_id)
        if self.fail_after_record:
            await self.engine.finish(job_id, "failed", "nbd-pool unavailable")
            raise Unavailable("nbd-pool unavailable", "socket missing", backup_id=job_id)
        if self.answer == "str":
            return job_id
        if self.answer == "dict":
            return {"backup_id": job_id, "status": "started", "disk_results": []}
        if self.answer == "object":
            return Backup(job_id)
        return {"backup_id": "backup-without-a-job-row"}


class Repos:
    async def row(self, repo_id: str) -> dict[str, Any]:
        if repo_id != "1":
            raise NotFound("repository not found", f"backup repository {repo_id!r} does not exist")
        return {"id": "1"}


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
    assert backups.calls == [("web 01", "1", "full", "7", {"schedule_id": "s-1", "schedule_name": "nightly"},
                              "scheduler:nightly")]


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


async def test_a_backup_that_failed_after_it_was_recorded_is_followed(engine: JobEngine) -> None:
    backups = FakeBackups(engine)
    backups.fail_after_record = True
    job_id = await BackupLauncher(backups, engine).start(VM, target("full"))
    job = await engine.get(job_id)  # the scheduler will see it failed and retry as the schedule says
    assert job["status"] == "failed" and job["error_message"] == "nbd-pool unavailable"


async def test_the_target_is_checked(engine: JobEngine) -> None:
    launcher = BackupLauncher(FakeBackups(engine), engine, Repos())
    for bad, words in ((target(repository_id=None), "needs a repository_id"),
                       (target(repository_id=None, policy_id="3"), "a policy cannot choose the repository yet"),
                       (target(repository_id="9"), "backup repository '9' does not exist")):
        with pytest.raises(Invalid) as e:
            await launcher.check(bad)
        assert e.value.extra["field"] == "repository_id" and words in e.value.details
    await launcher.check(target(repository_id="1", policy_id="3"))


async def test_start_many_starts_one_by_one_and_reports_each_vm(engine: JobEngine) -> None:
    backups = FakeBackups(engine)
    launcher = BackupLauncher(backups, engine)
    other = VmRef("ctx-db-20250101-000000", "db 01")
    starts = [Start(vm, target("full")) for vm in (VM, VM, other)]
    got = [(s.vm, out) async for s, out in launcher.start_many(starts)]
    assert [vm for vm, _ in got] == [VM, VM, other]
    assert isinstance(got[0][1], str) and (await engine.get(got[0][1]))["status"] == "running"
    assert isinstance(got[1][1], Conflict)  # busy: reported, not raised, and the next VM still starts
    assert isinstance(got[2][1], Conflict)  # (the stand-in keeps every backup on the one context)

    async def broken(vm: VmRef, t: Target) -> str:
        raise KeyError("a launcher bug")

    launcher.start = broken  # type: ignore[method-assign,assignment]
    got = [(s.vm, out) async for s, out in launcher.start_many(starts[1:])]
    assert [type(out).__name__ for _, out in got] == ["OmaError", "OmaError"]
    assert "failed unexpectedly" in str(got[0][1])


# -- replications --------------------------------------------------------------------------------------

class FakeReplications:
    """Stands where omad/replication's service is: records the replication's job row, then answers as told."""

    def __init__(self, engine: JobEngine) -> None:
        self.engine = engine
        self.requests: list[tuple[replication.StartRequest, str]] = []
        self.fail_after_record = False

    async def start(self, req: replication.StartRequest, *, actor: str) -> dict[str, Any]:
        self.requests.append((req, actor))
        active = await self.engine.db.scalar("SELECT id FROM jobs WHERE context_id = ? AND status = 'running'",
                                             (VM.context_id,))
        if active:
            raise Conflict("replication running", f"{req.source_vm.name} has a replication running", job_id=active)
        job_id = await self.engine.create("replication", display_name="sync", context_id=VM.context_id)
        if self.fail_after_record:
            await self.engine.finish(job_id, "failed", "volume-agent unavailable")
            raise Unavailable("volume-agent unavailable", "socket missing", job_id=job_id)
        return {"job_id": job_id, "status": "replicating"}


def sync(replication_type: str = "auto") -> Start:
    return Start(VM, Target("s-2", "hourly sync", "replication", "auto", None, None, replication_type),
                 execution_id=41, group_id="g-7")


async def add_vm(db: Database, config_id: int | None) -> None:
    t = "2025-01-01T00:00:00.000Z"
    await db.execute("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, "
                     "datacenter, ossea_config_id, created_at, updated_at) VALUES (?, ?, '4210-1', '/DC1/vm/web 01', "
                     "'vc.example.com', 'DC1', ?, ?, ?)", (VM.context_id, VM.vm_name, config_id, t, t))


async def test_a_replication_starts_through_the_replication_service(engine: JobEngine) -> None:
    await add_vm(engine.db, 3)
    service = FakeReplications(engine)
    launcher = ReplicationLauncher(service, engine.db)
    job_id = await launcher.start(sync("full"))
    assert (await engine.get(job_id))["job_type"] == "replication"
    [(req, actor)] = service.requests
    assert (req.source_vm.id, req.source_vm.name, req.ossea_config_id, req.replication_type) == \
        ("4210-1", "web 01", 3, "initial")
    assert (req.vcenter_host, req.datacenter, req.start_replication) == ("vc.example.com", "DC1", True)
    assert (req.schedule_execution_id, req.vm_group_id, req.scheduled_by, actor) == \
        ("41", "g-7", "hourly sync", "scheduler:hourly sync")
    with pytest.raises(Conflict):  # busy: the scheduler skips the VM
        await launcher.start(sync())
    await engine.finish(job_id)
    await launcher.start(sync("auto"))
    assert [r.replication_type for r, _ in service.requests] == ["initial", None, None]


async def test_a_replication_that_failed_after_it_was_recorded_is_followed(engine: JobEngine) -> None:
    await add_vm(engine.db, 3)
    service = FakeReplications(engine)
    service.fail_after_record = True
    job_id = await ReplicationLauncher(service, engine.db).start(sync("incremental"))
    assert (await engine.get(job_id))["status"] == "failed"
    assert service.requests[0][0].replication_type == "incremental"


async def test_the_cloudstack_config_is_the_vms_else_the_default(engine: JobEngine) -> None:
    await add_vm(engine.db, None)
    service = FakeReplications(engine)
    launcher = ReplicationLauncher(service, engine.db)
    with pytest.raises(Invalid, match="no CloudStack config"):
        await launcher.start(sync())
    t = "2025-01-01T00:00:00.000Z"
    await engine.db.execute("INSERT INTO ossea_configs (id, name, api_url, api_key, secret_key_sealed, is_default, "
                            "created_at, updated_at) VALUES (8, 'main', 'http://cs/client/api', 'k', 's', 1, ?, ?)",
                            (t, t))
    await launcher.start(sync())
    assert service.requests[-1][0].ossea_config_id == 8
    with pytest.raises(Invalid, match="replication_type"):
        await launcher.check(sync("differential").target)
    await launcher.check(sync("auto").target)
