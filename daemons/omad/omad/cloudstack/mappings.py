"""Network mappings: which CloudStack network each of a VM's VMware networks joins on live and test failover."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from oma_common.errors import Invalid, NotFound

from ..audit import Audit
from ..store import network_mappings as store
from ..store.db import Database
from ..store.network_mappings import NetworkMapping, VmRef
from .networks import Networks

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MappingIn:
    vm_id: str
    source_network_name: str
    destination_network_id: str
    destination_network_name: str = ""
    is_test_network: bool = False
    vm_context_id: str | None = None


def public(m: NetworkMapping) -> dict[str, Any]:
    return dataclasses.asdict(m)


class Mappings:
    def __init__(self, db: Database, audit: Audit, networks: Networks) -> None:
        self.db = db
        self.audit = audit
        self.networks = networks

    async def vm(self, vm_id: str, context_id: str | None = None) -> VmRef:
        ref = await store.vm(self.db, vm_id)
        if context_id is not None and context_id != ref.context_id:
            raise Invalid("VM and context disagree", f"{vm_id!r} is VM context {ref.context_id}, not {context_id}")
        return ref

    async def put(self, m: MappingIn, *, actor: str) -> tuple[dict[str, Any], bool]:
        """Create or replace one mapping after checking the source network is the VM's and the destination
        exists in CloudStack (under the VM's config, else the default one); CloudStack's name is stored."""
        ref = await self.vm(m.vm_id, m.vm_context_id)
        if m.source_network_name not in ref.networks:
            raise Invalid("unknown source network",
                          f"VM {ref.vm_name!r} has no NIC on a network named {m.source_network_name!r}; its networks: "
                          f"{', '.join(repr(n) for n in ref.networks) or 'none'}", source_networks=list(ref.networks))
        network = await self.networks.find(m.destination_network_id, ref.ossea_config_id)
        if network is None:
            raise Invalid("unknown destination network",
                          f"CloudStack has no network with id {m.destination_network_id!r}")
        if m.destination_network_name and m.destination_network_name != network.name:
            log.info("mapping of %s: destination %s is named %r in CloudStack, not %r; storing CloudStack's",
                     ref.vm_name, network.id, network.name, m.destination_network_name)
        async with self.db.transaction() as tx:
            mapping, created = await store.put(tx, ref, source=m.source_network_name, destination_id=network.id,
                                               destination_name=network.name, is_test=m.is_test_network, actor=actor)
            await self.audit.record(actor, "network_mapping.put", f"vm_context:{ref.context_id}", tx=tx,
                                    source_network_name=m.source_network_name, destination_network_id=network.id,
                                    is_test_network=m.is_test_network, created=created)
        return public(mapping), created

    async def list_all(self) -> list[dict[str, Any]]:
        return [public(m) for m in await store.list_all(self.db)]

    async def of_vm(self, vm_id: str) -> list[dict[str, Any]]:
        ref = await self.vm(vm_id)
        return [public(m) for m in await store.of_vm(self.db, ref.context_id)]

    async def status(self, vm_id: str) -> dict[str, Any]:
        """Which of the VM's source networks are mapped, separately for live and for test failover."""
        ref = await self.vm(vm_id)
        mappings = await store.of_vm(self.db, ref.context_id)
        out: dict[str, Any] = {"vm_id": ref.vm_name, "vm_context_id": ref.context_id,
                               "source_networks": list(ref.networks), "total_mappings": len(mappings)}
        for kind, is_test in (("live", False), ("test", True)):
            mine = {m.source_network_name: m for m in mappings if m.is_test_network == is_test}
            mapped = [n for n in ref.networks if n in mine]
            unmapped = [n for n in ref.networks if n not in mine]
            # A mapping whose source network the VM no longer has (it was re-discovered since) is stale.
            stale = sorted(n for n in mine if n not in ref.networks)
            out[kind] = {"mapped": mapped, "unmapped": unmapped, "stale": stale, "complete": not unmapped,
                         "mappings": [public(mine[n]) for n in mapped]}
            out[f"{kind}_mappings"] = len(mine)
        out["has_mappings"] = bool(mappings)
        out["mapping_complete"] = out["live"]["complete"]
        return out

    async def delete(self, vm_id: str, source: str, is_test: bool | None, *, actor: str) -> int:
        ref = await self.vm(vm_id)
        async with self.db.transaction() as tx:
            gone = await store.delete(tx, ref.context_id, source, is_test)
            if gone:
                await self.audit.record(actor, "network_mapping.delete", f"vm_context:{ref.context_id}", tx=tx,
                                        source_network_name=source, is_test_network=is_test, deleted=gone)
        if not gone:
            raise NotFound("network mapping not found", f"VM {ref.vm_name!r} has no "
                           + ("" if is_test is None else ("test " if is_test else "live "))
                           + f"mapping for network {source!r}")
        return gone
