"""Verification of a backup: every image its content needs (the backup and the chain below it) passes
`qemu-img check`, still has the SHA-256 recorded when it was written or copied, and names as backing file
exactly the image of its parent backup. The result and its time are stored with the backup; a scheduled
pass re-verifies backups whose last verification is older than configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from oma_common.errors import OmaError, Unavailable
from oma_common.periodic import Periodic

from ..adapters.localfs import LocalFs
from ..adapters.qemu_img import QemuImg
from ..config import PolicyConfig
from ..jobs.engine import JobEngine
from ..schedule.clock import Clock, iso
from ..store import backups as store
from ..store.db import Database

log = logging.getLogger(__name__)


class Verifier:
    def __init__(self, db: Database, jobs: JobEngine, qemu_img: QemuImg, fs: LocalFs, clock: Clock,
                 cfg: PolicyConfig) -> None:
        self.db = db
        self.jobs = jobs
        self.qemu_img = qemu_img
        self.fs = fs
        self.clock = clock
        self.cfg = cfg
        self._periodic = Periodic("scheduled verification", self.verify_stale,
                                  lambda: self.cfg.verify_interval_seconds, clock=clock, logger=log)

    async def problems(self, backup_id: str) -> tuple[list[dict[str, str]], int]:
        """What is wrong with the images the backup needs ([] when nothing), and how many were checked."""
        await store.get_status(self.db, backup_id)  # NotFound
        members = await store.lineage(self.db, backup_id)
        found: list[dict[str, str]] = []
        checked = 0
        below: dict[int, Path] = {}  # disk index → the parent backup's image
        for m in members:
            current: dict[int, Path] = {}
            for d in await store.disks(self.db, m.backup_id):
                path = Path(m.root_path) / d.qcow2_path
                current[d.disk_index] = path
                checked += 1
                found += await self._file(path, d, below.get(d.disk_index))
            below = current
        return found, checked

    async def _file(self, path: Path, disk: store.BackupDisk, parent: Path | None) -> list[dict[str, str]]:
        def bad(problem: str) -> list[dict[str, str]]:
            return [{"file": str(path), "problem": problem}]

        if not await self.fs.exists(path):
            return bad("missing")
        try:
            check = await self.qemu_img.check(path, force_share=True)
            if not check.ok:
                return bad(f"qemu-img check: {check.corruptions} corruption(s), {check.check_errors} error(s)")
            info = await self.qemu_img.info(path, force_share=True)
        except OmaError as e:
            return bad(f"qemu-img: {e.details}")
        out: list[dict[str, str]] = []
        if disk.sha256:
            digest = await self.fs.sha256(path, timeout=self.cfg.file_timeout_seconds)
            if digest != disk.sha256:
                out += bad(f"checksum mismatch: sha256 {digest}, recorded {disk.sha256}")
        else:
            # Completed before checksums were recorded (migration 0007): the image has just passed
            # qemu-img check, so its digest now becomes the reference later verifications compare with.
            digest = await self.fs.sha256(path, timeout=self.cfg.file_timeout_seconds)
            await store.record_checksum(self.db, disk.backup_id, disk.disk_index, digest)
            log.info("recorded the first checksum of %s", path, extra={"resource": disk.backup_id})
        if disk.backing_file:
            target = Path(os.path.normpath(path.parent / (info.backing_file or "")))
            if info.backing_file != disk.backing_file:
                out += bad(f"backing file is {info.backing_file!r}, recorded {disk.backing_file!r}")
            elif parent is None or target != parent:
                out += bad(f"backing file {target} is not the parent backup's image {parent}")
            elif not await self.fs.exists(target):
                out += bad(f"backing file {target} is missing")
        elif info.backing_file:
            out += bad(f"unexpected backing file {info.backing_file!r}")
        return out

    async def verify(self, backup_id: str) -> dict[str, Any]:
        """Verify now; the result is stored with the backup."""
        found, checked = await self.problems(backup_id)
        status = store.VerifyStatus.FAILED if found else store.VerifyStatus.OK
        now = iso(self.clock.now())
        await store.record_verification(self.db, backup_id, status, now, found)
        (log.warning if found else log.info)("verification %s: %d image(s), %d problem(s)%s", status, checked,
                                             len(found), f": {found[0]['file']}: {found[0]['problem']}"
                                             if found else "", extra={"resource": backup_id})
        return {"backup_id": backup_id, "verify_status": status, "verified_at": now, "files_checked": checked,
                "errors": found}

    async def request(self, backup_id: str, *, wait: bool) -> dict[str, Any]:
        """Verify as a job; `wait` answers with the result, else with the job to follow."""
        await store.get_status(self.db, backup_id)  # NotFound
        job_id = await self.jobs.create("backup_verify", display_name=f"verify {backup_id}",
                                        details={"backup_id": backup_id})
        result: dict[str, Any] = {}

        async def work() -> None:
            async with self.jobs.step(job_id, "verify images"):
                result.update(await self.verify(backup_id))
            await self.jobs.merge_details(job_id, verify_status=result["verify_status"], errors=result["errors"])
            await self.jobs.finish(job_id, "completed" if result["verify_status"] == "ok" else "failed",
                                   None if result["verify_status"] == "ok" else
                                   f"{len(result['errors'])} problem(s), first: {result['errors'][0]['file']}")

        task = self.jobs.spawn(job_id, work())
        if not wait:
            return {"job_id": job_id, "backup_id": backup_id, "status": "running"}
        await asyncio.shield(task)
        if not result:
            job = await self.jobs.get(job_id)
            raise Unavailable("verification did not run", job["error_message"] or "see the job")
        return {"job_id": job_id, **result}

    async def result(self, backup_id: str) -> dict[str, Any]:
        backup = await store.get(self.db, backup_id)
        return {"backup_id": backup_id, "verify_status": backup.verify_status, "verified_at": backup.verified_at,
                "errors": json.loads(backup.verify_errors or "[]")}

    # -- the scheduled pass --------------------------------------------------------------------------

    async def verify_stale(self) -> list[str]:
        """Verify each completed backup never verified or verified longer ago than configured."""
        before = iso(self.clock.now() - timedelta(hours=self.cfg.reverify_after_hours))
        done = []
        for backup_id in await store.stale_completed(self.db, before):
            try:
                await self.verify(backup_id)
                done.append(backup_id)
            except OmaError as e:  # deleted meanwhile, storage away: the next pass tries again
                log.warning("scheduled verification skipped: %s", e, extra={"resource": backup_id})
        return done

    async def start(self) -> None:
        await self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
