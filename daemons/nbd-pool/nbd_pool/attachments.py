"""Read-only attachments of images as block devices (for file restore), at most `max_attachments` at once.

Attach, detach and the orphan sweep of the work root run one at a time under one lock: an attachment being
made is never mistaken for a leftover, and the slot count is exact. Each attachment gets its own work
directory under the work root; on shutdown they are left in place and resumed by the next instance.
An attachment whose qemu process died is `broken` (with the cause) as soon as anyone asks, not only after the
periodic check: its owner (restore-mounter) asks when reads of the device fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from oma_common.blocking import run_blocking
from oma_common.errors import Conflict, Exhausted, Invalid, NotFound, TimedOut, Unavailable
from oma_common.process import ChildFailed, ChildNotReady, ProcessError, describe_exit, pid_matches
from oma_common.statefile import StateFile
from oma_common.timefmt import rfc3339

from .adapters.attach import AttachBackend, AttachError, Attachment, AttachRecord, DetachBusy
from .adapters.loopdev import LoopError
from .adapters.partx import PartxError
from .images import ImageRoots, OpenedImage
from .roots import Roots

log = logging.getLogger("nbd_pool.attachments")

ATTACHED = "attached"
BROKEN = "broken"  # its qemu process died while the device was in use; DELETE retries the teardown


@dataclasses.dataclass(frozen=True)
class AttachmentEntry:
    attachment_id: str
    owner: str
    requested_image: str
    attached_at: float
    record: AttachRecord

    def to_dict(self) -> dict[str, Any]:
        return {"attachment_id": self.attachment_id, "owner": self.owner, "requested_image": self.requested_image,
                "attached_at": self.attached_at, "record": self.record.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttachmentEntry:
        return cls(str(d["attachment_id"]), str(d["owner"]), str(d["requested_image"]), float(d["attached_at"]),
                   AttachRecord.from_dict(d["record"]))


@dataclasses.dataclass
class _Live:
    entry: AttachmentEntry
    attachment: Attachment | None  # None once broken: only the record is left to tear down
    status: str = ATTACHED
    cause: str = ""  # why it is broken

    def state(self) -> tuple[str, str]:
        """(status, cause) now. An attachment whose process has died is broken from that moment, not only
        once the periodic check has seen it: its owner asks when its reads fail (restore-mounter)."""
        if self.status == BROKEN:
            return BROKEN, self.cause
        proc = self.entry.record.process
        if pid_matches(proc.pid, proc.argv, start_time=proc.start_time):
            return ATTACHED, ""
        return BROKEN, self.death()

    def death(self) -> str:
        """The cause of a broken attachment: which process ended, and how when we reaped it."""
        r = self.entry.record
        program = os.path.basename(r.process.argv[0]) if r.process.argv else "the serving process"
        how = describe_exit(self.attachment.exit_code if self.attachment is not None else None) or "is gone"
        return f"{program} (pid {r.process.pid}) serving {r.device or r.image} {how}; the device answers I/O errors"


def _domain_error(exc: Exception, image: str) -> Exception:
    if isinstance(exc, ChildNotReady):
        return TimedOut("attach timed out", f"{image}: {exc}")
    if isinstance(exc, ChildFailed):
        return Invalid("cannot open the image", f"{image}: {exc}")
    if isinstance(exc, AttachError) and "no free nbd device" in str(exc):
        return Exhausted("no nbd device free", str(exc), available_slots=0)
    return Unavailable("cannot attach the image", f"{image}: {exc}")


class Attachments:
    def __init__(self, backend: AttachBackend, roots: Roots, store: StateFile, *, work_root: Path,
                 max_attachments: int, clock: Callable[[], float] = time.time,
                 other_backends: Mapping[str, AttachBackend] | None = None, images: ImageRoots | None = None) -> None:
        self.backend = backend
        # Records made by another backend (the configuration changed between runs) are torn down by it.
        self._backends = {**(other_backends or {}), backend.name: backend}
        self.roots = roots
        self.images = images or ImageRoots([str(r) for r in roots.configured])
        self.store = store
        self.work_root = work_root
        self.max_attachments = max_attachments
        self.clock = clock
        self.lock = asyncio.Lock()
        self._live: dict[str, _Live] = {}
        self._recorded: list[AttachmentEntry] = []

    # --- reading -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    @property
    def available_slots(self) -> int:
        return max(0, self.max_attachments - len(self._live))

    def keep(self) -> tuple[set[int], set[str], set[Path]]:
        """What the orphan sweep must leave alone: pids, devices and FUSE mount points of our attachments."""
        records = [live.entry.record for live in self._live.values()]
        return ({r.process.pid for r in records}, {r.device for r in records if r.device},
                {Path(r.fuse_file) for r in records if r.fuse_file})

    def workdirs(self) -> list[str]:
        return [live.entry.record.workdir for live in self._live.values()]

    def _describe(self, live: _Live) -> dict[str, Any]:
        e, r = live.entry, live.entry.record
        status, cause = live.state()
        return {"attachment_id": e.attachment_id, "owner": e.owner, "image": e.requested_image,
                "resolved_image": r.image, "format": r.fmt, "backend": r.backend, "device": r.device,
                "partitions": [p.to_dict() for p in r.partitions], "attached_at": rfc3339(e.attached_at, timespec="seconds"),
                "status": status, "pid": r.process.pid, "error": cause or None}

    def listing(self) -> dict[str, Any]:
        return {"attachments": [self._describe(live) for live in self._live.values()],
                "max_attachments": self.max_attachments, "available_slots": self.available_slots,
                "backend": self.backend.name}

    # --- attach and detach -------------------------------------------------------------------------------

    async def attach(self, image: str, owner: str, fmt: str = "qcow2") -> dict[str, Any]:
        """Attach `image` (with its backing chain) read-only; Exhausted with `available_slots` when full."""
        if not owner.strip():
            raise Invalid("owner required", "say who owns the attachment (e.g. restore-mounter:<mount id>)")
        # Opened by descriptor, each layer beneath its root, and handed to qemu that way (images.py).
        opened = await run_blocking(self.images.open_file, image, fmt, writable=False, undo=OpenedImage.close)
        try:
            return await self._attach(opened, image, owner, fmt)
        finally:
            opened.close()

    async def _attach(self, opened: OpenedImage, image: str, owner: str, fmt: str) -> dict[str, Any]:
        async with self.lock:
            if self.available_slots == 0:
                raise Exhausted("no attach slot free",
                                f"all {self.max_attachments} attachments are in use; detach one first",
                                available_slots=0, max_attachments=self.max_attachments)
            aid = f"att-{secrets.token_hex(6)}"
            try:
                att = await self.backend.attach(opened.path, self.work_root / aid, fmt=fmt, resource_id=aid,
                                                source=opened)
            except (AttachError, ProcessError, PartxError, LoopError, OSError) as exc:
                log.warning("%s: attaching %s failed: %s", aid, image, exc)
                raise _domain_error(exc, image) from exc
            live = _Live(AttachmentEntry(aid, owner, image, self.clock(), att.record), att)
            self._live[aid] = live
            try:
                await self._save()
            except BaseException:
                del self._live[aid]
                await att.detach()
                raise
        log.info("%s: %s attached for %s as %s", aid, image, owner, att.device)
        return self._describe(live)

    async def detach(self, attachment_id: str) -> None:
        async with self.lock:
            live = self._live.get(attachment_id)
            if live is None:
                raise NotFound("attachment not found", f"no attachment {attachment_id}")
            try:
                if live.attachment is not None:
                    await live.attachment.detach()
                else:
                    await self._backend_for(live.entry.record).release(live.entry.record)
            except DetachBusy as exc:
                raise Conflict("attachment in use", f"{attachment_id}: {exc}; unmount its partitions first") from exc
            except (AttachError, ProcessError, PartxError, LoopError, OSError) as exc:
                raise Unavailable("detach failed", f"{attachment_id}: {exc}") from exc
            del self._live[attachment_id]
            await self._save()
        log.info("%s: detached (owner %s)", attachment_id, live.entry.owner)

    def _backend_for(self, record: AttachRecord) -> AttachBackend:
        backend = self._backends.get(record.backend)
        if backend is None:
            raise AttachError(f"{record.resource_id}: no {record.backend} backend to release it with")
        return backend

    # --- supervision -------------------------------------------------------------------------------------

    async def check(self) -> list[str]:
        """Tear down attachments whose qemu process died; keep them as broken while still in use.

        The caller holds `lock`. Returns the ids dropped.
        """
        dropped = []
        for aid, live in list(self._live.items()):
            status, cause = live.state()
            if status == ATTACHED:
                continue
            if live.status == ATTACHED:
                log.warning("%s: %s; tearing the attachment down", aid, cause)
                live.cause = cause
            try:
                await self._backend_for(live.entry.record).release(live.entry.record)
            except DetachBusy:
                if live.status != BROKEN:
                    log.warning("%s: device still in use; kept as broken until its owner detaches it", aid)
                live.status, live.attachment = BROKEN, None
                continue
            except (AttachError, ProcessError, PartxError, LoopError, OSError) as exc:
                log.warning("%s: teardown failed (%s); kept as broken", aid, exc)
                live.status, live.attachment = BROKEN, None
                continue
            del self._live[aid]
            dropped.append(aid)
        if dropped:
            await self._save()
        return dropped

    # --- persistence, resumption, release ----------------------------------------------------------------

    def load(self) -> None:
        self._recorded = [AttachmentEntry.from_dict(d) for d in self.store.load()]
        log.info("%d attachment records loaded", len(self._recorded))

    async def _save(self) -> None:
        await self.store.save(lambda: [live.entry.to_dict() for live in self._live.values()])

    async def resume_recorded(self) -> dict[str, int]:
        """Start-up: resume each recorded attachment that is intact; tear the others down."""
        counts = {"resumed": 0, "released": 0, "broken": 0}
        for entry in self._recorded:
            rec = entry.record
            if rec.backend != self.backend.name:
                log.warning("%s: made by the %s backend, %s is configured now; releasing it", entry.attachment_id,
                            rec.backend, self.backend.name)
                cause = f"made by the {rec.backend} backend, {self.backend.name} is configured now"
            else:
                try:
                    att = await self.backend.resume(rec)
                except AttachError as exc:
                    log.warning("%s: cannot be resumed (%s); releasing it", entry.attachment_id, exc)
                    cause = f"not intact when nbd-pool restarted: {exc}"
                else:
                    self._live[entry.attachment_id] = _Live(entry, att)
                    counts["resumed"] += 1
                    continue
            live = _Live(entry, None, BROKEN, cause)
            self._live[entry.attachment_id] = live
            counts["broken"] += 1
        self._recorded = []
        dropped = await self.check()
        counts["released"] = len(dropped)
        counts["broken"] -= len(dropped)
        await self._save()
        return counts

    async def forget_all(self) -> int:
        """Daemon shutdown: leave every attachment in place, keep its record."""
        await self._save()
        for live in self._live.values():
            if live.attachment is not None:
                live.attachment.forget()
        n = len(self._live)
        self._live.clear()
        return n
