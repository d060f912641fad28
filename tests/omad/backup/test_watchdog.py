"""The backups' watchdog with a fake clock and a fake nbd-pool: a client on an export or word from the VMA
keeps a backup alive, silence beyond the limit fails it, an unreachable nbd-pool fails nobody, leases are
renewed at a third of their length, and what ended backups still hold is released."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from oma_common.contracts.nbd_pool import Export, Lease, PortRange, PortStatus, Released, Renewed
from oma_common.errors import Unavailable
from omad.adapters.localfs import LocalFs
from omad.backup.teardown import Teardown
from omad.backup.watchdog import Watchdog
from omad.config import BackupConfig
from omad.jobs.engine import JobEngine
from omad.jobs.locks import KeyedLocks
from omad.store.db import Database

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def export(job_id: str, name: str, clients: list[str] | None = None, connection_count: int = 0) -> Export:
    return Export(pid=None, port=10809, export_name=name, path="/r/x.qcow2", qcow2_path="/r/x.qcow2",
                  resolved_path="/r/x.qcow2", format="qcow2", job_id=job_id, clients=clients or [],
                  connection_count=connection_count)


def lease(port: int, job_id: str) -> Lease:
    return Lease(port, job_id, None, stamp(T0), stamp(T0))


class FakePool:
    def __init__(self) -> None:
        self.exports_list: list[Export] = []
        self.allocations: list[Lease] = []
        self.down = False
        self.released: list[str] = []
        self.renewed: list[tuple[str, int]] = []

    async def exports(self) -> list[Export]:
        if self.down:
            raise Unavailable("nbd-pool unavailable", "socket gone")
        return self.exports_list

    async def status(self) -> PortStatus:
        if self.down:
            raise Unavailable("nbd-pool unavailable", "socket gone")
        return PortStatus(10, len(self.allocations), 10 - len(self.allocations), PortRange(1, 10), [], self.allocations)

    async def renew(self, job_id: str, lease_seconds: int | None = None) -> Renewed:
        self.renewed.append((job_id, lease_seconds or 0))
        return Renewed(job_id, stamp(T0), [])

    async def release_job(self, job_id: str) -> Released:
        self.released.append(job_id)
        self.allocations = [a for a in self.allocations if a.job_id != job_id]
        self.exports_list = [e for e in self.exports_list if e.job_id != job_id]
        return Released(True, 0, [], 0, [])


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def stamp(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(tmp_path / "w.db")
    await database.open()
    await database.migrate()
    t = stamp(T0)
    await database.execute("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, "
                           "vcenter_host, created_at, updated_at) VALUES ('ctx-a', 'a', 'u-a', '/p', 'vc', ?, ?)",
                           (t, t))
    await database.execute("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, "
                           "vcenter_host, created_at, updated_at) VALUES ('ctx-b', 'b', 'u-b', '/p', 'vc', ?, ?)",
                           (t, t))
    await database.execute("INSERT INTO backup_repositories (id, name, type, config, root_path, created_at, "
                           "updated_at) VALUES ('repo-1', 'r', 'local', '{}', ?, ?, ?)", (str(tmp_path), t, t))
    try:
        yield database
    finally:
        await database.close()


async def add_backup(db: Database, jobs: JobEngine, backup_id: str, context: str, status: str = "running") -> None:
    t = stamp(T0)
    await db.execute("INSERT INTO backup_jobs (backup_id, vm_context_id, vm_name, repository_id, backup_type, "
                     "chain_id, status, created_at, started_at, last_activity_at, updated_at) "
                     "VALUES (?, ?, ?, 'repo-1', 'full', ?, ?, ?, ?, ?, ?)",
                     (backup_id, context, context, backup_id, status, t, t, t, t))
    await db.execute("INSERT INTO backup_disks (backup_id, disk_index, disk_id, capacity_bytes, qcow2_path, "
                     "nbd_export_name, status) VALUES (?, 0, 'disk-2000', 1048576, ?, ?, 'exporting')",
                     (backup_id, f"{context}/{backup_id}-disk-2000.qcow2", f"{backup_id}-disk-2000"))
    await jobs.create("backup", job_id=backup_id, display_name=backup_id, context_id=context)


def make(db: Database, pool: FakePool, clock: Clock) -> tuple[Watchdog, JobEngine]:
    jobs = JobEngine(db)
    cfg = BackupConfig(idle_timeout_seconds=60, watchdog_interval_seconds=1, lease_seconds=300)
    teardown = Teardown(db, jobs, pool, LocalFs(timeout=5), KeyedLocks())  # type: ignore[arg-type]
    return Watchdog(db, pool, teardown, cfg, clock=clock), jobs  # type: ignore[arg-type]


async def status_of(db: Database, backup_id: str) -> tuple[str, str | None]:
    row = await db.fetchone("SELECT status, error_message FROM backup_jobs WHERE backup_id = ?", (backup_id,))
    assert row is not None
    return row["status"], row["error_message"]


async def test_clients_or_telemetry_keep_a_backup_alive_and_silence_fails_it(db: Database) -> None:
    pool, clock = FakePool(), Clock()
    dog, jobs = make(db, pool, clock)
    await add_backup(db, jobs, "bk-a", "ctx-a")
    await add_backup(db, jobs, "bk-b", "ctx-b")
    pool.exports_list = [export("bk-a", "bk-a-disk-2000", ["127.0.0.1:5000"]), export("bk-b", "bk-b-disk-2000")]
    clock.advance(50)
    assert await dog.check() == []
    clock.advance(20)  # b: 70 s of silence; a: a client is connected
    assert await dog.check() == ["bk-b"]
    assert (await status_of(db, "bk-a"))[0] == "running"
    status, reason = await status_of(db, "bk-b")
    assert status == "failed" and reason is not None and reason.startswith("idle: ") and "limit 60 s" in reason
    assert "bk-b" in pool.released and (await jobs.get("bk-b"))["status"] == "failed"

    pool.exports_list[0].clients = []  # the VMA hung up: a's last activity is the last pass (t0 + 70)
    clock.advance(59)
    assert await dog.check() == []
    await db.execute("UPDATE backup_jobs SET last_activity_at = ? WHERE backup_id = 'bk-a'", (stamp(clock.now),))
    clock.advance(59)  # telemetry came in: the count starts again
    assert await dog.check() == []
    clock.advance(2)
    assert await dog.check() == ["bk-a"]


async def test_an_unreachable_nbd_pool_fails_nobody(db: Database) -> None:
    pool, clock = FakePool(), Clock()
    dog, jobs = make(db, pool, clock)
    await add_backup(db, jobs, "bk-a", "ctx-a")
    pool.down = True
    clock.advance(3600)
    assert await dog.check() == []
    assert (await status_of(db, "bk-a"))[0] == "running"
    pool.down = False
    assert await dog.check() == ["bk-a"]


async def test_leases_are_renewed_at_a_third_and_leftovers_of_ended_backups_released(db: Database) -> None:
    pool, clock = FakePool(), Clock()
    dog, jobs = make(db, pool, clock)
    await add_backup(db, jobs, "bk-a", "ctx-a")
    await add_backup(db, jobs, "bk-done", "ctx-b", status="completed")
    pool.exports_list = [export("bk-a", "bk-a-disk-2000", connection_count=2)]
    pool.allocations = [lease(1, "bk-a"), lease(2, "bk-done"), lease(3, "replication-job")]
    await dog.check()
    assert pool.renewed == [("bk-a", 300)]
    assert pool.released == ["bk-done"]  # an ended backup's port; another job type's port is not ours
    assert [a.job_id for a in pool.allocations] == ["bk-a", "replication-job"]
    clock.advance(99)
    await dog.check()
    assert len(pool.renewed) == 1
    clock.advance(2)
    await dog.check()
    assert pool.renewed == [("bk-a", 300), ("bk-a", 300)]
