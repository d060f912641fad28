"""Which CloudStack VM this appliance is: the VM one of whose NICs has one of this machine's MAC addresses."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

from ..adapters.netlinks import LocalNic
from ..clients.cloudstack import Client, Nic, VirtualMachine

log = logging.getLogger(__name__)

LocalNics = Callable[[], Awaitable[list[LocalNic]]]


@dataclasses.dataclass(frozen=True)
class Detected:
    """The outcome: the VM and the NIC that matched, or None with the MACs that were looked for."""

    vm: VirtualMachine | None
    nic: Nic | None
    local: tuple[LocalNic, ...]
    interface: str = ""  # this machine's interface that carries the matching MAC

    def info(self) -> dict[str, str] | None:
        if self.vm is None or self.nic is None:
            return None
        return {"vm_id": self.vm.id, "vm_name": self.vm.name, "display_name": self.vm.display_name,
                "state": self.vm.state, "zone_id": self.vm.zone_id, "account": self.vm.account,
                "domain": self.vm.domain, "mac_address": self.nic.mac_address, "ip_address": self.nic.ip_address,
                "network_id": self.nic.network_id, "network_name": self.nic.network_name,
                "interface": self.interface}


async def detect(client: Client, local_nics: LocalNics) -> Detected:
    """List every VM the key may see and match their NICs' MACs against this machine's.

    A MAC is unique within a CloudStack zone; should two VMs carry one of ours (a copy of this appliance
    in another zone), the running one wins, then the first listed.
    """
    local = tuple(await local_nics())
    by_mac = {n.mac_address: n for n in local}
    matches: list[tuple[VirtualMachine, Nic]] = []
    for vm in await client.virtual_machines(listall=True):
        for nic in vm.nics:
            if nic.mac_address in by_mac:
                matches.append((vm, nic))
    if not matches:
        log.info("no CloudStack VM has a NIC with this machine's MACs (%s)",
                 ", ".join(n.mac_address for n in local) or "none")
        return Detected(None, None, local)
    matches.sort(key=lambda m: m[0].state != "Running")
    vm, nic = matches[0]
    log.info("this appliance is CloudStack VM %s (%s), MAC %s", vm.id, vm.name, nic.mac_address)
    return Detected(vm, nic, local, by_mac[nic.mac_address].name)
