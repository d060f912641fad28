"""What volume-agent persists about each CloudStack volume it manages, and the registry of devices it vouches for.

A record is saved before each operation starts (with the operation in it) and after it ends, so a restart
knows what was under way. The registry lists the devices attached here for a CloudStack volume; nbd-pool
exports a block device only when it is listed there (root-owned file, omad can neither write nor read it).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from oma_common.contracts.volume_agent_volumes import DeviceView, VolumeView

from .adapters.devdir import serial_of

REGISTRY_KIND = "vouched-devices"


class OpKind(str, enum.Enum):
    CREATE = "create"
    ATTACH = "attach"
    DETACH = "detach"
    DELETE = "delete"
    SNAPSHOT = "snapshot"
    REVERT = "revert"
    DELETE_SNAPSHOT = "delete-snapshot"


@dataclasses.dataclass
class Operation:
    kind: OpKind
    started_at: float
    jobid: str = ""  # CloudStack's job, once it answered
    snapshot_id: str = ""  # snapshot, revert, delete-snapshot
    reattach: bool = False  # revert: the volume was attached here before and is attached again after

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "kind": self.kind.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Operation:
        return cls(OpKind(d["kind"]), float(d["started_at"]), str(d.get("jobid", "")), str(d.get("snapshot_id", "")),
                   bool(d.get("reattach", False)))


@dataclasses.dataclass
class VolumeRecord:
    name: str
    volume_id: str = ""  # empty until CloudStack answered createVolume
    size_bytes: int = 0
    attached_here: bool = False  # attached to this appliance with its device present (and so vouched for)
    device: str = ""  # /dev/vdX
    link: str = ""  # <device_dir>/virtio-<serial>
    rdev: str = ""  # the device's major:minor when it was found
    snapshots: list[str] = dataclasses.field(default_factory=list)
    operation: Operation | None = None

    @property
    def key(self) -> str:
        """What the per-volume lock and the table use: the id, or the name while it is being created."""
        return self.volume_id or f"name:{self.name}"

    @property
    def serial(self) -> str:
        return serial_of(self.volume_id) if self.volume_id else ""

    def mark_attached(self, link: str, device: str, rdev: str) -> None:
        self.attached_here, self.link, self.device, self.rdev = True, link, device, rdev

    def mark_detached(self) -> None:
        self.attached_here, self.link, self.device, self.rdev = False, "", "", ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["operation"] = self.operation.to_dict() if self.operation else None
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VolumeRecord:
        op = d.get("operation")
        return cls(str(d["name"]), str(d.get("volume_id", "")), int(d.get("size_bytes", 0)),
                   bool(d.get("attached_here", False)), str(d.get("device", "")), str(d.get("link", "")),
                   str(d.get("rdev", "")), [str(s) for s in d.get("snapshots", [])],
                   Operation.from_dict(op) if op else None)

    def view(self) -> VolumeView:
        return VolumeView(volume_id=self.volume_id, name=self.name, size_bytes=self.size_bytes, serial=self.serial,
                          attached_here=self.attached_here, device_path=self.device or None,
                          link_path=self.link or None, snapshots=list(self.snapshots),
                          operation=self.operation.kind.value if self.operation else None)

    def vouched(self) -> DeviceView | None:
        if not (self.attached_here and self.device and self.volume_id):
            return None
        return DeviceView(volume_id=self.volume_id, serial=self.serial, link_path=self.link,
                          device_path=self.device, rdev=self.rdev)
