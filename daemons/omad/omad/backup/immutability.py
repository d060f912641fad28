"""Immutable backups: a lock until a date, always enforced by the appliance and, where the filesystem allows
it, by the filesystem too (`chattr +i`, done by volume-agent as root).

A backup completed (or copied) into a repository with `is_immutable` is locked for the repository's
`min_retention_days`. A lock can be extended, never shortened. A locked incremental locks its whole chain:
the backups it is built on get at least the same date, since it cannot be read without them. Deleting or
pruning a locked backup is a Conflict carrying `unlock_at`; once the date has passed, the files are unlocked
(chattr -i) just before they are removed.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound, OmaError

from ..adapters.localfs import LocalFs
from ..audit import Audit
from ..clients.volume_agent import VolumeAgent
from ..schedule.clock import Clock, iso, parse_iso
from ..store.db import Database, Tx
from .chains import lineage

log = logging.getLogger(__name__)


class Immutability:
    def __init__(self, db: Database, audit: Audit, agent: VolumeAgent, fs: LocalFs, clock: Clock) -> None:
        self.db = db
        self.fs = fs
        self.audit = audit
        self.agent = agent
        self.clock = clock

    def now(self) -> str:
        return iso(self.clock.now())

    async def unlock_at(self, db: Database | Tx, backup_id: str) -> str | None:
        """The date the backup's lock ends, while it holds."""
        until = await db.scalar("SELECT locked_until FROM backup_jobs WHERE backup_id = ?", (backup_id,))
        return until if until and until > self.now() else None

    async def refuse_if_locked(self, db: Database | Tx, backup_id: str) -> None:
        until = await self.unlock_at(db, backup_id)
        if until:
            raise Conflict("backup is locked", f"backup {backup_id} is immutable until {until}", unlock_at=until)

    async def lock_new(self, backup_id: str) -> None:
        """A backup just completed or copied: lock it (and its chain) when its repository is immutable."""
        row = await self.db.fetchone(
            "SELECT r.is_immutable, r.min_retention_days FROM backup_jobs b JOIN backup_repositories r "
            "ON r.id = b.repository_id WHERE b.backup_id = ?", (backup_id,))
        if row is None or not row["is_immutable"]:
            return
        until = iso(self.clock.now() + timedelta(days=int(row["min_retention_days"])))
        await self._lock(backup_id, until)

    async def extend(self, backup_id: str, until: str, *, actor: str) -> dict[str, Any]:
        """Move the lock's end to `until` (RFC 3339); an earlier date than the current one is refused."""
        try:
            wanted = iso(parse_iso(until))
        except ValueError as e:
            raise Invalid("bad date", f"until must be an RFC 3339 date with a zone, not {until!r}") from e
        status = await self.db.scalar("SELECT status FROM backup_jobs WHERE backup_id = ?", (backup_id,))
        if status is None:
            raise NotFound("backup not found", f"backup {backup_id} does not exist")
        if status != "completed":
            raise Conflict("backup not completed", f"backup {backup_id} is {status}; only a completed one is locked")
        current = await self.unlock_at(self.db, backup_id)
        if current and wanted < current:
            raise Conflict("a lock cannot be shortened", f"backup {backup_id} is locked until {current}; it can be "
                           f"extended, never shortened (asked: {wanted})", unlock_at=current)
        if wanted <= self.now():
            raise Invalid("date in the past", f"{wanted} has passed")
        await self._lock(backup_id, wanted)
        await self.audit.record(actor, "backup.lock", f"backup:{backup_id}", until=wanted, previous=current)
        return await self.state(backup_id)

    async def state(self, backup_id: str) -> dict[str, Any]:
        row = await self.db.fetchone("SELECT locked_until, files_locked FROM backup_jobs WHERE backup_id = ?",
                                     (backup_id,))
        if row is None:
            raise NotFound("backup not found", f"backup {backup_id} does not exist")
        until = await self.unlock_at(self.db, backup_id)
        return {"backup_id": backup_id, "locked": until is not None, "unlock_at": until,
                "locked_until": row["locked_until"], "files_locked": bool(row["files_locked"])}

    async def _lock(self, backup_id: str, until: str) -> None:
        members = await lineage(self.db, backup_id)
        async with self.db.transaction() as tx:
            for m in members:  # the chain below it: at least as long
                await tx.execute("UPDATE backup_jobs SET locked_until = ? WHERE backup_id = ? AND "
                                 "(locked_until IS NULL OR locked_until < ?)", (until, m["backup_id"], until))
        immutable = [m for m in members if await self.db.scalar(
            "SELECT is_immutable FROM backup_repositories WHERE id = ?", (m["repository_id"],))]
        files = await self._files([m["backup_id"] for m in immutable])
        if not files:
            return
        try:
            await self.agent.lock_files([str(f) for f in files])
        except OmaError as e:
            # The appliance still refuses deletion; only the filesystem's second line is missing.
            log.warning("files stay mutable on disk (the appliance still enforces the lock): %s", e,
                        extra={"resource": backup_id})
            return
        async with self.db.transaction() as tx:
            for m in immutable:
                await tx.execute("UPDATE backup_jobs SET files_locked = 1 WHERE backup_id = ?", (m["backup_id"],))
        log.info("locked until %s (%d file(s), chain of %d)", until, len(files), len(members),
                 extra={"resource": backup_id})

    async def _files(self, backup_ids: list[str]) -> list[Path]:
        out = []
        for bid in backup_ids:
            rows = await self.db.fetchall(
                "SELECT r.root_path, d.qcow2_path FROM backup_disks d JOIN backup_jobs b USING (backup_id) "
                "JOIN backup_repositories r ON r.id = b.repository_id WHERE d.backup_id = ?", (bid,))
            out += [Path(r["root_path"]) / r["qcow2_path"] for r in rows]
        return out

    async def release(self, backup_id: str, files: list[Path]) -> None:
        """Before removal of a backup whose lock has ended: clear the files' immutable attribute."""
        locked = await self.db.scalar("SELECT files_locked FROM backup_jobs WHERE backup_id = ?", (backup_id,))
        present = [f for f in files if await self.fs.exists(f)]
        if not locked or not present:
            return
        await self.agent.unlock_files([str(f) for f in present])
        await self.db.execute("UPDATE backup_jobs SET files_locked = 0 WHERE backup_id = ?", (backup_id,))
