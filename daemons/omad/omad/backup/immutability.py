"""Immutable backups: a lock until a date, always enforced by the appliance and, where the filesystem allows
it, by the filesystem too (`chattr +i`, done by volume-agent as root).

A backup completed (or copied) into a repository with `is_immutable` is locked for the repository's
`min_retention_days`. A lock can be extended, never shortened. A locked incremental locks its whole chain:
the backups it is built on get at least the same date, since it cannot be read without them. Deleting or
pruning a locked backup is a Conflict carrying `unlock_at`; once the date has passed, the files are unlocked
(chattr -i) just before they are removed.

`files_locked` says the filesystem holds every image of the backup immutable, and is never set on a hope: a
lock or unlock that failed may have changed some files (a list stopped halfway) or may still change them
(volume-agent's 504 `outcome_unknown`: a hung filesystem; or no answer at all), so after any failure the
flags are read again (volume-agent answers a status only once no change is under way on the file) and the
record follows what was read; when even that cannot be read, it keeps what it said. A record that says
"not locked" is not trusted before a removal either: the files of a backup that was ever locked in an
immutable repository are unlocked before they are removed whatever the record says (clearing a flag that is
not set changes nothing; a filesystem without the attribute had nothing to lock).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from oma_common.errors import Conflict, Invalid, OmaError

from ..adapters.localfs import LocalFs
from ..audit import Audit
from ..clients.volume_agent import VolumeAgent
from ..schedule.clock import Clock, iso, parse_iso
from ..store import backups as store
from ..store import repositories as repository_store
from ..store.db import Database, Tx

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

    def _holds(self, locked_until: str | None) -> str | None:
        return locked_until if locked_until and locked_until > self.now() else None

    async def unlock_at(self, db: Database | Tx, backup_id: str) -> str | None:
        """The date the backup's lock ends, while it holds."""
        backup = await store.find_one(db, backup_id)
        return self._holds(backup.locked_until) if backup is not None else None

    async def refuse_if_locked(self, db: Database | Tx, backup_id: str) -> None:
        until = await self.unlock_at(db, backup_id)
        if until:
            raise Conflict("backup is locked", f"backup {backup_id} is immutable until {until}", unlock_at=until)

    async def lock_new(self, backup_id: str) -> None:
        """A backup just completed or copied: lock it (and its chain) when its repository is immutable."""
        backup = await store.find_one(self.db, backup_id)
        repo = await repository_store.find_one(self.db, backup.repository_id) if backup is not None else None
        if repo is None or not repo.is_immutable:
            return
        until = iso(self.clock.now() + timedelta(days=repo.min_retention_days))
        await self._lock(backup_id, until)

    async def extend(self, backup_id: str, until: str, *, actor: str) -> dict[str, Any]:
        """Move the lock's end to `until` (RFC 3339); an earlier date than the current one is refused."""
        try:
            wanted = iso(parse_iso(until))
        except ValueError as e:
            raise Invalid("bad date", f"until must be an RFC 3339 date with a zone, not {until!r}") from e
        status = await store.get_status(self.db, backup_id)
        if status != store.BackupStatus.COMPLETED:
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
        backup = await store.get(self.db, backup_id)
        until = self._holds(backup.locked_until)
        return {"backup_id": backup_id, "locked": until is not None, "unlock_at": until,
                "locked_until": backup.locked_until, "files_locked": backup.files_locked}

    async def _lock(self, backup_id: str, until: str) -> None:
        members = await store.lineage(self.db, backup_id)
        async with self.db.transaction() as tx:
            for m in members:  # the chain below it: at least as long
                await store.extend_lock(tx, m.backup_id, until)
        immutable = []
        for m in members:
            repo = await repository_store.find_one(self.db, m.repository_id)
            if repo is not None and repo.is_immutable:
                immutable.append(m)
        files = [f for m in immutable for f in await store.image_paths(self.db, m.backup_id)]
        if not files:
            return
        try:
            await self.agent.lock_files([str(f) for f in files])
        except OmaError as e:
            # The appliance still refuses deletion; only the filesystem's second line may be missing.
            log.warning("locking the files failed (the appliance still enforces the lock): %s; reading "
                        "what is locked on disk", e, extra={"resource": backup_id})
            await self._record_what_is_on_disk([m.backup_id for m in immutable])
            return
        async with self.db.transaction() as tx:
            for m in immutable:
                await store.set_files_locked(tx, m.backup_id, True)
        log.info("locked until %s (%d file(s), chain of %d)", until, len(files), len(members),
                 extra={"resource": backup_id})

    async def release(self, backup_id: str, files: list[Path]) -> None:
        """Before removal of a backup whose lock has ended: clear the files' immutable attribute."""
        backup = await store.find_one(self.db, backup_id)
        present = [f for f in files if await self.fs.exists(f)]
        if backup is None or not present:
            return
        if not backup.files_locked:
            repo = await repository_store.find_one(self.db, backup.repository_id)
            if backup.locked_until is None or repo is None or not repo.is_immutable:
                return  # never locked on disk
            # The record says "not locked", but a lock that failed may have landed after all.
        # Mutable first, in the record: it must never say locked about a file that is not.
        await store.set_files_locked(self.db, backup_id, False)
        try:
            await self.agent.unlock_files([str(f) for f in present])
        except OmaError as e:
            if e.code == "no_immutable_attribute" and not backup.files_locked:
                return  # a filesystem without the attribute: nothing was locked there
            log.warning("unlocking the files failed: %s; reading what is locked on disk", e,
                        extra={"resource": backup_id})
            await self._record_what_is_on_disk([backup_id])
            raise

    async def _record_what_is_on_disk(self, backup_ids: list[str]) -> None:
        """After a lock or unlock that failed: each backup's `files_locked` from its files' flags as read now;
        left as it is when they cannot be read (volume-agent still waiting for the failed change, say)."""
        files = {b: await store.image_paths(self.db, b) for b in backup_ids}
        paths = [str(f) for fs in files.values() for f in fs]
        if not paths:
            return
        try:
            flags = (await self.agent.files_status(paths)).immutable
        except OmaError as e:
            log.warning("cannot read whether the files are locked on disk (%s); their record stays as it was",
                        e, extra={"resource": backup_ids[-1]})
            return
        async with self.db.transaction() as tx:
            for b, fs in files.items():
                await store.set_files_locked(tx, b, bool(fs) and all(flags.get(str(f), False) for f in fs))
