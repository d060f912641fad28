"""volume-agent's CloudStack volumes contract (its handlers: volume_agent/api.py; omad's client:
clients/volume_agent.py)."""

from __future__ import annotations

import dataclasses

from ..schema import spec

VM_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
STAMP = r"[0-9a-f]{32}"
CLOUDSTACK_ID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


def volume_name(vm_name: str, disk_unit: int) -> str:
    """The name volume-agent creates (and records) the volume for one disk of a VM under."""
    return f"migration-{vm_name}-disk-{disk_unit}"

# --- requests ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class VolumeCreateIn:
    """A CloudStack volume for one disk of a VM, named `migration-<vm_name>-disk-<disk_unit>`."""

    vm_name: str = spec(pattern=VM_NAME, description="the source VM's name (letters, digits, . _ -); omad sends "
                                                     "a name it had to reduce to these followed by - and 8 hex "
                                                     "digits of the full name's sha256, so reduced names differ")
    disk_unit: int = spec(min=0, max=255, description="the disk's unit number on the source VM")
    size_bytes: int = spec(min=1, description="at least this many bytes; CloudStack sizes volumes in whole GiB, "
                                              "so it is rounded up")
    disk_offering_id: str = spec("", pattern=f"(?:{CLOUDSTACK_ID})?",
                                 description="a disk offering with a custom size; empty = the configured one, else "
                                             "the first custom offering CloudStack lists")
    zone_id: str = spec("", pattern=f"(?:{CLOUDSTACK_ID})?", description="empty = the zone of this appliance's VM")


@dataclasses.dataclass
class SnapshotIn:
    name: str = spec("", max_length=255, description="empty = CloudStack's own name")


@dataclasses.dataclass
class StampIn:
    stamp: str = spec(pattern=STAMP, description="32 lower-case hex digits: what the sync that just completed "
                                                 "leaves on the volume")


@dataclasses.dataclass
class RevertIn:
    snapshot_id: str = spec(pattern=CLOUDSTACK_ID, description="a snapshot of this volume")


# --- answers ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class VolumeView:
    """A volume this agent manages, as its record and CloudStack agree on it."""

    volume_id: str
    name: str
    size_bytes: int
    serial: str = spec(description="what KVM shows the guest: the id without hyphens, first 20 characters")
    attached_here: bool = spec(description="attached to this appliance, its device present and vouched for")
    device_path: str | None = spec(None, description="the block device (/dev/vdX), when attached here")
    link_path: str | None = spec(None, description="<device_dir>/virtio-<serial>, when attached here")
    snapshots: list[str] = spec(factory=list, description="ids of its CloudStack snapshots")
    operation: str | None = spec(None, description="the operation running on it now, if any")


@dataclasses.dataclass
class DeviceView:
    """A device volume-agent attached here for a CloudStack volume (and so vouches for)."""

    volume_id: str
    serial: str
    link_path: str
    device_path: str
    rdev: str = spec(description="the device's major:minor")


@dataclasses.dataclass
class SnapshotView:
    snapshot_id: str
    volume_id: str
    name: str
    state: str
    created: str


@dataclasses.dataclass
class VolumesListing:
    volumes: list[VolumeView]
    unmanaged_attached: list[str] = spec(factory=list, description="ids of volumes CloudStack says are attached "
                                                                   "to this appliance that this agent did not attach")


@dataclasses.dataclass
class StampView:
    """The sync stamp in the last 4 KiB of an attached volume's device, beyond any disk it holds: it travels
    with the volume's content, so a revert to an older snapshot or a new volume shows another one (or none)."""

    volume_id: str
    stamp: str = spec(description="the stamp found; empty when the block holds none")
    offset: int = spec(description="where on the device it lives")


@dataclasses.dataclass
class DevicesListing:
    devices: list[DeviceView]


@dataclasses.dataclass
class Deleted:
    volume_id: str
    deleted: bool
    message: str


@dataclasses.dataclass
class SnapshotDeleted:
    volume_id: str
    snapshot_id: str
    deleted: bool = spec(description="false when CloudStack had no such snapshot any more")
