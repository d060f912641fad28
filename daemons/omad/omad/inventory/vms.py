"""The VM inventory: what vCenter last said about every VM seen, managed or not (GET /vms, the VMA's push)."""

from __future__ import annotations

import json
import logging
from typing import Any

from oma_common.errors import NotFound

from ..store.db import Database, Tx, utcnow
from .vmspec import VmSpec, parse_vms

log = logging.getLogger(__name__)


class Vms:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, tx: Tx, vcenter_host: str, datacenter: str, vms: list[VmSpec], source: str) -> None:
        now = utcnow()
        await tx.executemany(
            "INSERT INTO vm_inventory (vmware_vm_id, vcenter_host, datacenter, name, path, power_state, vm, source,"
            " first_seen_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (vcenter_host, vmware_vm_id) DO UPDATE SET datacenter = excluded.datacenter,"
            " name = excluded.name, path = excluded.path, power_state = excluded.power_state, vm = excluded.vm,"
            " source = excluded.source, last_seen_at = excluded.last_seen_at",
            [(vm.id, vcenter_host, vm.datacenter or datacenter, vm.name, vm.path, vm.power_state,
              json.dumps(vm.to_dict()), source, now, now) for vm in vms])

    async def receive(self, vcenter_host: str, datacenter: str, items: list[Any]) -> dict[str, Any]:
        """The VMA pushes its view of one vCenter: every VM is recorded (Invalid if one is unusable)."""
        vms = parse_vms(items)
        async with self.db.transaction() as tx:
            before = await tx.scalar("SELECT COUNT(*) FROM vm_inventory WHERE vcenter_host = ?", (vcenter_host,))
            await self.record(tx, vcenter_host, datacenter, vms, "vma_push")
            after = await tx.scalar("SELECT COUNT(*) FROM vm_inventory WHERE vcenter_host = ?", (vcenter_host,))
        log.info("inventory of %s received: %d VMs (%d new)", vcenter_host, len(vms), after - before)
        return {"success": True, "vcenter_host": vcenter_host, "received": len(vms), "new_vms": after - before,
                "received_at": utcnow()}

    async def list(self, *, vcenter_host: str | None, limit: int, offset: int) -> dict[str, Any]:
        rows = await self.db.fetchall(
            "SELECT i.vm, i.vcenter_host, i.source, i.first_seen_at, i.last_seen_at, c.context_id "
            "FROM vm_inventory i LEFT JOIN vm_replication_contexts c "
            "ON c.vcenter_host = i.vcenter_host AND c.vmware_vm_id = i.vmware_vm_id "
            "WHERE ? IS NULL OR i.vcenter_host = ? ORDER BY i.name, i.id LIMIT ? OFFSET ?",
            (vcenter_host, vcenter_host, limit, offset))
        total = await self.db.scalar("SELECT COUNT(*) FROM vm_inventory WHERE ? IS NULL OR vcenter_host = ?",
                                     (vcenter_host, vcenter_host))
        vms = [self._item(r) for r in rows]
        return {"vms": vms, "count": len(vms), "total": total, "limit": limit, "offset": offset}

    async def get(self, vm_id: str) -> dict[str, Any]:
        """By VMware instance UUID (the `id` of discovery); the most recently seen if two vCenters have it."""
        row = await self.db.fetchone(
            "SELECT i.vm, i.vcenter_host, i.source, i.first_seen_at, i.last_seen_at, c.context_id "
            "FROM vm_inventory i LEFT JOIN vm_replication_contexts c "
            "ON c.vcenter_host = i.vcenter_host AND c.vmware_vm_id = i.vmware_vm_id "
            "WHERE i.vmware_vm_id = ? ORDER BY i.last_seen_at DESC LIMIT 1", (vm_id,))
        if row is None:
            raise NotFound("VM not found", f"no VM with VMware id {vm_id!r} has been discovered")
        return self._item(row)

    @staticmethod
    def _item(row: dict[str, Any]) -> dict[str, Any]:
        vm = json.loads(row["vm"])
        vm.update(vcenter_host=row["vcenter_host"], source=row["source"], first_seen_at=row["first_seen_at"],
                  last_seen_at=row["last_seen_at"], managed=row["context_id"] is not None,
                  context_id=row["context_id"])
        return vm
