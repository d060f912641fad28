"""The migration runner's foreign-key mode (a table that others reference rebuilt without losing their rows, a
migration that would leave a dangling reference rolled back, foreign keys on again either way), migration
0019 upgrading a database full of schedules and executions, and 0022 one of restore mounts."""

from __future__ import annotations

import importlib
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path

import pytest

from oma_common.errors import OmaError
from omad.store.db import FOREIGN_KEYS_OFF, Database, MigrationFailed, foreign_keys_off

pytestmark = pytest.mark.timeout(60)

_names = itertools.count()

PARENTS = """
CREATE TABLE parent (id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('a')));
CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id TEXT NOT NULL REFERENCES parent(id) ON DELETE CASCADE);
INSERT INTO parent VALUES ('p1', 'a'), ('p2', 'a');
INSERT INTO child (parent_id) VALUES ('p1'), ('p1'), ('p2');
"""

# SQLite's 12-step procedure: a new table, the rows copied, the old one dropped, the new one renamed.
REBUILD = """
CREATE TABLE parent_new (id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('a', 'b')));
INSERT INTO parent_new (id, kind) SELECT id, kind FROM parent {where};
DROP TABLE parent;
ALTER TABLE parent_new RENAME TO parent;
"""

Packages = Callable[[dict[str, str]], str]


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Packages:
    """Make an importable package of migration files (name → text); returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(files: dict[str, str]) -> str:
        name = f"oma_test_migrations_{next(_names)}"
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        for file, text in files.items():
            (pkg / file).write_text(text)
        importlib.invalidate_caches()
        return name

    return make


@pytest.fixture
async def fresh(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(tmp_path / "m.db")
    await db.open()
    try:
        yield db
    finally:
        await db.close()


async def foreign_keys_on(db: Database) -> bool:
    async with db.transaction() as tx:  # the writer's setting (pooled readers never enforce anything)
        return bool(await tx.scalar("PRAGMA foreign_keys"))


async def test_a_rebuilt_parent_keeps_its_children_and_foreign_keys_come_back(fresh: Database,
                                                                            packages: Packages) -> None:
    db = fresh
    pkg = packages({"0001_parents.sql": PARENTS,
                    "0002_rebuild.sql": f"{FOREIGN_KEYS_OFF}\n-- kind may be 'b'\n" + REBUILD.format(where="")})
    assert await db.migrate(pkg) == [1, 2]
    assert await db.scalar("SELECT COUNT(*) FROM child") == 3
    await db.execute("INSERT INTO parent VALUES ('p3', 'b')")  # the new CHECK
    assert await foreign_keys_on(db)
    with pytest.raises(sqlite3.IntegrityError):
        await db.execute("INSERT INTO child (parent_id) VALUES ('nobody')")
    await db.execute("DELETE FROM parent WHERE id = 'p1'")  # and they cascade again, into the renamed table
    assert await db.scalar("SELECT COUNT(*) FROM child") == 1


async def test_without_the_marker_the_same_rebuild_cascades_into_the_children(fresh: Database,
                                                                            packages: Packages) -> None:
    """Why the marker exists: inside a transaction PRAGMA foreign_keys=OFF does nothing, so the DROP deletes
    the children through ON DELETE CASCADE."""
    pkg = packages({"0001_parents.sql": PARENTS,
                    "0002_rebuild.sql": "PRAGMA foreign_keys=OFF;\n" + REBUILD.format(where="")})
    assert await fresh.migrate(pkg) == [1, 2]
    assert await fresh.scalar("SELECT COUNT(*) FROM child") == 0


async def test_a_dangling_reference_rolls_the_migration_back(fresh: Database, packages: Packages) -> None:
    db = fresh
    pkg = packages({"0001_parents.sql": PARENTS,
                    "0002_lossy.sql": f"{FOREIGN_KEYS_OFF}\n" + REBUILD.format(where="WHERE id = 'p1'")})
    with pytest.raises(MigrationFailed) as failed:
        await db.migrate(pkg)
    assert isinstance(failed.value, OmaError)  # omad's start fails with one line (oma_common.daemon.run)
    assert "0002_lossy" in failed.value.details and "child rowid 3 -> parent" in failed.value.details
    assert "rolled back" in failed.value.details
    assert await db.fetchall("SELECT version FROM schema_version") == [{"version": 1}]
    assert await db.fetchall("SELECT id FROM parent ORDER BY id") == [{"id": "p1"}, {"id": "p2"}]
    assert await db.scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'parent_new'") == 0
    with pytest.raises(sqlite3.IntegrityError):  # the old CHECK: nothing of 0002 stayed
        await db.execute("INSERT INTO parent VALUES ('p3', 'b')")
    assert await foreign_keys_on(db)
    with pytest.raises(sqlite3.IntegrityError):
        await db.execute("INSERT INTO child (parent_id) VALUES ('nobody')")


async def test_a_failing_statement_also_turns_foreign_keys_back_on(fresh: Database, packages: Packages) -> None:
    pkg = packages({"0001_parents.sql": PARENTS,
                    "0002_broken.sql": f"{FOREIGN_KEYS_OFF}\nDROP TABLE parent;\nINSERT INTO nowhere VALUES (1);\n"})
    with pytest.raises(sqlite3.OperationalError):
        await fresh.migrate(pkg)
    assert await fresh.scalar("SELECT COUNT(*) FROM parent") == 2
    assert await fresh.scalar("SELECT COUNT(*) FROM child") == 3
    assert await foreign_keys_on(fresh)


def real_migrations_before(version: int) -> dict[str, str]:
    return {item.name: item.read_text() for item in resources.files("omad.store.migrations").iterdir()
            if item.name.endswith(".sql") and int(item.name[:4]) < version}


async def migrate_before(db: Database, packages: Packages, version: int) -> None:
    """The real schema as it was before migration `version`."""
    before = await db.migrate(packages(real_migrations_before(version)))
    assert before and max(before) < version


async def test_0019_keeps_schedules_executions_and_group_links(fresh: Database, packages: Packages) -> None:
    db = fresh
    await migrate_before(db, packages, 19)
    t = "2025-01-01T00:00:00.000Z"
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, "
                         "vcenter_host, created_at, updated_at) VALUES ('ctx-a', 'a', '4210-a', '/DC1/vm/a', "
                         "'vc', ?, ?)", (t, t))
        for i in range(3):
            await tx.execute(
                "INSERT INTO schedules (id, name, cron_expression, repository_id, replication_type, next_run_at, "
                "created_at, updated_at) VALUES (?, ?, '0 0 2 * * *', '1', ?, ?, ?, ?)",
                (f"s{i}", f"nightly {i}", "auto" if i == 2 else None, t, t, t))
            await tx.execute("INSERT INTO vm_machine_groups (id, name, schedule_id, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?)", (f"g{i}", f"group {i}", f"s{i}", t, t))
            for n in range(2):
                eid = await tx.execute(
                    "INSERT INTO schedule_executions (schedule_id, scheduled_at, status, triggered_by, "
                    "vms_eligible, jobs_created, jobs_completed) VALUES (?, ?, 'completed', 'scheduler', 1, 1, 1)",
                    (f"s{i}", t))
                await tx.execute("INSERT INTO schedule_execution_vms (execution_id, vm_context_id, group_id, "
                                 "position, status, job_id) VALUES (?, 'ctx-a', ?, 0, 'completed', ?)",
                                 (eid, f"g{i}", f"job-{i}-{n}"))
                await tx.execute("INSERT INTO schedule_execution_jobs (job_id, execution_id, vm_context_id, "
                                 "attempt, status, created_at) VALUES (?, ?, 'ctx-a', 1, 'completed', ?)",
                                 (f"job-{i}-{n}", eid, t))
    tables = ("schedules", "schedule_executions", "schedule_execution_vms", "schedule_execution_jobs")
    rows = {name: await db.fetchall(f"SELECT * FROM {name} ORDER BY 1, 2") for name in tables}
    links = await db.fetchall("SELECT id, schedule_id FROM vm_machine_groups ORDER BY id")

    assert (await db.migrate())[0] == 19  # and whatever came after it
    for name in tables:
        assert await db.fetchall(f"SELECT * FROM {name} ORDER BY 1, 2") == rows[name], name
    assert await db.fetchall("SELECT id, schedule_id FROM vm_machine_groups ORDER BY id") == links
    assert await foreign_keys_on(db)

    # The new rule, and the old ones kept: triggers, indexes, cascades.
    await db.execute("INSERT INTO schedules (id, name, cron_expression, action, replication_type, created_at, "
                     "updated_at) VALUES ('r', 'replicate', '0 0 * * * *', 'replication', 'incremental', ?, ?)", (t, t))
    with pytest.raises(sqlite3.IntegrityError):  # a replication schedule names its type
        await db.execute("INSERT INTO schedules (id, name, cron_expression, action, created_at, updated_at) "
                         "VALUES ('r2', 'r2', '0 0 * * * *', 'replication', ?, ?)", (t, t))
    with pytest.raises(sqlite3.IntegrityError):
        await db.execute("INSERT INTO schedules (id, name, cron_expression, action, repository_id, created_at, "
                         "updated_at) VALUES ('x', 'x', '0 0 * * * *', 'copy', '1', ?, ?)", (t, t))
    with pytest.raises(sqlite3.IntegrityError, match="vm_machine_groups.schedule_id"):
        await db.execute("INSERT INTO vm_machine_groups (id, name, schedule_id, created_at, updated_at) "
                         "VALUES ('g9', 'group 9', 'nowhere', ?, ?)", (t, t))
    assert await db.scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'schedules_due'") == 1
    await db.execute("DELETE FROM schedules WHERE id = 's0'")
    assert await db.scalar("SELECT COUNT(*) FROM schedule_executions WHERE schedule_id = 's0'") == 0
    assert await db.scalar("SELECT COUNT(*) FROM schedule_execution_jobs WHERE job_id LIKE 'job-0-%'") == 0
    assert await db.scalar("SELECT schedule_id FROM vm_machine_groups WHERE id = 'g0'") is None
    assert await db.scalar("SELECT COUNT(*) FROM schedule_executions") == 4


def test_the_marker_is_the_first_line_only() -> None:
    assert foreign_keys_off(f"{FOREIGN_KEYS_OFF}\nCREATE TABLE t (a);\n")
    assert not foreign_keys_off(f"-- a comment\n{FOREIGN_KEYS_OFF}\n")
    assert not foreign_keys_off("CREATE TABLE t (a);\n")
    assert foreign_keys_off((resources.files("omad.store.migrations") / "0019_schedule_replication.sql")
                            .read_text())


async def test_0022_lets_a_restore_mount_be_broken_and_keeps_every_row(fresh: Database, packages: Packages) -> None:
    from omad.store import restore_mounts

    db = fresh
    await migrate_before(db, packages, 22)
    t = "2025-01-01T00:00:00.000Z"
    async with db.transaction() as tx:
        for i, status in enumerate(("mounting", "mounted", "unmounted", "expired", "failed")):
            await tx.execute(
                "INSERT INTO restore_mounts (id, backup_id, disk_index, image_path, status, mount_path, device, "
                "filesystem_type, filesystems, error_message, created_by, created_at, expires_at, ended_at) "
                "VALUES (?, 'b1', ?, '/repo/b1/disk0.qcow2', ?, ?, ?, 'ext4', ?, ?, 'admin', ?, ?, ?)",
                (f"rm-{i}", i, status, f"/run/oma/restore/rm-{i}" if status == "mounted" else None,
                 "/dev/loop3" if status == "mounted" else None, '[{"partition": 1, "type": "ext4"}]',
                 "no filesystem" if status == "failed" else None, t, t, None if status.startswith("mount") else t))
        await tx.execute("INSERT INTO restore_mounts (id, backup_id, image_path, status, created_at) "
                         "VALUES ('rm-defaults', 'b2', '/repo/b2/disk0.qcow2', 'mounted', ?)", (t,))

    def shape(sql: str) -> str:
        return f"SELECT * FROM pragma_{sql}('restore_mounts') ORDER BY 1"

    columns = await db.fetchall(shape("table_info"))
    indexes = await db.fetchall("SELECT name, sql FROM sqlite_master WHERE tbl_name = 'restore_mounts' "
                                "AND type IN ('index', 'trigger') ORDER BY name")
    rows = await db.fetchall("SELECT * FROM restore_mounts ORDER BY id")

    assert 22 in await db.migrate()
    assert await db.fetchall("SELECT * FROM restore_mounts ORDER BY id") == rows
    assert await db.fetchall(shape("table_info")) == columns  # names, types, defaults, NOT NULL, key
    assert await db.fetchall("SELECT name, sql FROM sqlite_master WHERE tbl_name = 'restore_mounts' "
                             "AND type IN ('index', 'trigger') ORDER BY name") == indexes
    assert {"restore_mounts_backup", "restore_mounts_status"} <= {i["name"] for i in indexes}
    assert await db.scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'restore_mounts_new'") == 0
    assert await foreign_keys_on(db)

    # The new status, through its one writer: only a mounted mount breaks, and a broken one can still end.
    async with db.transaction() as tx:
        assert await restore_mounts.mark_broken(tx, "rm-1", "qemu-storage-daemon (pid 7) killed by SIGKILL")
        assert not await restore_mounts.mark_broken(tx, "rm-0", "x")  # still mounting
        assert not await restore_mounts.mark_broken(tx, "rm-3", "x")  # ended
    m = await restore_mounts.get(db, "rm-1")
    assert m.status == restore_mounts.MountStatus.BROKEN and m.held and not m.active
    assert m.error_message == "qemu-storage-daemon (pid 7) killed by SIGKILL" and m.ended_at is None
    assert sorted(h.id for h in await restore_mounts.held(db)) == ["rm-0", "rm-1", "rm-defaults"]
    async with db.transaction() as tx:
        assert await restore_mounts.mark_unmounted(tx, "rm-1", t)
    assert (await restore_mounts.get(db, "rm-1")).status == "unmounted"
    with pytest.raises(sqlite3.IntegrityError):  # the CHECK is still there, with one value more
        await db.execute("UPDATE restore_mounts SET status = 'gone' WHERE id = 'rm-2'")
