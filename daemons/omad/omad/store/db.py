"""The database: aiosqlite in WAL mode, one writer (serialised transactions), pooled readers, migrations."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Union

import aiosqlite

from oma_common.errors import Internal

log = logging.getLogger(__name__)

Params = Sequence[Any] | dict[str, Any]
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
FOREIGN_KEYS_OFF = "-- oma: foreign_keys=off"  # a migration's first line: run it without foreign keys (migrate())


class MigrationFailed(Internal):
    """A migration could not be applied: omad does not start (one clear line; see oma_common.daemon.run)."""


def utcnow() -> str:
    """Timestamps are stored as RFC 3339 UTC text, which sorts and compares correctly."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def split_statements(script: str) -> list[str]:
    """Split a migration into complete statements (triggers with inner semicolons stay whole)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(l.strip().startswith("--") or not l.strip() for l in buf.splitlines()):
        raise ValueError(f"incomplete statement at the end of a migration: {buf.strip()[:80]}")
    return out


class Tx:
    """A write transaction: the same calls as Database, inside BEGIN IMMEDIATE … COMMIT."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the last inserted rowid (for INSERT) or the changed row count."""
        cur = await self._conn.execute(sql, params)
        try:
            return (cur.lastrowid or 0) if sql.lstrip().upper().startswith("INSERT") else cur.rowcount
        finally:
            await cur.close()

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        await self._conn.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        async with self._conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        return dict(row) if row is not None else None

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        # One trip to the connection's thread (execute, fetch and close there), not three.
        rows = await self._conn.execute_fetchall(sql, params)
        return [dict(r) for r in rows]

    async def scalar(self, sql: str, params: Params = ()) -> Any:
        async with self._conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        return row[0] if row is not None else None


#: What a store function writes through: a transaction, or the database itself for a single statement (its own
#: transaction).
Writer = Union["Tx", "Database"]


class Database:
    """One writer connection for transactions (serialised) and a small pool of read-only connections.

    WAL lets readers run beside the writer and beside each other, so a long read (the whole VM list) delays
    neither writes nor other reads. `fetchone/fetchall/scalar` outside a transaction take a pooled reader
    and see the last committed state; inside `transaction()` (in the same task) they read on the writer,
    so they see the transaction's own uncommitted writes, as `tx.fetch*` do.
    """

    def __init__(self, path: Path, readers: int = 4) -> None:
        self.path = path
        self._write = asyncio.Lock()
        self._writer: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []  # every reader opened, idle or not
        self._idle: list[aiosqlite.Connection] = []
        self._reader_slots = asyncio.Semaphore(readers)
        # The task holding the writer and its Tx, while it does (see transaction()). Tasks created inside a
        # transaction inherit the variable; _current_tx() ignores it there, since they do not hold the lock.
        self._in_tx: contextvars.ContextVar[tuple[asyncio.Task[Any] | None, Tx] | None] = \
            contextvars.ContextVar(f"tx:{path}", default=None)

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise RuntimeError("database is not open")
        return self._writer

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect("PRAGMA journal_mode=WAL", "PRAGMA foreign_keys=ON",
                                           "PRAGMA synchronous=NORMAL")
        self.path.chmod(0o600)

    async def _connect(self, *pragmas: str) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(str(self.path), isolation_level=None)
        conn.row_factory = aiosqlite.Row
        for pragma in ("PRAGMA busy_timeout=5000", *pragmas):
            await (await conn.execute(pragma)).close()
        return conn

    async def close(self) -> None:
        readers, self._readers, self._idle = self._readers, [], []
        for conn in readers:
            await conn.close()
        if self._writer is not None:
            await self._writer.close()
            self._writer = None

    def _current_tx(self) -> Tx | None:
        held = self._in_tx.get()
        return held[1] if held is not None and held[0] is asyncio.current_task() else None

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[Tx]:
        """The current task's transaction, else a pooled read-only connection (opened on first need)."""
        tx = self._current_tx()
        if tx is not None:
            yield tx
            return
        self._conn  # noqa: B018 - raises when the database is closed
        async with self._reader_slots:
            if self._idle:
                conn = self._idle.pop()
            else:
                conn = await self._connect("PRAGMA query_only=ON")
                self._readers.append(conn)
            try:
                yield Tx(conn)
            finally:
                if conn in self._readers:  # not closed meanwhile
                    self._idle.append(conn)

    async def fetchone(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        async with self._reading() as r:
            return await r.fetchone(sql, params)

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        async with self._reading() as r:
            return await r.fetchall(sql, params)

    async def scalar(self, sql: str, params: Params = ()) -> Any:
        async with self._reading() as r:
            return await r.scalar(sql, params)

    async def ping(self) -> bool:
        try:
            return bool(await self.scalar("SELECT 1") == 1)
        except (sqlite3.Error, RuntimeError, ValueError):
            return False

    async def execute(self, sql: str, params: Params = ()) -> int:
        """One statement in its own transaction, or in the current task's transaction when it holds one."""
        tx = self._current_tx()
        if tx is not None:
            return await tx.execute(sql, params)
        async with self.transaction() as tx:
            return await tx.execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        tx = self._current_tx()
        if tx is not None:
            return await tx.executemany(sql, rows)
        async with self.transaction() as tx:
            await tx.executemany(sql, rows)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._write:
            async with self._begin() as tx:
                yield tx

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[Tx]:
        """BEGIN IMMEDIATE … COMMIT on the writer (ROLLBACK on any error); the caller holds the write lock."""
        conn = self._conn
        await (await conn.execute("BEGIN IMMEDIATE")).close()
        tx = Tx(conn)
        token = self._in_tx.set((asyncio.current_task(), tx))
        try:
            yield tx
        except BaseException:
            await (await conn.execute("ROLLBACK")).close()
            raise
        finally:
            self._in_tx.reset(token)
        await (await conn.execute("COMMIT")).close()

    async def _foreign_keys(self, on: bool) -> None:
        """Switch foreign key enforcement on the writer; a no-op inside a transaction (pragma_foreign_keys), so it
        is checked, not assumed."""
        await (await self._conn.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")).close()
        async with self._conn.execute("PRAGMA foreign_keys") as cur:
            row = await cur.fetchone()
        if row is None or bool(row[0]) != on:
            raise RuntimeError(f"PRAGMA foreign_keys={'ON' if on else 'OFF'} did not take effect")

    async def migrate(self, package: str = "omad.store.migrations") -> list[int]:
        """Apply every numbered migration not yet applied, each in its own transaction.

        A migration whose first line is `-- oma: foreign_keys=off` rebuilds a table that others reference
        (SQLite's 12-step ALTER TABLE procedure, https://sqlite.org/lang_altertable.html#otheralter): it runs
        with foreign keys off, switched outside its transaction (inside one the pragma does nothing, and
        dropping the old table would cascade into the referencing rows). Before its commit `PRAGMA
        foreign_key_check` must find nothing, else it is rolled back and omad does not start. Foreign keys are
        on again afterwards, whatever happened.
        """
        async with self.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                             "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
        done = {r["version"] for r in await self.fetchall("SELECT version FROM schema_version")}
        found = []
        for item in resources.files(package).iterdir():
            m = _MIGRATION.match(item.name)
            if m:
                found.append((int(m.group(1)), m.group(2), item.read_text()))
        applied = []
        for version, name, text in sorted(found):
            if version in done:
                continue
            if foreign_keys_off(text):
                await self._apply_without_foreign_keys(version, name, text)
            else:
                async with self.transaction() as tx:
                    await self._apply(tx, version, name, text)
            log.info("applied migration %04d_%s", version, name)
            applied.append(version)
        return applied

    @staticmethod
    async def _apply(tx: Tx, version: int, name: str, text: str) -> None:
        for stmt in split_statements(text):
            await tx.execute(stmt)
        await tx.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                         (version, name, utcnow()))

    async def _apply_without_foreign_keys(self, version: int, name: str, text: str) -> None:
        async with self._write:  # nothing else may write while the writer runs without foreign keys
            await self._foreign_keys(False)
            try:
                async with self._begin() as tx:
                    await self._apply(tx, version, name, text)
                    dangling = await tx.fetchall("PRAGMA foreign_key_check")
                    if dangling:
                        raise MigrationFailed(
                            "migration failed",
                            f"{version:04d}_{name} would leave {len(dangling)} row(s) referencing rows that do not "
                            f"exist ({_describe(dangling)}); it was rolled back and nothing changed",
                            migration=f"{version:04d}_{name}")
            finally:
                await self._foreign_keys(True)


def foreign_keys_off(migration: str) -> bool:
    """Whether a migration asks to run without foreign keys (its first line is the marker)."""
    first = migration.lstrip("\ufeff").split("\n", 1)[0]
    return first.strip() == FOREIGN_KEYS_OFF


def _describe(rows: list[dict[str, Any]], shown: int = 5) -> str:
    """`PRAGMA foreign_key_check` rows as `table rowid N -> parent`, the first few."""
    out = [f"{r['table']} rowid {r['rowid']} -> {r['parent']}" for r in rows[:shown]]
    return "; ".join(out) + (f"; and {len(rows) - shown} more" if len(rows) > shown else "")
