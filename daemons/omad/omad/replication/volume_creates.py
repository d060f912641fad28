"""Volumes omad had volume-agent create for a disk and did not live to record (replication_volume_creates).

Replications records a create before asking volume-agent for it, and drops that row in the transaction that
records the volume; the row a dead omad left is settled by the disk's next sync (replications.py takes the
volume that create made). This module settles the rows whose VM context is gone, which no sync will: at
start-up, the volume made under that name (volume-agent's record of it) is detached and deleted, unless a
recorded volume or another pending create stands for it; then the row goes. A row it cannot settle now
(volume-agent down, still creating) stays for the next start.
"""

from __future__ import annotations

import asyncio
import logging

from oma_common.contracts.volume_agent_volumes import VolumeView
from oma_common.errors import OmaError

from ..clients.volume_agent import VolumeAgent
from ..store import replications as store
from ..store.db import Database

log = logging.getLogger(__name__)


async def remove_volume(volumes: VolumeAgent, view: VolumeView) -> None:
    """Detach a volume (when attached here) and delete it in CloudStack."""
    if view.attached_here:
        await volumes.detach_volume(view.volume_id)
    await volumes.delete_volume(view.volume_id)


async def made_under(volumes: VolumeAgent, name: str) -> VolumeView | None:
    """volume-agent's record of the volume of that name (it records a create before asking CloudStack)."""
    return next((v for v in (await volumes.volumes()).volumes if v.name == name), None)


def _logged(task: asyncio.Task[int]) -> None:
    """A sweep that ended by a fault of ours says so (its rows stay for the next start)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("volumes created for removed VM contexts: the sweep failed", exc_info=task.exception())


class ContextlessCreates:
    """The start-up pass over volumes being created for a VM context that no longer exists (a Background)."""

    def __init__(self, db: Database, volumes: VolumeAgent) -> None:
        self.db = db
        self.volumes = volumes
        self._task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.sweep())
        self._task.add_done_callback(_logged)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def sweep(self) -> int:
        """Settle every such row; how many volumes were deleted."""
        removed = 0
        for pending in await store.volume_creates_without_context(self.db):
            try:
                removed += await self._settle(pending)
            except OmaError as e:
                log.warning("volume %s of the removed VM context %s: not settled now (%s); next start",
                            pending.volume_name, pending.vm_context_id, e, extra={"resource": pending.job_id})
        return removed

    async def _settle(self, pending: store.VolumeCreate) -> int:
        made = await made_under(self.volumes, pending.volume_name)
        if made is not None and (not made.volume_id or made.operation == "create"):
            log.info("volume %s is still being created; settled at the next start", pending.volume_name,
                     extra={"resource": pending.job_id})
            return 0
        gone = 0
        if made is not None and not await store.volume_name_claimed(self.db, made.name, made.volume_id,
                                                                    besides=pending):
            await remove_volume(self.volumes, made)
            log.warning("volume %s (%s): created by %s for %s of the VM context %s, which is gone; deleted",
                        made.volume_id, made.name, pending.job_id, pending.disk_id, pending.vm_context_id,
                        extra={"resource": pending.job_id})
            gone = 1
        async with self.db.transaction() as tx:
            await store.drop_volume_create(tx, pending.vm_context_id, pending.disk_id)
        return gone
