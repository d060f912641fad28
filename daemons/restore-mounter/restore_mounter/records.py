"""What restore-mounter remembers about each mount, persisted before the resources it names are used."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .adapters.mounter import FuseDaemon
from .attach import Attachment

# A mount's life: mounting → mounted → unmounting → (forgotten); `error` when a teardown could not finish
# (busy): it is retried by DELETE and by every sweep. `broken` when what serves it died under it (nbd-pool's
# attachment, or a FUSE filesystem daemon): its reads fail, so it answers 503 with the cause (`error`) until
# DELETE removes it (or it expires when idle); it is never re-adopted as mounted.
MOUNTING, MOUNTED, UNMOUNTING, ERROR, BROKEN = "mounting", "mounted", "unmounting", "error", "broken"


@dataclasses.dataclass
class FsRecord:
    partition: int  # 0: a filesystem on the whole disk
    device: str
    type: str  # what blkid found ("ext4", "ntfs", "vfat", ...); "" if nothing
    label: str
    size: int  # bytes of the partition
    mounted: bool = False
    reason: str = ""  # why it is not mounted
    driver: str = ""  # "kernel", "ntfs-3g", "fusefat"
    mount_point: str = ""  # host path; set before mounting so that a crash leaves a trace
    fuse: FuseDaemon | None = None

    @property
    def dirname(self) -> str:
        return f"part{self.partition}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fuse"] = dataclasses.asdict(self.fuse) if self.fuse else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FsRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in fields}
        values["fuse"] = FuseDaemon(**d["fuse"]) if d.get("fuse") else None
        return cls(**values)


@dataclasses.dataclass
class MountRecord:
    mount_id: str
    image: str
    mount_path: str
    status: str
    created_at: float  # wall clock
    attachment: Attachment | None = None
    filesystems: list[FsRecord] = dataclasses.field(default_factory=list)
    error: str = ""

    @property
    def mounted_filesystems(self) -> list[FsRecord]:
        return [f for f in self.filesystems if f.mounted]

    def to_dict(self) -> dict[str, Any]:
        return {"mount_id": self.mount_id, "image": self.image, "mount_path": self.mount_path,
                "status": self.status, "created_at": self.created_at, "error": self.error,
                "attachment": self.attachment.to_dict() if self.attachment else None,
                "filesystems": [f.to_dict() for f in self.filesystems]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MountRecord:
        return cls(str(d["mount_id"]), str(d["image"]), str(d["mount_path"]), str(d["status"]),
                   float(d.get("created_at", 0)),
                   Attachment.from_dict(d["attachment"]) if d.get("attachment") else None,
                   [FsRecord.from_dict(f) for f in d.get("filesystems", [])], str(d.get("error", "")))
