"""The simulated vCenter inventory: VMs, their disks and NICs, and the VMA's discovery view of them."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import uuid
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

MiB = 1024 * 1024
GiB = 1024 * MiB

# VMware numbers virtual disk devices from 2000; the VMA names a disk "disk-<key>".
FIRST_DISK_KEY = 2000
# Unit 7 of a SCSI bus is the controller itself, so disks skip it (VMware does the same).
SCSI_CONTROLLER_UNIT = 7
# Addresses of the form 00:50:56:00-3f:xx:xx are VMware's "static" range.
VMWARE_OUI = "00:50:56"

# Names the product's tests care about: deterministic ids so runs are reproducible.
_NAMESPACE = uuid.UUID("7c1d1f4e-3b7a-4f59-9a35-5ad0c0ffee01")

DiskRef = Union[int, str]


class InventoryError(Exception):
    """A lookup or change the simulated vCenter would refuse (unknown VM or disk, bad value)."""


def escape_name(name: str) -> str:
    """Escape a managed-entity name the way vSphere does inside inventory paths and datastore folders."""
    return name.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")


@dataclasses.dataclass
class VirtualDisk:
    """One virtual disk; `key` is the VMware device key (2000, 2001, ...)."""

    key: int
    capacity_bytes: int
    datastore: str
    vmdk_path: str
    unit_number: int
    label: str
    provisioning_type: str = "thin"  # thin | thick | eagerZeroedThick

    @property
    def id(self) -> str:
        return f"disk-{self.key}"

    @property
    def size_gb(self) -> int:
        # Rounded up: the product sizes CloudStack volumes from it and a volume must not be smaller.
        return max(1, math.ceil(self.capacity_bytes / GiB))

    def to_discovery(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "path": self.vmdk_path,
            "vmdk_path": self.vmdk_path,
            "size_gb": self.size_gb,
            "capacity_bytes": self.capacity_bytes,
            "datastore": self.datastore,
            "provisioning_type": self.provisioning_type,
            "unit_number": self.unit_number,
        }


@dataclasses.dataclass
class VirtualNic:
    """One network adapter."""

    label: str
    network_name: str
    adapter_type: str  # vmxnet3 | e1000 | e1000e
    mac_address: str
    connected: bool = True
    type: str = "Network"  # the backing: Network | DistributedVirtualPortgroup

    def to_discovery(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class VirtualMachine:
    """One VM as vCenter knows it."""

    name: str
    id: str  # the VMware instance UUID
    datacenter: str
    folder_path: str  # "/DC1/vm/Production"
    power_state: str = "poweredOn"  # poweredOn | poweredOff | suspended
    guest_os: str = "Ubuntu Linux (64-bit)"
    os_type: str = "linux"
    memory_mb: int = 2048
    num_cpu: int = 2
    vmx_version: str = "vmx-19"
    annotation: str = ""
    vmware_tools_status: str = "toolsOk"
    vmware_tools_version: str = "12352"
    disks: list[VirtualDisk] = dataclasses.field(default_factory=list)
    networks: list[VirtualNic] = dataclasses.field(default_factory=list)
    default_datastore: str = "datastore1"

    @property
    def path(self) -> str:
        return f"{self.folder_path}/{escape_name(self.name)}"

    def disk(self, ref: DiskRef) -> VirtualDisk:
        """A disk by index (0, 1, ...), VMware key (2000, ...) or id ("disk-2000")."""
        if isinstance(ref, str):
            key_text = ref[len("disk-"):] if ref.startswith("disk-") else ref
            if not key_text.isdigit():
                raise InventoryError(f"bad disk reference {ref!r}")
            ref = int(key_text)
            if ref < FIRST_DISK_KEY:
                raise InventoryError(f"bad disk reference disk-{ref}")
        if ref < FIRST_DISK_KEY:
            if 0 <= ref < len(self.disks):
                return self.disks[ref]
            raise InventoryError(f"VM {self.name!r} has no disk index {ref}")
        for disk in self.disks:
            if disk.key == ref:
                return disk
        raise InventoryError(f"VM {self.name!r} has no disk with key {ref}")

    def add_disk(
        self,
        capacity_bytes: int,
        *,
        datastore: Optional[str] = None,
        provisioning_type: str = "thin",
    ) -> VirtualDisk:
        """Attach a new disk with the next free key and SCSI unit, as vCenter would name it."""
        if capacity_bytes <= 0 or capacity_bytes % 512:
            raise InventoryError(f"disk capacity must be a positive multiple of 512, not {capacity_bytes}")
        key = max((d.key for d in self.disks), default=FIRST_DISK_KEY - 1) + 1
        used = {d.unit_number for d in self.disks}
        unit = next(u for u in range(64) if u != SCSI_CONTROLLER_UNIT and u not in used)
        ds = datastore or self.default_datastore
        folder = escape_name(self.name)
        index = len(self.disks)
        suffix = "" if index == 0 else f"_{index}"
        disk = VirtualDisk(
            key=key,
            capacity_bytes=capacity_bytes,
            datastore=ds,
            vmdk_path=f"[{ds}] {folder}/{folder}{suffix}.vmdk",
            unit_number=unit,
            label=f"Hard disk {index + 1}",
            provisioning_type=provisioning_type,
        )
        self.disks.append(disk)
        return disk

    def add_nic(
        self,
        network_name: str = "VM Network",
        *,
        adapter_type: str = "vmxnet3",
        mac_address: Optional[str] = None,
        connected: bool = True,
        type: str = "Network",
    ) -> VirtualNic:
        index = len(self.networks)
        if mac_address is None:
            digest = hashlib.sha256(f"{self.id}/{index}".encode()).digest()
            mac_address = f"{VMWARE_OUI}:{digest[0] & 0x3F:02x}:{digest[1]:02x}:{digest[2]:02x}"
        nic = VirtualNic(
            label=f"Network adapter {index + 1}",
            network_name=network_name,
            adapter_type=adapter_type,
            mac_address=mac_address,
            connected=connected,
            type=type,
        )
        self.networks.append(nic)
        return nic

    def to_discovery(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "path": self.path,
            "datacenter": self.datacenter,
            "power_state": self.power_state,
            "guest_os": self.guest_os,
            "os_type": self.os_type,
            "memory_mb": self.memory_mb,
            "num_cpu": self.num_cpu,
            "cpus": self.num_cpu,
            "vmx_version": self.vmx_version,
            "display_name": self.name,
            "annotation": self.annotation,
            "folder_path": self.folder_path,
            "vmware_tools_status": self.vmware_tools_status,
            "vmware_tools_version": self.vmware_tools_version,
            "disks": [d.to_discovery() for d in self.disks],
            "networks": [n.to_discovery() for n in self.networks],
        }


VmRef = Union[str, VirtualMachine]


class Inventory:
    """The vCenter the VMA talks to: its address, its one login and its VMs."""

    def __init__(
        self,
        *,
        host: str = "vcenter.sim.local",
        datacenter: str = "DC1",
        username: str = "administrator@vsphere.local",
        password: str = "VMware1!",
    ) -> None:
        self.host = host
        self.datacenter = datacenter
        self.username = username
        self.password = password
        self.vms: list[VirtualMachine] = []

    # -- building ---------------------------------------------------------------------------------

    def add_vm(
        self,
        name: str,
        *,
        disks: Union[int, Sequence[int]] = 1,
        nics: Union[int, Sequence[str]] = 1,
        disk_bytes: int = 64 * MiB,
        folder: str = "",
        datastore: str = "datastore1",
        provisioning_type: str = "thin",
        vm_id: Optional[str] = None,
        **fields: Any,
    ) -> VirtualMachine:
        """Build and add a VM with `disks` disks (a count, or a list of capacities in bytes) and
        `nics` NICs (a count, or a list of network names); other VirtualMachine fields by keyword."""
        folder_path = f"/{self.datacenter}/vm" + (f"/{folder.strip('/')}" if folder.strip("/") else "")
        if vm_id is None:
            vm_id = str(uuid.uuid5(_NAMESPACE, f"{folder_path}/{name}"))
        if self.find_vm(vm_id) is not None:
            raise InventoryError(f"a VM with id {vm_id} already exists")
        vm = VirtualMachine(
            name=name,
            id=vm_id,
            datacenter=self.datacenter,
            folder_path=folder_path,
            default_datastore=datastore,
            **fields,
        )
        sizes = [disk_bytes] * disks if isinstance(disks, int) else list(disks)
        for size in sizes:
            vm.add_disk(size, provisioning_type=provisioning_type)
        networks = [f"VM Network {i}" if i else "VM Network" for i in range(nics)] if isinstance(nics, int) else list(nics)
        for i, network in enumerate(networks):
            vm.add_nic(network, adapter_type="vmxnet3" if i % 2 == 0 else "e1000e")
        self.vms.append(vm)
        return vm

    def remove_vm(self, ref: VmRef) -> None:
        self.vms.remove(self.vm(ref))

    # -- lookup -----------------------------------------------------------------------------------

    def find_vm(self, ref: str) -> Optional[VirtualMachine]:
        """A VM by instance UUID, inventory path or name (in that order of preference)."""
        for attr in ("id", "path", "name"):
            for vm in self.vms:
                if getattr(vm, attr) == ref:
                    return vm
        return None

    def vm(self, ref: VmRef) -> VirtualMachine:
        if isinstance(ref, VirtualMachine):
            return ref
        vm = self.find_vm(ref)
        if vm is None:
            raise InventoryError(f"VM {ref!r} not found")
        return vm

    def check_host(self, host: Optional[str]) -> Optional[str]:
        """None if `host` is this vCenter (or not given), else the VMA's connection error."""
        if host and host != self.host:
            return f"failed to connect to vCenter {host}: dial tcp: lookup {host}: no such host"
        return None

    def check_credentials(self, username: Optional[str], password: Optional[str]) -> Optional[str]:
        """None if the login works, else vCenter's complaint (the VMA passes it on as plain text)."""
        if username != self.username or password != self.password:
            return (
                "failed to login to vCenter: ServerFaultCode: Cannot complete login due to an "
                "incorrect user name or password."
            )
        return None

    def discovery(self, name_filter: Optional[str] = None) -> dict[str, Any]:
        """The body of the VMA's `POST /api/v1/discover`; `name_filter` is a case-sensitive substring."""
        vms: Iterable[VirtualMachine] = self.vms
        if name_filter:
            vms = [vm for vm in vms if name_filter in vm.name]
        return {
            "vcenter": {"host": self.host, "datacenter": self.datacenter},
            "vms": [vm.to_discovery() for vm in vms],
        }

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Inventory":
        """Build from the CLI's JSON form (see __main__.py); returns the inventory, sources apart."""
        inv, _ = cls.from_dict_with_sources(data)
        return inv

    @classmethod
    def from_dict_with_sources(cls, data: Mapping[str, Any]) -> tuple["Inventory", list[tuple[str, int, str]]]:
        vc = dict(data.get("vcenter", {}))
        inv = cls(**{k: vc[k] for k in ("host", "datacenter", "username", "password") if k in vc})
        sources: list[tuple[str, int, str]] = []
        for spec in data.get("vms", []):
            spec = dict(spec)
            name = spec.pop("name")
            disks = spec.pop("disks", 1)
            nics = spec.pop("nics", spec.pop("networks", 1))
            disk_specs: list[Mapping[str, Any]] = []
            if isinstance(disks, list):
                disk_specs = [d if isinstance(d, Mapping) else {"capacity_bytes": int(d)} for d in disks]
                disks = 0
            nic_specs: list[Mapping[str, Any]] = []
            if isinstance(nics, list):
                nic_specs = [n if isinstance(n, Mapping) else {"network_name": str(n)} for n in nics]
                nics = 0
            vm = inv.add_vm(name, disks=disks, nics=nics, **spec)
            for index, d in enumerate(disk_specs):
                capacity = int(d.get("capacity_bytes") or int(d.get("size_gb", 1)) * GiB)
                vm.add_disk(
                    capacity,
                    datastore=d.get("datastore"),
                    provisioning_type=d.get("provisioning_type", "thin"),
                )
                if d.get("source"):
                    sources.append((vm.id, index, str(d["source"])))
            for n in nic_specs:
                vm.add_nic(
                    n.get("network_name", "VM Network"),
                    adapter_type=n.get("adapter_type", "vmxnet3"),
                    mac_address=n.get("mac_address"),
                    connected=n.get("connected", True),
                    type=n.get("type", "Network"),
                )
        return inv, sources


def demo_inventory() -> Inventory:
    """Three VMs with the awkward names the product must survive; the CLI's default."""
    inv = Inventory()
    inv.add_vm("web 01", disks=2, nics=2, folder="Production", annotation="two disks, two NICs")
    inv.add_vm("db/primary – ünïcödé", disks=[64 * MiB, 128 * MiB, 32 * MiB], nics=1, memory_mb=8192, num_cpu=4)
    inv.add_vm("x" * 70 + " long name 0123456789", disks=1, nics=3, power_state="poweredOff")
    return inv
