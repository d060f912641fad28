"""Read-only block devices for images: the `Attacher` interface and its one implementation, nbd-pool's client.

nbd-pool owns qemu-nbd, qemu-storage-daemon and the devices, and attaches the top of a QCOW2 chain read-only
(kernel-nbd on the appliance, fuse-loop where the nbd module is missing); it reads the partition table too.
The wire shapes are nbd-pool's contract (oma_common.contracts.nbd_pool). `Attachment` is what a mount
record remembers of an attachment; `Health` is what nbd-pool says of it now (its serving process alive or not).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Protocol

from oma_common import errors
from oma_common.contracts.nbd_pool import Attachment as AttachmentAnswer
from oma_common.contracts.nbd_pool import AttachIn, AttachmentList
from oma_common.rpc import AgentClient

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
    backend: str  # "fuse-loop" or "kernel-nbd" (nbd-pool)
    image: str
    partitions: tuple[Partition, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Attachment:
        return cls(str(d["attachment_id"]), str(d["device"]), str(d["backend"]), str(d.get("image", "")),
                   tuple(Partition.from_dict(p) for p in d.get("partitions", [])))


ATTACHED, BROKEN, GONE = "attached", "broken", "gone"


@dataclasses.dataclass(frozen=True)
class Health:
    """An attachment now: `attached`; `broken` (nbd-pool holds it, but the process serving the device died:
    every read of the device fails); `gone` (nbd-pool has no such attachment, or another device under its id)."""

    state: str
    cause: str = ""


class Attacher(Protocol):
    name: str

    async def attach(self, image: str, owner: str) -> Attachment:
        """Attach `image` read-only; errors.Exhausted (with available_slots) when no slot is free."""

    async def detach(self, att: Attachment) -> None:
        """Undo attach; idempotent (an attachment already gone is fine)."""

    async def health(self, atts: Collection[Attachment]) -> dict[str, Health]:
        """What each attachment is now, by attachment id (one question for all of them)."""

    async def release_orphans(self, keep: set[str], images: set[str], devices: set[str]) -> list[str]:
        """Detach our attachments not in `keep` (attachment ids); `images` and `devices` (of dropped records,
        and found mounted under the mount root by nobody) are for a backend that cannot tag its devices with
        an owner. Returns what was released."""

    async def release_unkept(self, keep: Callable[[str, str], bool]) -> list[str]:
        """Detach each of our attachments for which `keep(attachment_id, owner)` is false (asked after the
        listing, just before its detach); returns what was released."""

    def hurry(self, timeout: float) -> None:
        """From now on no call waits longer than `timeout` seconds (the daemon is stopping)."""


class NbdPoolAttacher:
    """nbd-pool's agent API over its unix socket: POST/DELETE/GET /attachments."""

    name = "nbd-pool"

    def __init__(self, client: AgentClient, timeout: float = 120.0, health_timeout: float = 10.0) -> None:
        self.client = client
        self.timeout = timeout
        self.health_timeout = health_timeout  # asked on the way to a download: not worth a long wait

    def hurry(self, timeout: float) -> None:
        # Calls made from now on; one in flight keeps its own deadline (stop() hangs up on an attach).
        self.timeout = min(self.timeout, timeout)
        self.health_timeout = min(self.health_timeout, timeout)

    async def attach(self, image: str, owner: str) -> Attachment:
        body = await self.client.typed(AttachmentAnswer, "POST", "/attachments", body=AttachIn(image, owner),
                                       timeout=self.timeout)
        return self._attachment(body)

    @staticmethod
    def _attachment(a: AttachmentAnswer) -> Attachment:
        return Attachment(a.attachment_id, a.device, a.backend, a.image,
                          tuple(Partition(p.number, p.device, p.start, p.size, p.type, p.name) for p in a.partitions))

    async def detach(self, att: Attachment) -> None:
        try:
            await self.client.call("DELETE", f"/attachments/{att.attachment_id}", timeout=self.timeout)
        except errors.NotFound:
            pass

    async def _list(self, timeout: float | None = None) -> list[AttachmentAnswer]:
        return (await self.client.typed(AttachmentList, "GET", "/attachments",
                                        timeout=timeout or self.timeout)).attachments

    async def health(self, atts: Collection[Attachment]) -> dict[str, Health]:
        known = {a.attachment_id: a for a in await self._list(self.health_timeout)}
        out = {}
        for att in atts:
            a = known.get(att.attachment_id)
            if a is None:
                out[att.attachment_id] = Health(GONE, f"nbd-pool no longer holds attachment {att.attachment_id}")
            elif a.device != att.device:
                out[att.attachment_id] = Health(GONE, f"attachment {att.attachment_id} is {a.device} now, "
                                                      f"not {att.device}")
            elif a.status != ATTACHED:
                out[att.attachment_id] = Health(BROKEN, a.error or f"nbd-pool reports attachment "
                                                                   f"{att.attachment_id} {a.status}")
            elif not Path(att.device).exists():
                out[att.attachment_id] = Health(BROKEN, f"{att.device} has disappeared")
            else:
                out[att.attachment_id] = Health(ATTACHED)
        return out

    async def release_orphans(self, keep: set[str], images: set[str], devices: set[str]) -> list[str]:
        return await self.release_unkept(lambda attachment_id, _owner: attachment_id in keep)

    async def release_unkept(self, keep: Callable[[str, str], bool]) -> list[str]:
        released = []
        for a in await self._list():
            if a.owner.startswith(OWNER_PREFIX) and not keep(a.attachment_id, a.owner):
                log.warning("releasing attachment %s (owner %s) that no mount tracks", a.attachment_id, a.owner)
                await self.detach(self._attachment(a))
                released.append(a.attachment_id)
        return released
