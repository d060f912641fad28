"""Read-only block devices for images: the `Attacher` interface, nbd-pool's client and the local loop backend.

`NbdPoolAttacher` is the product path: nbd-pool owns qemu-nbd, qemu-storage-daemon and the devices, and
attaches the top of a QCOW2 chain read-only (kernel-nbd on the appliance, fuse-loop where the nbd module is
missing). `LocalLoopAttacher` (config `attach = "local-loop"`) binds a RAW image straight to a read-only
loop device with losetup and exposes its partitions with partx; it serves raw images and the tests until
nbd-pool's attach API is there. Both answer with the same `Attachment`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from oma_common import errors
from oma_common.command import CommandFailed
from oma_common.rpc import AgentClient

from .adapters import loop

log = logging.getLogger(__name__)

OWNER_PREFIX = "restore-mounter:"  # how our attachments are told apart in nbd-pool's list


def owner_of(mount_id: str) -> str:
    return OWNER_PREFIX + mount_id


@dataclasses.dataclass(frozen=True)
class Partition:
    number: int
    device: str  # /dev/loop0p1, /dev/nbd0p1
    start: int  # bytes
    size: int  # bytes
    type: str  # GPT type GUID or MBR id
    name: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Partition:
        return cls(int(d["number"]), str(d["device"]), int(d.get("start", 0)), int(d.get("size", 0)),
                   str(d.get("type", "")), str(d.get("name", "")))


@dataclasses.dataclass(frozen=True)
class Attachment:
    attachment_id: str
    device: str  # the whole disk: /dev/loopN or /dev/nbdN
    backend: str  # "fuse-loop", "kernel-nbd" (nbd-pool) or "local-loop"
    image: str
    partitions: tuple[Partition, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Attachment:
        return cls(str(d["attachment_id"]), str(d["device"]), str(d["backend"]), str(d.get("image", "")),
                   tuple(Partition.from_dict(p) for p in d.get("partitions", [])))


class Attacher(Protocol):
    name: str

    async def attach(self, image: str, owner: str) -> Attachment:
        """Attach `image` read-only; errors.Exhausted (with available_slots) when no slot is free."""

    async def detach(self, att: Attachment) -> None:
        """Undo attach; idempotent (an attachment already gone is fine)."""

    async def intact(self, att: Attachment) -> bool:
        """Whether a recorded attachment still exists as recorded (for re-adoption after a restart)."""

    async def release_orphans(self, keep: set[str], images: set[str], devices: set[str]) -> list[str]:
        """Detach our attachments not in `keep` (attachment ids). A backend that cannot tag its devices
        with an owner also gets the images of the dropped records and the devices found mounted under the
        mount root by nobody. Returns what was released."""


class NbdPoolAttacher:
    """nbd-pool's agent API over its unix socket: POST/DELETE/GET /attachments."""

    name = "nbd-pool"

    def __init__(self, client: AgentClient, timeout: float = 120.0) -> None:
        self.client = client
        self.timeout = timeout

    async def attach(self, image: str, owner: str) -> Attachment:
        body = await self.client.call("POST", "/attachments", json={"image": image, "owner": owner},
                                      timeout=self.timeout)
        return self._parse(body, image)

    def _parse(self, body: Mapping[str, Any], image: str) -> Attachment:
        try:
            return Attachment(str(body["attachment_id"]), str(body["device"]), str(body.get("backend", "")),
                              str(body.get("image") or image),
                              tuple(Partition.from_dict(p) for p in body.get("partitions") or []))
        except (KeyError, TypeError, ValueError) as e:
            raise errors.Unavailable("nbd-pool answered unexpectedly", f"attachment without {e}") from e

    async def detach(self, att: Attachment) -> None:
        try:
            await self.client.call("DELETE", f"/attachments/{att.attachment_id}", timeout=self.timeout)
        except errors.NotFound:
            pass

    async def _list(self) -> list[Mapping[str, Any]]:
        body = await self.client.call("GET", "/attachments", timeout=self.timeout)
        return list(body.get("attachments") or [])

    async def intact(self, att: Attachment) -> bool:
        for a in await self._list():
            if str(a.get("attachment_id")) == att.attachment_id:
                return str(a.get("device")) == att.device and Path(att.device).exists()
        return False

    async def release_orphans(self, keep: set[str], images: set[str], devices: set[str]) -> list[str]:
        released = []
        for a in await self._list():
            aid, owner = str(a.get("attachment_id")), str(a.get("owner", ""))
            if owner.startswith(OWNER_PREFIX) and aid not in keep:
                log.warning("releasing attachment %s (owner %s) that no mount tracks", aid, owner)
                await self.detach(self._parse(a, str(a.get("image", ""))))
                released.append(aid)
        return released


QCOW2_MAGIC = b"QFI\xfb"


class LocalLoopAttacher:
    """A raw image bound to a read-only loop device; partitions added with partx (see the module doc)."""

    name = "local-loop"

    async def attach(self, image: str, owner: str) -> Attachment:
        with open(image, "rb") as f:
            if f.read(4) == QCOW2_MAGIC:
                raise errors.Invalid("raw images only", f"{image} is QCOW2; the local-loop attacher takes raw "
                                                        "images (configure attach = \"nbd-pool\" for QCOW2)")
        try:
            device = await loop.attach(Path(image), resource_id=owner)
        except (CommandFailed, loop.LoopError) as e:
            raise errors.Unavailable("cannot attach the image", str(e)) from e
        try:
            table = await loop.read_table(device, resource_id=owner)
            parts: tuple[Partition, ...] = ()
            if table:
                devices = await loop.add_partitions(device, [e.number for e in table], resource_id=owner)
                parts = tuple(Partition(e.number, devices[e.number], e.start, e.size, e.type, e.name)
                              for e in table)
        except BaseException as e:
            await loop.detach(device, image, resource_id=owner)
            if isinstance(e, (CommandFailed, loop.LoopError)):
                raise errors.Unavailable("cannot read the image's partitions", str(e)) from e
            raise
        return Attachment(Path(device).name, device, self.name, image, parts)

    async def detach(self, att: Attachment) -> None:
        try:
            await loop.detach(att.device, att.image)
        except (CommandFailed, loop.LoopError) as e:
            raise errors.Conflict("device busy", str(e)) from e

    async def intact(self, att: Attachment) -> bool:
        return loop.backing_file(att.device) == att.image and all(os.path.exists(p.device)
                                                                   for p in att.partitions)

    async def release_orphans(self, keep: set[str], images: set[str], devices: set[str]) -> list[str]:
        released = []
        disks = {m.group(1) for d in devices if (m := re.fullmatch(r"(/dev/loop\d+)(p\d+)?", d))}
        for device, back in (await loop.list_loops()).items():
            if (back in images or device in disks) and Path(device).name not in keep:
                log.warning("detaching %s (%s): no mount tracks it", device, back)
                await loop.detach(device, back)
                released.append(Path(device).name)
        return released
