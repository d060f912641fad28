"""The VM inventory: what vCenter last said about every VM seen, managed or not (GET /vms, the VMA's push)."""

from __future__ import annotations

import logging
from typing import Any

from oma_common.errors import NotFound

from ..store import inventory as store
from ..store.db import Database, Tx, utcnow
from ..store.inventory import InventoryItem, Seen, Source
from .vmspec import VmSpec, parse_vms

log = logging.getLogger(__name__)


class Vms:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, tx: Tx, vcenter_host: str, datacenter: str, vms: list[VmSpec], source: Source) -> None:
        await store.record_seen(tx, vcenter_host, [
            Seen(vm.id, vm.datacenter or datacenter, vm.name, vm.path, vm.power_state, vm.to_dict()) for vm in vms],
            source, utcnow())

    async def receive(self, vcenter_host: str, datacenter: str, items: list[Any]) -> dict[str, Any]:
        """The VMA pushes its view of one vCenter: every VM is recorded (Invalid if one is unusable)."""
        vms = parse_vms(items)
        async with self.db.transaction() as tx:
            before = await store.count(tx, vcenter_host)
            await self.record(tx, vcenter_host, datacenter, vms, Source.VMA_PUSH)
            after = await store.count(tx, vcenter_host)
        log.info("inventory of %s received: %d VMs (%d new)", vcenter_host, len(vms), after - before)
        return {"success": True, "vcenter_host": vcenter_host, "received": len(vms), "new_vms": after - before,
                "received_at": utcnow()}

    async def list(self, *, vcenter_host: str | None, limit: int, offset: int) -> dict[str, Any]:
        vms = [self._item(i) for i in await store.page(self.db, vcenter_host, limit, offset)]
        total = await store.count(self.db, vcenter_host)
        return {"vms": vms, "count": len(vms), "total": total, "limit": limit, "offset": offset}

    async def get(self, vm_id: str) -> dict[str, Any]:
        """By VMware instance UUID (the `id` of discovery); the most recently seen if two vCenters have it."""
        item = await store.latest(self.db, vm_id)
        if item is None:
            raise NotFound("VM not found", f"no VM with VMware id {vm_id!r} has been discovered")
        return self._item(item)

    @staticmethod
    def _item(item: InventoryItem) -> dict[str, Any]:
        vm = dict(item.vm)
        vm.update(vcenter_host=item.vcenter_host, source=item.source, first_seen_at=item.first_seen_at,
                  last_seen_at=item.last_seen_at, managed=item.context_id is not None, context_id=item.context_id)
        return vm
