"""The database: aiosqlite in WAL mode, one writer (serialised transactions), pooled readers, migrations."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Union

import aiosqlite

from oma_common.errors import InsufficientStorage, Internal, OmaError, Unavailable

log = logging.getLogger(__name__)

Params = Sequence[Any] | dict[str, Any]
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
FOREIGN_KEYS_OFF = "-- oma: foreign_keys=off"  # a migration's first line: run it without foreign keys (migrate())


class MigrationFailed(Internal):
    """A migration could not be applied: omad does not start (one clear line; see oma_common.daemon.run)."""


class StorageFull(InsufficientStorage):
    """The appliance's storage is full: omad cannot write its database. What the request was writing was not
    stored; the same request succeeds once space is freed."""

    code = "storage_full"


class DatabaseBusy(Unavailable):
    """Another process holds omad's database locked for longer than omad waits; try again shortly."""

    code = "database_busy"


#: What any request may end in, since any may write the database (a session, an API token's last use, the
#: audit): declared on every route of omad at once (api/app.py).
STORAGE_ERRORS: tuple[type[OmaError], ...] = (StorageFull, DatabaseBusy)

# SQLite's primary result codes (https://sqlite.org/rescode.html); an extended code keeps its primary in the low
# byte (SQLITE_IOERR_SHMSIZE is SQLITE_IOERR | 19<<8).
SQLITE_BUSY = 5
SQLITE_IOERR = 10
SQLITE_FULL = 13
NEARLY_FULL_BYTES = 1024 * 1024  # an I/O error with less free than this is the disk being full


def storage_error(error: sqlite3.Error, path: Path, busy_timeout: float) -> OmaError | None:
    """The domain error an SQLite failure stands for when the storage is at fault, not omad: the disk is full
    (SQLITE_FULL; or an I/O error on a file system with next to no space left, as growing the -shm file fails
    with SQLITE_IOERR_SHMSIZE), or the database is locked by another process past the busy timeout
    (SQLITE_BUSY). None for anything else (a bug: the edge answers 500 and logs it)."""
    primary = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    if primary == SQLITE_FULL or (primary == SQLITE_IOERR and _nearly_full(path.parent)):
        return StorageFull("the appliance's storage is full",
                           f"omad cannot write its database on the file system holding {path.parent} ({error}); "
                           f"nothing of this change was stored; free space there and try again")
    if primary == SQLITE_BUSY:
        return DatabaseBusy("the appliance's database is busy",
                            f"another process has held {path} locked for more than {busy_timeout:g} s; nothing of "
                            f"this change was stored; try again shortly", retry_after=1)
    return None


def _nearly_full(directory: Path) -> bool:
    free = free_bytes(directory)
    return free is not None and free < NEARLY_FULL_BYTES


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer such as omad may still use on the file system holding `directory` (None when
    it cannot be asked). Only on a write's error path: a local stat, where the database is."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@dataclasses.dataclass(frozen=True)
class Refusal:
    """The last write the full storage refused (until a write commits again), as health reports it."""

    at: str
    details: str
    free_bytes: int | None  # free on the database's file system then


@contextlib.contextmanager
def storage_errors(path: Path, busy_timeout: float) -> Iterator[None]:
    """Raise a full disk or a lasting lock as the domain error it is (see storage_error); other errors pass."""
    try:
        yield
    except sqlite3.Error as e:
        err = storage_error(e, path, busy_timeout)
        if err is None:
            raise
        raise err from e


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

    def __init__(self, conn: aiosqlite.Connection, path: Path, busy_timeout: float) -> None:
        self._conn = conn
        self._path = path
        self._busy_timeout = busy_timeout
        self._after_commit: list[Callable[[], None]] = []

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the transaction is committed; never when it is rolled back (a log line that says
        something was done, e.g. the audit's, must not outlive a rollback)."""
        self._after_commit.append(fn)

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return storage_errors(self._path, self._busy_timeout)

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the last inserted rowid (for INSERT) or the changed row count."""
        with self._errors():
            cur = await self._conn.execute(sql, params)
        try:
            return (cur.lastrowid or 0) if sql.lstrip().upper().startswith("INSERT") else cur.rowcount
        finally:
            await cur.close()

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        with self._errors():
            await self._conn.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        with self._errors():
            async with self._conn.execute(sql, params) as cur:
                row = await cur.fetchone()
        return dict(row) if row is not None else None

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        # One trip to the connection's thread (execute, fetch and close there), not three.
        with self._errors():
            rows = await self._conn.execute_fetchall(sql, params)
        return [dict(r) for r in rows]

    async def scalar(self, sql: str, params: Params = ()) -> Any:
        with self._errors():
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

    def __init__(self, path: Path, readers: int = 4, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout  # how long a statement waits for another connection's lock (seconds)
        self._write = asyncio.Lock()
        self._writer: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []  # every reader opened, idle or not
        self._idle: list[aiosqlite.Connection] = []
        self._reader_slots = asyncio.Semaphore(readers)
        # The task holding the writer and its Tx, while it does (see transaction()). Tasks created inside a
        # transaction inherit the variable; _current_tx() ignores it there, since they do not hold the lock.
        self._in_tx: contextvars.ContextVar[tuple[asyncio.Task[Any] | None, Tx] | None] = \
            contextvars.ContextVar(f"tx:{path}", default=None)
        self.refused: Refusal | None = None  # the last write refused for lack of space, until one commits

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
        try:
            conn.row_factory = aiosqlite.Row
            with storage_errors(self.path, self.busy_timeout):  # a new database on a full disk fails here
                for pragma in (f"PRAGMA busy_timeout={round(self.busy_timeout * 1000)}", *pragmas):
                    await (await conn.execute(pragma)).close()
        except BaseException:
            await conn.close()  # its thread would keep the process alive after the error
            raise
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
                yield Tx(conn, self.path, self.busy_timeout)
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

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the current task's transaction commits (never when it rolls back), or now when the task
        holds none: a statement outside a transaction is committed once it returned."""
        tx = self._current_tx()
        if tx is None:
            fn()
        else:
            tx.after_commit(fn)

    async def ping(self) -> bool:
        try:
            return bool(await self.scalar("SELECT 1") == 1)
        except (sqlite3.Error, OmaError, RuntimeError, ValueError):
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
        """BEGIN IMMEDIATE … COMMIT on the writer (ROLLBACK on any error); the caller holds the write lock.

        A failed statement or COMMIT (disk full, I/O error) may already have rolled the transaction back
        (https://sqlite.org/lang_transaction.html, "Response To Errors Within A Transaction"), and a COMMIT that
        fails may leave it open: either way the writer ends outside a transaction, so the next one can begin
        once the cause is gone, and the caller sees the error that happened, not the ROLLBACK's.
        """
        conn = self._conn
        tx = Tx(conn, self.path, self.busy_timeout)
        if conn.in_transaction:  # a ROLLBACK that failed earlier left one open
            await self._rollback(conn)
        with self._noting_refusal(), tx._errors():
            await (await conn.execute("BEGIN IMMEDIATE")).close()
        token = self._in_tx.set((asyncio.current_task(), tx))
        try:
            with self._noting_refusal():
                yield tx
        except BaseException:
            await self._rollback(conn)
            raise
        finally:
            self._in_tx.reset(token)
        try:
            with self._noting_refusal(), tx._errors():
                await (await conn.execute("COMMIT")).close()
        except BaseException:
            await self._rollback(conn)
            raise
        self.refused = None
        for fn in tx._after_commit:
            fn()

    @contextlib.contextmanager
    def _noting_refusal(self) -> Iterator[None]:
        """Remember a write refused because the storage is full (health reports it until a write commits)."""
        try:
            yield
        except StorageFull as e:
            self.refused = Refusal(utcnow(), e.details, free_bytes(self.path.parent))
            raise

    async def _rollback(self, conn: aiosqlite.Connection) -> None:
        """ROLLBACK when a transaction is still open; a failure is logged (the next _begin tries again)."""
        try:
            await (await conn.execute("ROLLBACK")).close()
        except sqlite3.Error as e:
            if conn.in_transaction:
                log.warning("cannot roll back a failed transaction of %s: %s (tried again before the next one)",
                            self.path, e)

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
