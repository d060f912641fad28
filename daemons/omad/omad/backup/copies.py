"""Backup copies (the "2" and "1" of 3-2-1): a completed backup copied into another repository.

A copy job, under one lock per destination and chain (so a full and its incremental copy in order):
  1. verify source: the images to copy pass verification (verify.py); a copy of a bad backup is not made;
  2. for the backup and each backup below it that the destination does not hold yet, oldest first: copy each
     disk's image to a partial file, hashing it; check the bytes against the source's recorded checksum;
     point its backing file at the destination's copy of the parent (relative, `qemu-img rebase -u`); with
     `verify_after_copy`, re-read it and compare it (through its chain) with the source (`qemu-img compare`);
     rename it into place and record the copy as a backup of the destination (rows of backup_jobs and
     backup_disks, the link in backup_copies), locked when the destination is immutable.
A failed try removes its partial files and is retried with a doubling pause; the last failure is recorded.

Rules with copy_mode "immediate" run when a backup completes; those with "scheduled" run from ScheduledCopies,
which every `copy_interval_seconds` asks for the copies their destinations lack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from pathlib import Path
from typing import Any

from oma_common.errors import Conflict, Invalid, OmaError
from oma_common.periodic import Periodic

from ..adapters.localfs import LocalFs
from ..adapters.qemu_img import QemuImg
from ..audit import Audit
from ..config import PolicyConfig
from ..jobs.engine import JobEngine
from ..jobs.locks import KeyedLocks
from ..schedule.clock import Clock
from ..store import backups as backup_store
from ..store import policies as store
from ..store import repositories as repository_store
from ..store.db import Database, utcnow
from .backups import FIRST_DISK_KEY
from .immutability import Immutability
from .repositories import Repositories
from .verify import Verifier

log = logging.getLogger(__name__)


class SourceBad(Conflict):
    """The source does not verify: retrying would not help."""


def copy_id_of(backup_id: str, repository_id: str) -> str:
    """The id of a backup's copy in a repository (a backup id there too)."""
    return f"{backup_id}@{repository_id}"


def public(c: store.Copy) -> dict[str, Any]:
    return {"copy_id": c.id, "source_backup_id": c.source_backup_id, "repository_id": c.destination_repository_id,
            "copy_backup_id": c.copy_backup_id, "rule_id": c.rule_id, "status": c.status,
            "verify_after_copy": c.verify_after_copy, "verified": c.verified, "attempts": c.attempts,
            "bytes_copied": c.bytes_copied, "progress_percent": c.progress_percent, "error_message": c.error_message,
            "created_by": c.created_by, "created_at": c.created_at, "started_at": c.started_at,
            "completed_at": c.completed_at}


class Copies:
    def __init__(self, db: Database, audit: Audit, jobs: JobEngine, locks: KeyedLocks, qemu_img: QemuImg,
                 fs: LocalFs, repositories: Repositories, verifier: Verifier, immutability: Immutability,
                 clock: Clock, cfg: PolicyConfig) -> None:
        self.db = db
        self.audit = audit
        self.jobs = jobs
        self.locks = locks
        self.qemu_img = qemu_img
        self.fs = fs
        self.repositories = repositories
        self.verifier = verifier
        self.immutability = immutability
        self.clock = clock
        self.cfg = cfg

    # -- asking for copies ---------------------------------------------------------------------------

    async def request(self, backup_id: str, repository_id: str, *, actor: str, rule_id: str | None = None,
                      verify_after_copy: bool = True) -> dict[str, Any]:
        """Copy a completed backup into a repository (a live copy there already: that one is answered)."""
        src = await backup_store.get(self.db, backup_id)
        if src.status != backup_store.BackupStatus.COMPLETED:
            raise Conflict("backup not completed", f"backup {backup_id} is {src.status}; only a completed "
                                                   "backup is copied")
        repo = await self.repositories.record(repository_id)
        if not repo.enabled:
            raise Invalid("repository disabled", f"backup repository {repo.name!r} is disabled")
        if repository_id == src.repository_id:
            raise Invalid("same repository", f"backup {backup_id} is already in repository {repo.name!r}")
        if src.copied_from and await backup_store.in_repository(self.db, src.copied_from, repository_id):
            raise Invalid("already there", f"backup {backup_id} is a copy of {src.copied_from}, which is in "
                                           f"repository {repo.name!r}")
        async with self.db.transaction() as tx:
            live = await store.live_copy(tx, backup_id, repository_id)
            if live is not None:
                return {"copy_id": live.id, "status": live.status, "existing": True}
            cid = f"copy-{secrets.token_hex(6)}"
            await store.create_copy(tx, copy_id=cid, source_backup_id=backup_id, repository_id=repository_id,
                                    rule_id=rule_id, verify_after_copy=verify_after_copy, created_by=actor,
                                    now=utcnow())
            await self.jobs.create("backup_copy", job_id=cid, context_id=src.vm_context_id, tx=tx,
                                   status="pending", display_name=f"copy {backup_id} to {repo.name}",
                                   details={"backup_id": backup_id, "repository_id": repository_id})
            await self.audit.record(actor, "backup.copy", f"backup:{backup_id}", tx=tx, copy_id=cid,
                                    repository_id=repository_id, rule_id=rule_id)
        self.jobs.spawn(cid, self._run(cid))
        log.info("copy to %s requested", repo.name, extra={"resource": backup_id})
        return {"copy_id": cid, "status": "pending"}

    async def after_backup(self, backup_id: str) -> None:
        await self.run_rules(backup_id)

    async def run_rules(self, backup_id: str) -> list[str]:
        """A backup completed: its policy's enabled immediate copy rules run, highest priority first."""
        started = []
        for rule in await store.immediate_rules(self.db, backup_id):
            try:
                out = await self.request(backup_id, rule.destination_repository_id, actor="policy", rule_id=rule.id,
                                         verify_after_copy=rule.verify_after_copy)
                started.append(out["copy_id"])
            except OmaError as e:
                log.error("copy rule %s not started: %s", rule.id, e, extra={"resource": backup_id})
        return started

    async def of_backup(self, backup_id: str) -> dict[str, Any]:
        await backup_store.get_status(self.db, backup_id)  # NotFound when there is no such backup
        found = await store.copies_of(self.db, backup_id)
        return {"backup_id": backup_id, "copies": [public(c) for c in found], "count": len(found)}

    async def get(self, copy_id: str) -> dict[str, Any]:
        return public(await store.get_copy(self.db, copy_id))

    async def recover(self, job: dict[str, Any]) -> None:
        """A copy a previous omad left running: its partial files are removed and it is failed (ask again)."""
        reason = "interrupted: omad restarted during the copy"
        copy = await store.find_copy(self.db, job["id"])
        if copy is not None:
            await self._cleanup(copy)
            await store.fail_copy(self.db, copy.id, reason, utcnow())
        await self.jobs.finish(job["id"], "failed", reason)

    # -- the job -------------------------------------------------------------------------------------

    async def _run(self, copy_id: str) -> None:
        """The copy's job; its row ends with it, also when it is cancelled (omad stops: the engine fails the job,
        and nothing at the next start would end a row left pending or running, which answers every later
        request for that copy as the live one)."""
        try:
            await self._attempts(copy_id)
        except BaseException as e:
            copy = await store.find_copy(self.db, copy_id)
            if copy is not None and copy.status in (store.CopyStatus.PENDING, store.CopyStatus.RUNNING):
                with contextlib.suppress(Exception):  # best effort: its partial files
                    await self._cleanup(copy)
                reason = ("interrupted: omad stopped during the copy" if isinstance(e, asyncio.CancelledError)
                          else str(e) if isinstance(e, OmaError) else f"internal error: {e!r}")
                await store.fail_copy(self.db, copy_id, reason, utcnow())
            raise

    async def _attempts(self, copy_id: str) -> None:
        copy = await store.get_copy(self.db, copy_id)
        chain_id = (await backup_store.get(self.db, copy.source_backup_id)).chain_id
        key = f"copy-into:{copy.destination_repository_id}:{chain_id}"
        async with self.locks.hold(key, wait=True):
            if not await store.start_copy(self.db, copy_id, utcnow()):
                # While it waited for the lock, the copy of a backup above it in the chain copied this one too
                # and recorded it done: nothing is left to do (copying again would record a second copy).
                taken = await store.get_copy(self.db, copy_id)
                await self.jobs.finish(copy_id, "completed" if taken.status == store.CopyStatus.COMPLETED
                                       else "failed", taken.error_message)
                log.info("copy already done by the copy of a backup above it (%s)", taken.copy_backup_id,
                         extra={"resource": copy_id})
                return
            await store.mark_job_running(self.db, copy_id, utcnow())
            error: OmaError | None = None
            for attempt in range(1, self.cfg.copy_attempts + 1):
                await store.set_attempt(self.db, copy_id, attempt, utcnow())
                try:
                    await self._copy(copy_id, copy)
                    return
                except SourceBad as e:
                    error = e
                    await self._cleanup(copy)
                    break
                except OmaError as e:
                    error = e
                    await self._cleanup(copy)
                    if attempt < self.cfg.copy_attempts:
                        pause = self.cfg.copy_backoff_seconds * 2 ** (attempt - 1)
                        log.warning("copy try %d failed (%s); again in %g s", attempt, e, pause,
                                    extra={"resource": copy_id})
                        await self.clock.sleep(pause)
                except Exception as e:
                    # A fault of ours: the job fails through the engine; the copy's row must end with it, not
                    # stay `running` with nothing behind it.
                    await self._cleanup(copy)
                    await store.fail_copy(self.db, copy_id, f"internal error: {e!r}", utcnow())
                    raise
            assert error is not None
            reason = f"{error.message}: {error.details}" if error.details != error.message else error.message
            await store.fail_copy(self.db, copy_id, reason, utcnow())
            await self.jobs.finish(copy_id, "failed", reason)
            log.error("copy failed: %s", reason, extra={"resource": copy_id})

    async def _copy(self, copy_id: str, copy: store.Copy) -> None:
        dest_id = copy.destination_repository_id
        members = await backup_store.lineage(self.db, copy.source_backup_id)
        held = {m.backup_id: await store.held_copy(self.db, m.backup_id, dest_id) for m in members}
        todo = [m for m in members if held[m.backup_id] is None]
        async with self.jobs.step(copy_id, "verify source"):
            if todo:
                # Stored with the source like any verification: a scheduled copy skips a source known bad.
                found = (await self.verifier.verify(copy.source_backup_id))["errors"]
                if found:
                    raise SourceBad("source verification failed", "; ".join(f"{p['file']}: {p['problem']}"
                                                                            for p in found))
        _, dest_root = await self.repositories.ready_root(dest_id)
        total = 0
        for m in todo:
            for d in await backup_store.disks(self.db, m.backup_id):
                total += await self.fs.size(Path(m.root_path) / d.qcow2_path)
        done = 0
        parent_copy: str | None = None
        for m in members:
            if held[m.backup_id] is not None:
                parent_copy = held[m.backup_id]
                continue
            async with self.jobs.step(copy_id, f"copy {m.backup_id}"):
                parent_copy, size = await self._copy_backup(copy_id, copy, m, dest_root, parent_copy, done, total)
                done += size
        assert parent_copy is not None
        async with self.db.transaction() as tx:
            await store.complete_copy(tx, copy_id, copy_backup_id=parent_copy, verified=copy.verify_after_copy,
                                      now=utcnow())
            await self.jobs.finish(copy_id, "completed", tx=tx)
        log.info("copy completed as %s (%d byte(s) copied)", parent_copy, done, extra={"resource": copy_id})

    async def _copy_backup(self, copy_id: str, copy: store.Copy, src: backup_store.Backup, dest_root: Path,
                           parent_copy: str | None, done: int, total: int) -> tuple[str, int]:
        """Copy one backup's images; returns the id of its copy in the destination and the bytes copied."""
        dest_id = copy.destination_repository_id
        new_id = copy_id_of(src.backup_id, dest_id)
        src_root = Path(src.root_path)
        parent_disks = ({d.disk_index: d for d in await backup_store.disks(self.db, parent_copy)}
                        if parent_copy else {})
        disks: list[backup_store.CopiedDisk] = []
        copied = 0
        await self.fs.make_dir(dest_root / src.vm_context_id)
        for d in await backup_store.disks(self.db, src.backup_id):
            source = src_root / d.qcow2_path
            rel = f"{src.vm_context_id}/{new_id}-disk-{FIRST_DISK_KEY + d.disk_index}.qcow2"
            final = dest_root / rel
            partial = final.with_name(final.name + ".partial")
            await self.fs.remove([partial])
            digest = await self.fs.copy_file(source, partial, timeout=self.cfg.file_timeout_seconds)
            if d.sha256 and digest != d.sha256:
                raise SourceBad("source changed", f"{source} read with sha256 {digest}, recorded {d.sha256}")
            backing = None
            if d.backing_file:
                below = parent_disks.get(d.disk_index)
                if below is None:
                    raise SourceBad("chain broken", f"{source} has a backing file but the parent's copy has no "
                                                    f"disk {d.disk_index}")
                backing = Path(below.qcow2_path).name
                await self.qemu_img.rebase_unsafe(partial, backing)
                digest = await self.fs.sha256(partial, timeout=self.cfg.file_timeout_seconds)
            if copy.verify_after_copy:
                again = await self.fs.sha256(partial, timeout=self.cfg.file_timeout_seconds)
                if again != digest:
                    raise Invalid("copy unreadable", f"{partial} re-read with sha256 {again}, written {digest}")
                if not await self.qemu_img.compare(source, partial, fmt_a="qcow2", fmt_b="qcow2"):
                    raise Invalid("copy differs", f"{final} does not show the content of {source}")
            await self.fs.rename(partial, final)
            info = await self.qemu_img.info(final)
            size = await self.fs.size(final)
            copied += size
            disks.append(backup_store.CopiedDisk(d, rel, backing, digest, info.actual_size))
            await self.jobs.progress(copy_id, 100.0 * (done + copied) / max(total, 1))
            await store.record_copy_progress(self.db, copy_id, bytes_copied=done + copied,
                                             progress_percent=round(100.0 * (done + copied) / max(total, 1), 1),
                                             now=utcnow())
        now = utcnow()
        chain_id = (await backup_store.get(self.db, parent_copy)).chain_id if parent_copy else new_id
        async with self.db.transaction() as tx:
            await backup_store.create_copy(tx, source=src, backup_id=new_id, repository_id=dest_id,
                                           parent_backup_id=parent_copy, chain_id=chain_id, copied_bytes=copied,
                                           created_by=f"copy:{copy_id}", now=now, copied=disks)
            if src.backup_id != copy.source_backup_id:
                # A backup below the one asked for, copied because its chain needs it: record its copy too
                # (taking over a copy of it that is still waiting, which then finds it done).
                await store.complete_copy_by_chain(tx, src.backup_id, dest_id, copy_backup_id=new_id,
                                                   verify_after_copy=copy.verify_after_copy,
                                                   created_by=f"chain of {copy_id}",
                                                   new_id=f"copy-{secrets.token_hex(6)}", now=now)
        await self.immutability.lock_new(new_id)
        log.info("copied %s as %s (%d image(s))", src.backup_id, new_id, len(disks), extra={"resource": copy_id})
        return new_id, copied

    async def _cleanup(self, copy: store.Copy) -> None:
        """Remove what a failed try of this copy left: images of copies that were not recorded."""
        repo = await repository_store.find_one(self.db, copy.destination_repository_id)
        if repo is None:
            return
        for m in await backup_store.lineage(self.db, copy.source_backup_id):
            new_id = copy_id_of(m.backup_id, copy.destination_repository_id)
            if await backup_store.exists(self.db, new_id):
                continue
            await self.fs.remove(await self.fs.glob(Path(repo.root_path), f"{m.vm_context_id}/{new_id}-disk-*.qcow2*"))


class ScheduledCopies:
    """The service of the scheduled copy rules: each pass, every enabled rule with copy_mode "scheduled" of an
    enabled policy asks for a copy of each completed backup of the policy that its destination neither holds
    nor is copying, rules of higher priority first, older backups first (with each rule's verify_after_copy).
    A backup whose last verification failed is not copied (each copy job verifies its source as well); a copy
    that failed for another reason is asked for again on the next pass."""

    def __init__(self, db: Database, copies: Copies, clock: Clock, *, interval_seconds: float) -> None:
        self.db = db
        self.copies = copies
        self.clock = clock
        self.interval = interval_seconds
        self._periodic = Periodic("scheduled copies", self.run_once, lambda: self.interval, clock=clock, logger=log)

    async def due(self) -> list[store.DueCopy]:
        """(rule, backup) pairs to copy now, in the order they are asked for."""
        return await store.due_scheduled(self.db)

    async def run_once(self) -> list[str]:
        """One pass; returns the ids of the copies it started."""
        started = []
        for d in await self.due():
            try:
                out = await self.copies.request(d.backup_id, d.destination_repository_id, actor="schedule",
                                                rule_id=d.rule_id, verify_after_copy=d.verify_after_copy)
            except OmaError as e:  # a destination disabled, a backup deleted meanwhile: the next pass tries again
                log.warning("scheduled copy by rule %s not started: %s", d.rule_id, e,
                            extra={"resource": d.backup_id})
                continue
            if not out.get("existing"):
                started.append(out["copy_id"])
        if started:
            log.info("scheduled copy rules started %d copy(ies)", len(started))
        return started

    async def start(self) -> None:
        await self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
