"""The source VM's side of a live failover: its power through the VMA, and the final incremental sync."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from oma_common.errors import Conflict, Unavailable

from ..clients.vma import VmaClient
from ..inventory.credentials import Credentials
from ..inventory.vmspec import VmSpec
from ..replication.replications import Replications, StartRequest
from ..store import contexts as contexts_store
from ..store import replications as replications_store
from ..store.db import Database

log = logging.getLogger(__name__)


class Source:
    def __init__(self, db: Database, vma: VmaClient, credentials: Credentials, replications: Replications,
                 poll_seconds: float = 0.5) -> None:
        self.db = db
        self.vma = vma
        self.credentials = credentials
        self.replications = replications
        self.poll_seconds = poll_seconds

    async def _power(self, context_id: str, action: str) -> dict[str, Any]:
        ctx = await contexts_store.by_id(self.db, context_id)
        login = await self.credentials.login_for(ctx.credential_id)
        return await self.vma.power(ctx.vmware_vm_id, action, {
            "vm_id": ctx.vmware_vm_id, "vcenter": login.vcenter, "username": login.username,
            "password": login.password, **login.pin()})

    async def power_state(self, context_id: str) -> str:
        return await self.vma.power_state((await contexts_store.by_id(self.db, context_id)).vmware_vm_id)

    async def power_off(self, context_id: str) -> None:
        """Off, checked with power-state."""
        ctx = await contexts_store.by_id(self.db, context_id)
        await self._power(context_id, "power-off")
        state = await self.vma.power_state(ctx.vmware_vm_id)
        if state != "poweredOff":
            raise Unavailable("source still on", f"the VMA powered {ctx.vm_name} off, but it is {state}")

    async def power_on(self, context_id: str) -> None:
        await self._power(context_id, "power-on")

    async def final_sync(self, context_id: str, config_id: int, actor: str) -> dict[str, Any]:
        """A sync of the powered-off source (incremental when the change ids allow), awaited; one already
        running for the VM (this step's own, started before a crash) is awaited instead of a new one — unless
        omad died before the VMA took it: that one is failed (its exports and ports released) and a new one
        started."""
        ctx = await contexts_store.by_id(self.db, context_id)
        running = await replications_store.active_for_vm(self.db, context_id)
        if running is not None and await self.replications.abandon_unstarted(running.job_id):
            log.warning("final sync %s was cut short before the VMA took it; starting it again", running.job_id,
                        extra={"resource": running.job_id})
            running = None
        if running is not None:
            job_id = running.job_id
        else:
            try:
                started = await self.replications.start(StartRequest(
                    VmSpec(id=ctx.vmware_vm_id, name=ctx.vm_name), config_id,
                    vcenter_host=ctx.vcenter_host, datacenter=ctx.datacenter), actor=actor or "failover")
                job_id = str(started["job_id"])
            except Conflict as e:
                job_id = str(e.extra.get("job_id", ""))
                if not job_id:
                    raise
        while True:
            rep = await replications_store.get(self.db, job_id)
            if rep.status == "completed":
                return {"final_sync_job_id": job_id, "final_sync_type": rep.replication_type}
            if rep.status in ("failed", "cancelled"):
                raise Unavailable("final sync failed", f"final sync {job_id}: {rep.error_message or rep.status}")
            await asyncio.sleep(self.poll_seconds)
