"""The database: migrations once, data kept across restarts, the bootstrap admin created exactly once."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from pathlib import Path

import pytest

from omad.store.db import Database, split_statements

from ..rig import Api, Stack


async def test_restart_keeps_data_and_runs_nothing_twice(stack: Stack) -> None:
    password = stack.admin_password
    assert stat.S_IMODE((stack.state / "admin-password").stat().st_mode) == 0o600
    versions = stack.sql("SELECT version FROM schema_version ORDER BY version")
    assert versions and versions[0][0] == 1
    assert stack.omactl("user", "add", "keeper", "--password-stdin", stdin="keep-me-123\n").returncode == 0
    assert stack.sql("PRAGMA journal_mode")[0][0] == "wal"

    assert stack.stop("omad") == {"omad": 0}
    stack.start("omad")
    assert stack.admin_password == password
    assert stack.sql("SELECT version FROM schema_version ORDER BY version") == versions
    assert stack.sql("SELECT COUNT(*) FROM users WHERE username = 'admin'") == [(1,)]
    assert stack.sql("SELECT COUNT(*) FROM audit_log WHERE action = 'user.bootstrap'") == [(1,)]
    async with Api(stack.url) as api:
        await api.login("keeper", "keep-me-123")
        await api.login("admin", password)


async def test_deleted_admin_is_not_recreated(stack: Stack) -> None:
    stack.stop("omad")
    stack.sql("DELETE FROM users WHERE username = 'admin'")
    stack.start("omad")
    assert stack.sql("SELECT COUNT(*) FROM users") == [(0,)]


async def test_foreign_keys_are_enforced(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    await db.open()
    try:
        applied = await db.migrate()
        assert applied[0] == 1 and applied == sorted(applied)  # every numbered migration, in order
        assert await db.migrate() == []
        with pytest.raises(sqlite3.IntegrityError):
            await db.execute("INSERT INTO sessions (token_hash, user_id, source, created_at, expires_at) "
                             "VALUES ('x', 999, 's', 'a', 'b')")
        assert await db.scalar("PRAGMA journal_mode") == "wal"
    finally:
        await db.close()


async def test_failed_migration_leaves_nothing_applied(tmp_path: Path) -> None:
    """A transaction per migration: a broken statement rolls the whole migration back."""
    db = Database(tmp_path / "y.db")
    await db.open()
    try:
        with pytest.raises(sqlite3.OperationalError):
            async with db.transaction() as tx:
                await tx.execute("CREATE TABLE t (a)")
                await tx.execute("INSERT INTO nowhere VALUES (1)")
        assert await db.scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 't'") == 0
    finally:
        await db.close()


def test_split_statements_keeps_triggers_whole() -> None:
    script = ("-- c\nCREATE TABLE a (x);\nCREATE TRIGGER t AFTER INSERT ON a BEGIN\n"
              "  UPDATE a SET x = 1; DELETE FROM a WHERE x = 2;\nEND;\n")
    assert len(split_statements(script)) == 2


async def test_reads_outside_a_transaction_use_read_only_connections(db: Database) -> None:
    """Pooled readers see what is committed; the transaction's own task reads its writes; readers cannot write."""
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO settings (key, value) VALUES ('k', 'uncommitted')")
        # Another task (one started here, too) neither waits for the transaction nor sees its writes.
        other = asyncio.create_task(db.scalar("SELECT COUNT(*) FROM settings WHERE key = 'k'"))
        assert await asyncio.wait_for(other, 5) == 0
        assert await db.scalar("SELECT value FROM settings WHERE key = 'k'") == "uncommitted"
    assert await db.scalar("SELECT value FROM settings WHERE key = 'k'") == "uncommitted"
    with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
        await db.fetchall("DELETE FROM settings")
    assert await db.scalar("SELECT COUNT(*) FROM settings WHERE key = 'k'") == 1


async def test_reads_run_side_by_side_and_close_with_the_database(tmp_path: Path) -> None:
    db = Database(tmp_path / "z.db", readers=3)
    await db.open()
    await db.migrate()
    # A slow read (a recursive count to 5 million, seconds) holds one reader; quick reads pass it on the others.
    slow = asyncio.create_task(db.scalar("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                                         "WHERE i < 5000000) SELECT COUNT(*) FROM n"))
    quick = [await db.scalar("SELECT COUNT(*) FROM users") for _ in range(10)]
    assert not slow.done() and quick == [0] * 10
    assert await slow == 5000000
    await db.close()
    with pytest.raises(RuntimeError):
        await db.scalar("SELECT 1")
    assert not await db.ping()
