"""The VM inventory (vm_inventory): what vCenter last said about every VM seen, managed or not."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Reader, record
from .db import Tx

TRANSITIONS: tuple[str, ...] = ()  # no status column


class Source(enum.StrEnum):
    DISCOVERY = "discovery"
    VMA_PUSH = "vma_push"


@dataclasses.dataclass(frozen=True)
class Seen:
    """One VM as a discovery or the VMA's push reported it."""

    vmware_vm_id: str
    datacenter: str
    name: str
    path: str
    power_state: str
    vm: dict[str, Any]  # the VM's discovery object (disks and NICs inside)


@dataclasses.dataclass(frozen=True)
class InventoryItem:
    vm: dict[str, Any]
    vcenter_host: str
    source: Source
    first_seen_at: str
    last_seen_at: str
    context_id: str | None  # the VM's context, when it is managed


def _item(row: Mapping[str, Any]) -> InventoryItem:
    return record(InventoryItem, {**row, "vm": json.loads(row["vm"]), "source": Source(row["source"])})


async def record_seen(tx: Tx, vcenter_host: str, vms: Sequence[Seen], source: Source, now: str) -> None:
    """Insert new VMs, update known ones (first_seen_at stays)."""
    await tx.executemany(
        "INSERT INTO vm_inventory (vmware_vm_id, vcenter_host, datacenter, name, path, power_state, vm, source,"
        " first_seen_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (vcenter_host, vmware_vm_id) DO UPDATE SET datacenter = excluded.datacenter,"
        " name = excluded.name, path = excluded.path, power_state = excluded.power_state, vm = excluded.vm,"
        " source = excluded.source, last_seen_at = excluded.last_seen_at",
        [(v.vmware_vm_id, vcenter_host, v.datacenter, v.name, v.path, v.power_state, json.dumps(v.vm), source.value,
          now, now) for v in vms])


async def count(db: Reader, vcenter_host: str | None) -> int:
    """VMs known of one vCenter (None: of all)."""
    return int(await db.scalar("SELECT COUNT(*) FROM vm_inventory WHERE ? IS NULL OR vcenter_host = ?",
                               (vcenter_host, vcenter_host)))


_ITEM = ("SELECT i.vm, i.vcenter_host, i.source, i.first_seen_at, i.last_seen_at, c.context_id "
         "FROM vm_inventory i LEFT JOIN vm_replication_contexts c "
         "ON c.vcenter_host = i.vcenter_host AND c.vmware_vm_id = i.vmware_vm_id ")


async def page(db: Reader, vcenter_host: str | None, limit: int, offset: int) -> list[InventoryItem]:
    rows = await db.fetchall(_ITEM + "WHERE ? IS NULL OR i.vcenter_host = ? ORDER BY i.name, i.id LIMIT ? OFFSET ?",
                             (vcenter_host, vcenter_host, limit, offset))
    return [_item(r) for r in rows]


async def latest(db: Reader, vmware_vm_id: str) -> InventoryItem | None:
    """The most recently seen VM with this VMware id (two vCenters may both have it)."""
    row = await db.fetchone(_ITEM + "WHERE i.vmware_vm_id = ? ORDER BY i.last_seen_at DESC LIMIT 1", (vmware_vm_id,))
    return _item(row) if row is not None else None
