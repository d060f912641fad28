"""network_mappings: per VM and source network, the CloudStack network a live or test failover plugs it into.

Mappings hang off a VM context; `VmRef` (the context a client's vm_id names, and the networks of its
NICs) is read here too because it is only ever needed to address mappings.
"""

from __future__ import annotations

import dataclasses

from oma_common.errors import NotFound

from .base import Reader, record
from .db import utcnow, Writer


@dataclasses.dataclass(frozen=True)
class NetworkMapping:
    id: int
    vm_context_id: str
    vm_id: str
    source_network_name: str
    destination_network_id: str
    destination_network_name: str
    is_test_network: bool
    created_by: str
    created_at: str
    updated_at: str


@dataclasses.dataclass(frozen=True)
class VmRef:
    """A VM context as mappings see it: its ids and the VMware networks of its NICs (in NIC order, once each)."""

    context_id: str
    vm_name: str
    vmware_vm_id: str
    ossea_config_id: int | None
    networks: tuple[str, ...]


def _mapping(row: dict[str, object]) -> NetworkMapping:
    return record(NetworkMapping, {**row, "is_test_network": bool(row["is_test_network"])})


async def vm(db: Reader, vm_id: str) -> VmRef:
    """The context `vm_id` names: a VM name, a VMware VM id or a context id (tried in that order)."""
    row = await db.fetchone(
        "SELECT context_id, vm_name, vmware_vm_id, ossea_config_id FROM vm_replication_contexts "
        "WHERE vm_name = ?1 OR vmware_vm_id = ?1 OR context_id = ?1 "
        "ORDER BY vm_name = ?1 DESC, vmware_vm_id = ?1 DESC LIMIT 1", (vm_id,))
    if row is None:
        raise NotFound("VM not found", f"no VM context has the name, VMware id or context id {vm_id!r}")
    nets = await db.fetchall("SELECT network_name FROM vm_networks WHERE vm_context_id = ? AND network_name != '' "
                             "ORDER BY position", (row["context_id"],))
    names = tuple(dict.fromkeys(str(n["network_name"]) for n in nets))
    return VmRef(str(row["context_id"]), str(row["vm_name"]), str(row["vmware_vm_id"]), row["ossea_config_id"],
                 names)


async def list_all(db: Reader) -> list[NetworkMapping]:
    rows = await db.fetchall("SELECT * FROM network_mappings ORDER BY vm_id, source_network_name, is_test_network")
    return [_mapping(r) for r in rows]


async def of_vm(db: Reader, context_id: str) -> list[NetworkMapping]:
    rows = await db.fetchall("SELECT * FROM network_mappings WHERE vm_context_id = ? "
                             "ORDER BY source_network_name, is_test_network", (context_id,))
    return [_mapping(r) for r in rows]


async def put(tx: Writer, ref: VmRef, *, source: str, destination_id: str, destination_name: str, is_test: bool,
              actor: str) -> tuple[NetworkMapping, bool]:
    """Create or replace the mapping of one source network (live or test); returns it and whether it is new."""
    now = utcnow()
    existing = await tx.fetchone("SELECT id FROM network_mappings WHERE vm_context_id = ? AND source_network_name = ? "
                                 "AND is_test_network = ?", (ref.context_id, source, int(is_test)))
    if existing is None:
        mapping_id = await tx.execute(
            "INSERT INTO network_mappings (vm_context_id, vm_id, source_network_name, destination_network_id, "
            "destination_network_name, is_test_network, created_by, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ref.context_id, ref.vm_name, source, destination_id, destination_name, int(is_test), actor, now, now))
    else:
        mapping_id = int(existing["id"])
        await tx.execute("UPDATE network_mappings SET vm_id = ?, destination_network_id = ?, "
                         "destination_network_name = ?, updated_at = ? WHERE id = ?",
                         (ref.vm_name, destination_id, destination_name, now, mapping_id))
    row = await tx.fetchone("SELECT * FROM network_mappings WHERE id = ?", (mapping_id,))
    assert row is not None
    return _mapping(row), existing is None


async def delete(tx: Writer, context_id: str, source: str, is_test: bool | None) -> int:
    """Remove the mappings of one source network (both kinds when `is_test` is None); how many went."""
    if is_test is None:
        return await tx.execute("DELETE FROM network_mappings WHERE vm_context_id = ? AND source_network_name = ?",
                                (context_id, source))
    return await tx.execute("DELETE FROM network_mappings WHERE vm_context_id = ? AND source_network_name = ? "
                            "AND is_test_network = ?", (context_id, source, int(is_test)))
