"""What the simulated management server holds: zones, domains, accounts, networks, offerings, templates, VMs
with NICs, volumes, snapshots, async jobs; and the API's error, `CloudStackError(code, text)`."""

from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import datetime, timezone
from typing import Any

GIB = 1024**3

# The error codes CloudStack answers with (ApiErrorCode) and the cserrorcode of the exception behind them.
UNAUTHORIZED = 401
PARAM_ERROR = 431
UNSUPPORTED_ACTION = 432
INTERNAL_ERROR = 530
CS_ERROR_CODES = {UNAUTHORIZED: 9999, PARAM_ERROR: 4350, UNSUPPORTED_ACTION: 9999, INTERNAL_ERROR: 4250}
BAD_SIGNATURE = "unable to verify user credentials and/or request signature"


class CloudStackError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uuidList": [], "errorcode": self.code, "errortext": self.text}
        if self.code != UNAUTHORIZED:
            out["cserrorcode"] = CS_ERROR_CODES.get(self.code, 9999)
        return out


def new_id() -> str:
    return str(uuid.uuid4())


def now() -> str:
    # CloudStack's format: 2024-05-01T10:00:00+0000
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000")


@dataclasses.dataclass
class Zone:
    id: str
    name: str

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "networktype": "Advanced", "allocationstate": "Enabled",
                "zonetoken": self.id[:8], "dhcpprovider": "VirtualRouter", "localstorageenabled": False,
                "securitygroupsenabled": False}


@dataclasses.dataclass
class Domain:
    id: str
    name: str
    path: str
    parentdomainid: str | None = None

    def view(self) -> dict[str, Any]:
        out = {"id": self.id, "name": self.name, "path": self.path, "level": self.path.count("/"),
               "haschild": False, "state": "Active"}
        if self.parentdomainid:
            out["parentdomainid"] = self.parentdomainid
        return out


@dataclasses.dataclass
class Account:
    id: str
    name: str
    domainid: str
    api_key: str
    secret_key: str

    def view(self, domain: Domain) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "domainid": self.domainid, "domain": domain.name,
                "accounttype": 1, "roletype": "Admin", "state": "enabled"}


@dataclasses.dataclass
class Network:
    id: str
    name: str
    zoneid: str
    cidr: str
    vlan: str = ""
    displaytext: str = ""

    def view(self, zone: Zone) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "displaytext": self.displaytext or self.name,
                "zoneid": self.zoneid, "zonename": zone.name, "cidr": self.cidr, "type": "Isolated",
                "state": "Implemented", "traffictype": "Guest", "broadcasturi": f"vlan://{self.vlan or 'untagged'}",
                "vlan": self.vlan, "canusefordeploy": True, "ispersistent": False}


@dataclasses.dataclass
class ServiceOffering:
    id: str
    name: str
    cpunumber: int
    cpuspeed: int
    memory: int  # MiB

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "displaytext": f"{self.cpunumber} vCPU, {self.memory} MB",
                "cpunumber": self.cpunumber, "cpuspeed": self.cpuspeed, "memory": self.memory,
                "storagetype": "shared", "offerha": False, "iscustomized": False, "created": now()}


@dataclasses.dataclass
class DiskOffering:
    id: str
    name: str
    disksize: int  # GiB; 0 with iscustomized
    iscustomized: bool

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "displaytext": self.name, "disksize": self.disksize,
                "iscustomized": self.iscustomized, "storagetype": "shared", "provisioningtype": "thin",
                "created": now()}


@dataclasses.dataclass
class Template:
    id: str
    name: str
    zoneid: str
    ostypename: str
    size: int  # bytes of its ROOT disk

    def view(self, zone: Zone) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "displaytext": self.name, "zoneid": self.zoneid,
                "zonename": zone.name, "ostypename": self.ostypename, "size": self.size, "isready": True,
                "status": "Download Complete", "format": "QCOW2", "hypervisor": "KVM", "ispublic": True,
                "isfeatured": True, "templatetype": "USER", "created": now()}


@dataclasses.dataclass
class Nic:
    id: str
    networkid: str
    macaddress: str
    ipaddress: str
    isdefault: bool = True


@dataclasses.dataclass
class VirtualMachine:
    id: str
    name: str
    displayname: str
    zoneid: str
    serviceofferingid: str
    templateid: str
    state: str  # Running | Stopped | Destroyed | Expunging
    nics: list[Nic]
    created: str = dataclasses.field(default_factory=now)


@dataclasses.dataclass
class Volume:
    id: str
    name: str
    zoneid: str
    size: int  # bytes
    type: str  # ROOT | DATADISK
    diskofferingid: str | None
    state: str = "Allocated"  # Allocated (no storage yet) → Ready (first attach) → Destroy
    virtualmachineid: str | None = None
    deviceid: int | None = None
    created: str = dataclasses.field(default_factory=now)
    attached: str | None = None


@dataclasses.dataclass
class Snapshot:
    id: str
    volumeid: str
    name: str
    state: str = "BackedUp"
    created: str = dataclasses.field(default_factory=now)


@dataclasses.dataclass
class Job:
    id: str
    cmd: str
    instancetype: str
    instanceid: str
    status: int = 0  # 0 pending, 1 succeeded, 2 failed
    resultcode: int = 0
    result: dict[str, Any] | None = None
    created: str = dataclasses.field(default_factory=now)
    started: float = dataclasses.field(default_factory=time.monotonic)  # for tests: did two jobs overlap?
    finished: float | None = None


@dataclasses.dataclass
class Inventory:
    """Everything the server knows; `seed()` builds a small cloud with this appliance in it."""

    zones: dict[str, Zone] = dataclasses.field(default_factory=dict)
    domains: dict[str, Domain] = dataclasses.field(default_factory=dict)
    accounts: dict[str, Account] = dataclasses.field(default_factory=dict)
    networks: dict[str, Network] = dataclasses.field(default_factory=dict)
    service_offerings: dict[str, ServiceOffering] = dataclasses.field(default_factory=dict)
    disk_offerings: dict[str, DiskOffering] = dataclasses.field(default_factory=dict)
    templates: dict[str, Template] = dataclasses.field(default_factory=dict)
    vms: dict[str, VirtualMachine] = dataclasses.field(default_factory=dict)
    volumes: dict[str, Volume] = dataclasses.field(default_factory=dict)
    snapshots: dict[str, Snapshot] = dataclasses.field(default_factory=dict)
    jobs: dict[str, Job] = dataclasses.field(default_factory=dict)
    appliance_vm_id: str = ""

    # -- the seed --------------------------------------------------------------------------------------

    @classmethod
    def seed(cls, *, api_key: str, secret_key: str, appliance_mac: str) -> Inventory:
        inv = cls()
        zone = inv.add(inv.zones, Zone(new_id(), "zone-sim-1"))
        root = inv.add(inv.domains, Domain(new_id(), "ROOT", "ROOT"))
        inv.add(inv.domains, Domain(new_id(), "customers", "ROOT/customers", root.id))
        inv.add(inv.accounts, Account(new_id(), "admin", root.id, api_key, secret_key))
        prod = inv.add(inv.networks, Network(new_id(), "prod-net", zone.id, "10.1.0.0/24", "101"))
        inv.add(inv.networks, Network(new_id(), "test-net", zone.id, "10.2.0.0/24", "102"))
        small = inv.add(inv.service_offerings, ServiceOffering(new_id(), "Small Instance", 1, 1000, 1024))
        inv.add(inv.service_offerings, ServiceOffering(new_id(), "Medium Instance", 2, 2000, 4096))
        inv.add(inv.service_offerings, ServiceOffering(new_id(), "Large Instance", 4, 2000, 8192))
        inv.add(inv.disk_offerings, DiskOffering(new_id(), "Custom", 0, True))
        inv.add(inv.disk_offerings, DiskOffering(new_id(), "Small 5 GB", 5, False))
        template = inv.add(inv.templates, Template(new_id(), "Debian 12", zone.id, "Debian GNU/Linux 12 (64-bit)",
                                                   8 * GIB))
        appliance = inv.add_vm("oma-appliance", zone.id, small.id, template.id, prod.id, appliance_mac, "10.1.0.10")
        inv.appliance_vm_id = appliance.id
        inv.add_vm("web-01", zone.id, small.id, template.id, prod.id, "02:00:0a:01:00:0b", "10.1.0.11")
        return inv

    @staticmethod
    def add(table: dict[str, Any], item: Any) -> Any:
        table[item.id] = item
        return item

    def add_vm(self, name: str, zoneid: str, offeringid: str, templateid: str, networkid: str, mac: str,
               ip: str, *, state: str = "Running", with_root: bool = True) -> VirtualMachine:
        vm: VirtualMachine = self.add(self.vms, VirtualMachine(new_id(), name, name, zoneid, offeringid, templateid,
                                                               state, [Nic(new_id(), networkid, mac.lower(), ip)]))
        if with_root:
            template = self.templates[templateid]
            self.add(self.volumes, Volume(new_id(), f"ROOT-{name}", zoneid, template.size, "ROOT", None,
                                          state="Ready", virtualmachineid=vm.id, deviceid=0, attached=now()))
        return vm

    # -- lookups ---------------------------------------------------------------------------------------

    def account_by_key(self, api_key: str) -> Account | None:
        return next((a for a in self.accounts.values() if a.api_key == api_key), None)

    def get(self, table: dict[str, Any], what: str, ident: str | None, param: str = "id") -> Any:
        if not ident:
            raise CloudStackError(PARAM_ERROR, f"Unable to execute API command due to missing parameter {param}")
        item = table.get(ident)
        if item is None:
            raise CloudStackError(PARAM_ERROR, f"Unable to execute API command due to invalid value. "
                                               f"Invalid parameter {param} value={ident} due to incorrect long "
                                               f"value format, or entity does not exist or due to incorrect "
                                               f"parameter annotation for the field in api cmd class.")
        return item

    def volumes_of(self, vm_id: str) -> list[Volume]:
        return [v for v in self.volumes.values() if v.virtualmachineid == vm_id]

    def free_deviceid(self, vm_id: str) -> int:
        used = {v.deviceid for v in self.volumes_of(vm_id)}
        # Device id 3 is the CD-ROM on KVM; CloudStack never hands it to a data disk.
        return next(i for i in range(1, 64) if i not in used and i != 3)

    # -- views (the JSON CloudStack answers with) -------------------------------------------------------

    def account(self) -> Account:
        return next(iter(self.accounts.values()))

    def owner(self) -> dict[str, Any]:
        acc = self.account()
        return {"account": acc.name, "domainid": acc.domainid, "domain": self.domains[acc.domainid].name}

    def vm_view(self, vm: VirtualMachine) -> dict[str, Any]:
        zone = self.zones[vm.zoneid]
        so = self.service_offerings[vm.serviceofferingid]
        template = self.templates.get(vm.templateid)
        nics = []
        for nic in vm.nics:
            net = self.networks.get(nic.networkid)
            nics.append({"id": nic.id, "networkid": nic.networkid, "networkname": net.name if net else "",
                         "macaddress": nic.macaddress, "ipaddress": nic.ipaddress, "isdefault": nic.isdefault,
                         "type": "Isolated", "traffictype": "Guest", "netmask": "255.255.255.0"})
        return {"id": vm.id, "name": vm.name, "displayname": vm.displayname, "state": vm.state,
                "zoneid": vm.zoneid, "zonename": zone.name, "serviceofferingid": so.id,
                "serviceofferingname": so.name, "cpunumber": so.cpunumber, "cpuspeed": so.cpuspeed,
                "memory": so.memory, "templateid": vm.templateid,
                "templatename": template.name if template else "", "hypervisor": "KVM",
                "created": vm.created, "nic": nics, **self.owner()}

    def volume_view(self, vol: Volume) -> dict[str, Any]:
        zone = self.zones[vol.zoneid]
        out: dict[str, Any] = {"id": vol.id, "name": vol.name, "zoneid": vol.zoneid, "zonename": zone.name,
                               "type": vol.type, "size": vol.size, "state": vol.state, "created": vol.created,
                               "storagetype": "shared", "hypervisor": "KVM", "provisioningtype": "thin",
                               "destroyed": False, "isextractable": True, **self.owner()}
        if vol.diskofferingid:
            off = self.disk_offerings[vol.diskofferingid]
            out.update(diskofferingid=off.id, diskofferingname=off.name)
        if vol.state != "Allocated":
            out["storage"] = "primary-sim-1"
        if vol.virtualmachineid:
            vm = self.vms[vol.virtualmachineid]
            out.update(virtualmachineid=vm.id, vmname=vm.name, vmdisplayname=vm.displayname, vmstate=vm.state,
                       deviceid=vol.deviceid)
            if vol.attached:
                out["attached"] = vol.attached
        return out

    def snapshot_view(self, snap: Snapshot) -> dict[str, Any]:
        vol = self.volumes.get(snap.volumeid)
        out = {"id": snap.id, "name": snap.name, "volumeid": snap.volumeid, "state": snap.state,
               "snapshottype": "MANUAL", "intervaltype": "MANUAL", "created": snap.created, "locationtype": "PRIMARY",
               "revertable": True, **self.owner()}
        if vol is not None:
            out.update(volumename=vol.name, volumetype=vol.type, virtualsize=vol.size, zoneid=vol.zoneid)
        return out
