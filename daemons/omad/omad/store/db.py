"""The database: aiosqlite in WAL mode with foreign keys on, serialised writes, and migrations at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

Params = Sequence[Any] | dict[str, Any]
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


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
            return cur.lastrowid if sql.lstrip().upper().startswith("INSERT") else cur.rowcount
        finally:
            await cur.close()

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        await self._conn.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        async with self._conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        return dict(row) if row is not None else None

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        async with self._conn.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [dict(r) for r in rows]

    async def scalar(self, sql: str, params: Params = ()) -> Any:
        async with self._conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        return row[0] if row is not None else None


class Database(Tx):
    """One connection; reads run freely, writes are serialised so a transaction is never interleaved."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._write = asyncio.Lock()
        self._conn_: aiosqlite.Connection | None = None

    @property
    def _conn(self) -> aiosqlite.Connection:  # type: ignore[override]
        if self._conn_ is None:
            raise RuntimeError("database is not open")
        return self._conn_

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn_ = await aiosqlite.connect(str(self.path), isolation_level=None)
        self._conn_.row_factory = aiosqlite.Row
        for pragma in ("PRAGMA journal_mode=WAL", "PRAGMA foreign_keys=ON", "PRAGMA busy_timeout=5000",
                       "PRAGMA synchronous=NORMAL"):
            await (await self._conn_.execute(pragma)).close()
        self.path.chmod(0o600)

    async def close(self) -> None:
        if self._conn_ is not None:
            await self._conn_.close()
            self._conn_ = None

    async def ping(self) -> bool:
        try:
            return await self.scalar("SELECT 1") == 1
        except (sqlite3.Error, RuntimeError, ValueError):
            return False

    async def execute(self, sql: str, params: Params = ()) -> int:
        async with self.transaction() as tx:
            return await tx.execute(sql, params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._write:
            await (await self._conn.execute("BEGIN IMMEDIATE")).close()
            try:
                yield Tx(self._conn)
            except BaseException:
                await (await self._conn.execute("ROLLBACK")).close()
                raise
            await (await self._conn.execute("COMMIT")).close()

    async def migrate(self, package: str = "omad.store.migrations") -> list[int]:
        """Apply every numbered migration not yet applied, each in its own transaction."""
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
            async with self.transaction() as tx:
                for stmt in split_statements(text):
                    await tx.execute(stmt)
                await tx.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                                 (version, name, utcnow()))
            log.info("applied migration %04d_%s", version, name)
            applied.append(version)
        return applied
