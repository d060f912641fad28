"""A VM as vCenter describes it (the VMA's discovery object): parsed leniently, compared precisely."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from oma_common import schema
from oma_common.errors import Invalid
from oma_common.schema import spec

GIB = 1024**3


@dataclasses.dataclass
class DiskSpec:
    """One virtual disk; `id` is disk-<VMware device key>."""

    id: str = spec(pattern=r"disk-\d+", max_length=32)
    label: str = spec("", max_length=256)
    path: str = spec("", max_length=4096)
    vmdk_path: str = spec("", max_length=4096)
    size_gb: int = spec(0, min=0)
    capacity_bytes: int = spec(0, min=0)
    datastore: str = spec("", max_length=256)
    provisioning_type: str = spec("", max_length=64)
    unit_number: int | None = spec(None, min=0)


@dataclasses.dataclass
class NicSpec:
    """One network adapter."""

    label: str = spec("", max_length=256)
    network_name: str = spec("", max_length=256)
    adapter_type: str = spec("", max_length=64)
    mac_address: str = spec("", max_length=64)
    connected: bool = spec(True)
    type: str = spec("", max_length=64)


@dataclasses.dataclass
class VmSpec:
    """One VM of the VMA's discovery answer (CONTRACTS.md, "VM discovery data")."""

    id: str = spec(min_length=1, max_length=128, description="VMware instance UUID")
    name: str = spec(min_length=1, max_length=1024)
    path: str = spec("", max_length=4096)
    datacenter: str = spec("", max_length=256)
    power_state: str = spec("", max_length=32)
    guest_os: str = spec("", max_length=256)
    os_type: str = spec("", max_length=64)
    memory_mb: int = spec(0, min=0)
    num_cpu: int = spec(0, min=0)
    cpus: int = spec(0, min=0)
    vmx_version: str = spec("", max_length=32)
    display_name: str = spec("", max_length=1024)
    annotation: str = spec("", max_length=65536)
    folder_path: str = spec("", max_length=4096)
    vmware_tools_status: str = spec("", max_length=64)
    vmware_tools_version: str = spec("", max_length=64)
    disks: list[DiskSpec] = spec(factory=list)
    networks: list[NicSpec] = spec(factory=list)

    @property
    def cpu_count(self) -> int:
        return self.num_cpu or self.cpus

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = schema.to_dict(self)
        out["cpus"] = out["num_cpu"] = self.cpu_count
        return out


def _drop_nulls(value: Any) -> Any:
    # The VMA is written in Go: an empty slice or an unset pointer arrives as null. Null means "not said".
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def parse_vm(data: Any, where: str = "vm") -> VmSpec:
    """Invalid (naming the field) when the object is not a usable VM description."""
    try:
        vm = schema.parse(VmSpec, _drop_nulls(data) if isinstance(data, dict) else data, what=where)
    except Invalid as e:
        problems = e.extra.get("problems") or [e.details]
        raise Invalid(e.message, "; ".join(f"{where}.{p}" for p in problems)) from e
    ids = [d.id for d in vm.disks]
    if len(set(ids)) != len(ids):
        raise Invalid(f"invalid {where}", f"VM {vm.name!r} lists a disk id twice: {ids}")
    return vm


def parse_vms(items: Any, where: str = "vms") -> list[VmSpec]:
    if not isinstance(items, list):
        raise Invalid(f"invalid {where}", f"{where} must be an array")
    vms = [parse_vm(item, f"{where}[{i}]") for i, item in enumerate(items)]
    seen: set[str] = set()
    for vm in vms:
        if vm.id in seen:
            raise Invalid(f"invalid {where}", f"VMware id {vm.id} appears twice")
        seen.add(vm.id)
    return vms


def _gib(n: int) -> str:
    return f"{n / GIB:g} GiB"


class StoredDisk(Protocol):
    """A disk as stored (store.contexts.Disk): what a re-discovery compares."""

    @property
    def capacity_bytes(self) -> int: ...

    @property
    def vmdk_path(self) -> str: ...

    @property
    def datastore(self) -> str: ...

    @property
    def unit_number(self) -> int | None: ...

    @property
    def provisioning_type(self) -> str: ...

    @property
    def label(self) -> str: ...


def disk_changes(old: Mapping[str, StoredDisk], new: list[DiskSpec]) -> list[str]:
    """Sentences naming what differs between stored disks (by disk_id) and discovered ones."""
    out = []
    new_by_id = {d.id: d for d in new}
    for disk in new:
        before = old.get(disk.id)
        if before is None:
            out.append(f"disk {disk.id} added ({_gib(disk.capacity_bytes)})")
            continue
        if before.capacity_bytes != disk.capacity_bytes:
            out.append(f"disk {disk.id} resized from {_gib(before.capacity_bytes)} to {_gib(disk.capacity_bytes)}")
        for field in ("vmdk_path", "datastore", "unit_number", "provisioning_type", "label"):
            if getattr(before, field) != getattr(disk, field):
                out.append(f"disk {disk.id} {field} changed from {getattr(before, field)!r} to "
                           f"{getattr(disk, field)!r}")
    out.extend(f"disk {disk_id} removed" for disk_id in old if disk_id not in new_by_id)
    return out


NIC_FIELDS = ("label", "network_name", "adapter_type", "mac_address", "connected", "type")


def nic_changes(old: Sequence[object], new: list[NicSpec]) -> list[str]:
    """A sentence when the stored NICs (records with NIC_FIELDS) differ from the discovered ones."""
    before = [tuple(getattr(n, f) for f in NIC_FIELDS) for n in old]
    after = [tuple(getattr(n, f) for f in NIC_FIELDS) for n in new]
    if before == after:
        return []
    return [f"network adapters changed ({len(before)} → {len(after)}: "
            f"{', '.join(f'{n.label} on {n.network_name}' for n in new) or 'none'})"]
