"""The read-only image attach interface shared by the fuse-loop and kernel-nbd backends."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from oma_common.blockdev import KernelPartition
from oma_common.process import AdoptedChild, ProcessIdentity, SupervisedChild

from ..images import OpenedImage
from .partitions import PartitionTable

FORMATS = ("qcow2", "raw")


class AttachError(Exception):
    """An image could not be attached, or a recorded attachment cannot be resumed."""


class DetachBusy(AttachError):
    """The device or one of its partitions is still in use (mounted, open exclusively): nothing was torn down."""


@dataclasses.dataclass(frozen=True)
class Partition:
    number: int
    device: str  # /dev/loop0p1
    start: int  # bytes
    size: int  # bytes
    type: str  # GPT type GUID or MBR id ("0x83")
    name: str = ""  # GPT partition name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Partition:
        return cls(int(data["number"]), str(data["device"]), int(data["start"]), int(data["size"]), str(data["type"]), str(data.get("name", "")))


def partitions_from(table: PartitionTable, kernel: list[KernelPartition]) -> list[Partition]:
    devices = {k.number: k.device for k in kernel}
    return [Partition(e.number, devices[e.number], e.start, e.size, e.type, e.name) for e in table.partitions]


@dataclasses.dataclass(frozen=True)
class AttachRecord:
    """What the daemon persists about an attachment, to resume or release it after a restart."""

    backend: str  # "fuse-loop" or "kernel-nbd"
    resource_id: str
    image: str
    fmt: str
    workdir: str
    device: str  # /dev/loopN or /dev/nbdN
    process: ProcessIdentity  # qemu-storage-daemon (fuse-loop) or qemu-nbd --connect (kernel-nbd)
    fuse_file: str = ""  # fuse-loop: the FUSE export's mount point, the loop device's backing file
    partitions: tuple[Partition, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["process"] = self.process.to_dict()
        d["partitions"] = [p.to_dict() for p in self.partitions]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttachRecord:
        return cls(
            backend=str(data["backend"]),
            resource_id=str(data["resource_id"]),
            image=str(data["image"]),
            fmt=str(data["fmt"]),
            workdir=str(data["workdir"]),
            device=str(data["device"]),
            process=ProcessIdentity.from_dict(data["process"]),
            fuse_file=str(data.get("fuse_file", "")),
            partitions=tuple(Partition.from_dict(p) for p in data.get("partitions", [])),
        )


class Attachment(Protocol):
    """A read-only block device for an image, with its partitions exposed."""

    @property
    def device(self) -> str: ...

    @property
    def partitions(self) -> list[Partition]: ...

    @property
    def record(self) -> AttachRecord: ...

    @property
    def exit_code(self) -> int | None: ...

    async def detach(self) -> None:
        """Undo everything attach did; DetachBusy (and nothing undone) while the device is in use."""

    def forget(self) -> AttachRecord:
        """Stop supervising but leave everything attached (daemon shutdown); returns the record to persist."""


class HeldAttachment:
    """What both backends hold for an attachment: its record and the child serving it (None once stopped).

    Subclasses add detach(), which tears down under `_lock` and then drops `_child`.
    """

    def __init__(self, record: AttachRecord, child: SupervisedChild | AdoptedChild | None) -> None:
        self._record = record
        self._child = child
        self._lock = asyncio.Lock()

    @property
    def device(self) -> str:
        return self._record.device

    @property
    def partitions(self) -> list[Partition]:
        return list(self._record.partitions)

    @property
    def record(self) -> AttachRecord:
        return self._record

    @property
    def exit_code(self) -> int | None:
        """The serving child's exit code once it ended, when it was ours to reap (not one adopted after a
        restart: the kernel tells only a parent); None otherwise."""
        return self._child.returncode if isinstance(self._child, SupervisedChild) else None

    def forget(self) -> AttachRecord:
        if isinstance(self._child, SupervisedChild):
            self._child.release()
        elif self._child is not None:
            self._child.close()
        self._child = None
        return self._record


class AttachBackend(Protocol):
    name: str

    async def attach(self, image: Path, workdir: Path, *, fmt: str = "qcow2", resource_id: str | None = None,
                     source: OpenedImage | None = None) -> Attachment:
        """Attach `image` (its backing chain included) read-only; `workdir` is the backend's own scratch dir."""

    async def resume(self, record: AttachRecord) -> Attachment:
        """Take over a recorded attachment after a daemon restart; AttachError if it is not intact."""

    async def release(self, record: AttachRecord) -> None:
        """Tear down whatever is left of a recorded attachment that will not be resumed (idempotent)."""


def block_device_busy(device: str) -> bool:
    """Whether a block device is claimed: mounted, or any of its partitions mounted (O_EXCL open → EBUSY).

    Blocking open(2) of a device node: run it in an executor.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return False
        raise
    os.close(fd)
    return False


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"image format must be one of {', '.join(FORMATS)}, not {fmt!r}")
