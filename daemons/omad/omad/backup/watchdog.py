"""The backups' watchdog: fails backups whose exports sit idle, renews the port leases of running ones, and
releases what finished backups still hold in nbd-pool.

A running backup is busy while any of its exports has an NBD client, and whenever the VMA sends telemetry
or a completion (each moves `last_activity_at`). Clients connected to an export hold the backup open the
way an inhibitor holds a mount (a long copy never times out); reading its status does not. When nothing has
happened for `idle_timeout_seconds` the VMA is taken to be gone (it crashed, lost its tunnel, or hangs), and
the backup is failed and undone. If nbd-pool cannot be asked, nobody is failed for idleness in that pass:
an unreachable agent says nothing about the VMA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from oma_common.contracts.nbd_pool import Export
from oma_common.errors import OmaError
from oma_common.periodic import Periodic
from oma_common.timefmt import parse_rfc3339, rfc3339

from ..clients.nbdpool import NbdPool
from ..config import BackupConfig
from ..store import backups as store
from ..store.db import Database
from .teardown import Teardown

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _parse(stamp: str | None) -> datetime | None:
    return parse_rfc3339(stamp) if stamp else None


def client_count(export: Export) -> int:
    """Connected NBD clients of one export as nbd-pool lists it."""
    return len(export.clients) or export.connection_count


class Watchdog:
    def __init__(self, db: Database, pool: NbdPool, teardown: Teardown, cfg: BackupConfig, *,
                 clock: Clock = _utc_now) -> None:
        self.db = db
        self.pool = pool
        self.teardown = teardown
        self.idle_timeout = cfg.idle_timeout_seconds
        self.interval = cfg.watchdog_interval_seconds
        self.lease_seconds = cfg.lease_seconds
        self.clock = clock
        self._renewed: dict[str, datetime] = {}
        self._periodic = Periodic("backup watchdog pass", self.check, self.interval, immediately=True, logger=log)

    async def start(self) -> None:
        await self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def check(self) -> list[str]:
        """One pass; returns the backups it failed."""
        now = self.clock()
        running = await store.running(self.db)
        try:
            exports = await self.pool.exports()
        except OmaError as e:
            log.warning("cannot list nbd-pool's exports (%s); idle backups are not judged in this pass", e)
            exports = None
        failed = []
        for b in running:
            last_activity = b.last_activity_at
            if exports is not None and self._has_clients(b, exports):
                last_activity = rfc3339(now)
                await store.touch_running(self.db, b.backup_id, last_activity)
            last = _parse(last_activity) or _parse(b.started_at) or _parse(b.created_at)
            assert last is not None
            idle = (now - last).total_seconds()
            if exports is not None and idle > self.idle_timeout:
                if await self.teardown.fail(b.backup_id, f"idle: no NBD client on its exports and no telemetry or "
                                                         f"completion from the VMA for {idle:.0f} s (limit "
                                                         f"{self.idle_timeout:g} s)"):
                    failed.append(b.backup_id)
                continue
            await self._renew(b.backup_id, now)
        active = {b.backup_id for b in running}
        for gone in [k for k in self._renewed if k not in active]:
            del self._renewed[gone]
        await self._sweep(exports)
        return failed

    @staticmethod
    def _has_clients(backup: store.RunningBackup, exports: list[Export]) -> bool:
        names = set(backup.export_names)
        return any(client_count(e) > 0 for e in exports if e.job_id == backup.backup_id or e.export_name in names)

    async def _renew(self, backup_id: str, now: datetime) -> None:
        last = self._renewed.get(backup_id)
        if last is not None and (now - last).total_seconds() < self.lease_seconds / 3:
            return
        try:
            await self.pool.renew(backup_id, self.lease_seconds)
            self._renewed[backup_id] = now
        except OmaError as e:
            log.warning("could not renew the port lease: %s", e, extra={"resource": backup_id})

    async def _sweep(self, exports: list[Export] | None) -> None:
        """Release what nbd-pool still holds for backups that have ended (a release that failed earlier)."""
        try:
            allocations = (await self.pool.status()).allocations
        except OmaError:
            return
        holders = {a.job_id for a in allocations} | {e.job_id for e in exports or [] if e.job_id is not None}
        if not holders:
            return
        for backup_id in await store.ended_among(self.db, holders):
            log.warning("nbd-pool still holds exports or ports of the ended backup; releasing them",
                        extra={"resource": backup_id})
            await self.teardown.release(backup_id)
