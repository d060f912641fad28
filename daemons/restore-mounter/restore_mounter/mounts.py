"""Restore mounts: attach an image, mount what it holds read-only, hold it while in use, take it all down.

Concurrency policy: one lock per mount serialises its unmount; a mount being created or removed answers
409 to everything but status reads.
Broken mounts: a mount whose attachment's process (or a FUSE filesystem daemon) died is marked `broken` with
the cause as soon as that is known — nbd-pool is asked when a read fails the way a dead device fails (EIO,
ENOTCONN, ...), before a download or archive sends its first byte, when the mounts or the health are read,
and on every sweep — and from then on answers 503 `mount_broken` naming the cause, until DELETE removes it. Unmounting a mount that a download or archive holds is refused (409)
unless forced, which cancels the holders first. Slots: every mount, whatever its state, holds one of
`max_mounts` slots (it holds a device); none left → 409 `exhausted` with `available_slots`.
Every step is recorded in the state file before the resource it names exists, so that a crash at any point
leaves a record that reconciliation can act on.
Stopping (`stop`): mounts that are made stay (they outlive a restart and are re-adopted); a mount still being
made is undone and answers 503 `shutting_down`, and its attach is not waited out (see `stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oma_common import beneath, errors, logs
from oma_common.blocking import run_to_end
from oma_common.contracts.restore_mounter import MOUNT_ID

from . import filesystems
from .adapters import blkid, mounter
from .attach import ATTACHED, Attacher, Attachment, owner_of
from .confine import Confined, Resolver
from .expiry import Clock, IdlePolicy
from .records import BROKEN, ERROR, MOUNTED, MOUNTING, UNMOUNTING, FsRecord, MountRecord
from .state import MountsFile

log = logging.getLogger(__name__)

# What reading a mount gives when what serves it is dead: the loop or nbd device (EIO, ENXIO, ENODEV), a
# FUSE daemon (ENOTCONN), an NBD connection (ESHUTDOWN).
DEVICE_ERRNOS = frozenset({errno.EIO, errno.ENOTCONN, errno.ENXIO, errno.ENODEV, errno.ESHUTDOWN})


def device_failure(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it was raised from, is an I/O error of the kind a dead device gives."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DEVICE_ERRNOS:
            return True
        exc = exc.__cause__
    return False


class MountBroken(errors.Unavailable):
    """What serves the mount has died (`cause`); every read would fail. Unmount it and mount the image again."""

    code = "mount_broken"


class ShuttingDown(errors.Unavailable):
    """restore-mounter is stopping: a mount not made yet was undone (nothing of it is left). Mount again once it is
    back."""

    code = "shutting_down"


class NoFilesystem(errors.Invalid):
    """Nothing on the image could be mounted; `filesystems` says what was found and why."""

    code = "no_filesystem"


class Busy(errors.Conflict):
    """The mount is in use (a download or archive holds it, or something keeps a filesystem busy)."""

    code = "busy"


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Mount:
    """A mount's record plus what lives only in memory: activity, holders, the confined filesystem roots."""

    def __init__(self, record: MountRecord, now: float, resolver: Resolver) -> None:
        self.record = record
        self.last_activity = now
        self.holders: dict[object, asyncio.Task[Any] | None] = {}
        self.lock = asyncio.Lock()
        self.resolver = resolver
        self.roots: dict[str, Confined] = {}  # "part1" → its filesystem

    @property
    def mount_id(self) -> str:
        return self.record.mount_id

    @property
    def in_use(self) -> bool:
        return bool(self.holders)

    def open_roots(self) -> None:
        """Remember each mounted filesystem's root and device number (a vanished mount is then noticed)."""
        self.roots = {}
        for fs in self.record.mounted_filesystems:
            dev = os.stat(fs.mount_point).st_dev
            self.roots[fs.dirname] = Confined(fs.mount_point, dev, self.resolver)

    @property
    def single(self) -> Confined | None:
        """With one filesystem, the browse root is that filesystem; with several, it lists them."""
        return next(iter(self.roots.values())) if len(self.roots) == 1 else None

    def browse_path(self, fs: FsRecord) -> str | None:
        if not fs.mounted:
            return None
        return "/" if len(self.record.mounted_filesystems) == 1 else f"/{fs.dirname}"


class MountManager:
    def __init__(self, *, attacher: Attacher, state: MountsFile, mount_root: Path, max_mounts: int,
                 policy: IdlePolicy, clock: Clock, resolver: Resolver, fat_driver: str = "auto",
                 image_roots: list[str] | None = None) -> None:
        self.attacher = attacher
        self.state = state
        self.mount_root = mount_root
        self.max_mounts = max_mounts
        self.policy = policy
        self.clock = clock
        self.resolver = resolver
        self.fat_driver = fat_driver
        self.image_roots = beneath.RootPaths(image_roots or [])  # a root may be a link (one root made)
        self.mounts: dict[str, Mount] = {}
        self.stopping = False  # set by stop(): no mount is made any more
        self._making: dict[str, asyncio.Task[Any]] = {}  # the task making each mount, for stop() to wait on
        self._attaching: dict[str, asyncio.Future[Attachment]] = {}  # nbd-pool's attach in flight, by mount id

    # --- queries (none of them counts as activity) ---------------------------------------------------

    def get(self, mount_id: str) -> Mount:
        m = self.mounts.get(mount_id)
        if m is None:
            raise errors.NotFound("mount not found", f"no restore mount {mount_id!r}")
        return m

    def all(self) -> list[Mount]:
        return sorted(self.mounts.values(), key=lambda m: (m.record.created_at, m.mount_id))

    @property
    def available_slots(self) -> int:
        return max(0, self.max_mounts - len(self.mounts))

    def describe(self, m: Mount) -> dict[str, Any]:
        r = m.record
        mounted = r.mounted_filesystems
        return {
            "mount_id": r.mount_id, "image": r.image, "mount_path": r.mount_path, "status": r.status,
            "device": r.attachment.device if r.attachment else None,
            "backend": r.attachment.backend if r.attachment else None,
            "attachment_id": r.attachment.attachment_id if r.attachment else None,
            "filesystem_type": mounted[0].type if mounted else None,
            "created_at": rfc3339(r.created_at),
            "last_activity_at": rfc3339(self.clock.time() - (self.clock.monotonic() - m.last_activity)),
            "expires_at": rfc3339(self.policy.expires_at(m)) if r.status in (MOUNTED, BROKEN) else None,
            "idle_timeout_seconds": self.policy.idle_timeout,
            "in_use": m.in_use, "active_operations": len(m.holders),
            "error": r.error or None,
            "filesystems": [{"partition": f.partition, "device": f.device, "type": f.type or None,
                             "label": f.label, "size": f.size, "mounted": f.mounted, "driver": f.driver or None,
                             "path": m.browse_path(f), "reason": f.reason or None} for f in r.filesystems],
        }

    def expired(self) -> list[Mount]:
        """Mounts idle for the idle timeout; a broken one too (nobody can use it, so it ends like an unused one)."""
        return [m for m in self.mounts.values() if m.record.status in (MOUNTED, BROKEN) and self.policy.expired(m)]

    def broken(self) -> list[dict[str, str]]:
        return [{"mount_id": m.mount_id, "error": m.record.error} for m in self.all() if m.record.status == BROKEN]

    def resources(self) -> dict[str, Any]:
        devices = [{"mount_id": m.mount_id, "device": m.record.attachment.device,
                    "backend": m.record.attachment.backend,
                    "partitions": [p.device for p in m.record.attachment.partitions]}
                   for m in self.all() if m.record.attachment]
        return {"active_mounts": sum(m.record.status == MOUNTED for m in self.mounts.values()),
                "slots_in_use": len(self.mounts), "max_mounts": self.max_mounts,
                "available_slots": self.available_slots, "allocated_devices": devices,
                "device_utilization": round(100.0 * len(self.mounts) / self.max_mounts, 1),
                "attach_backend": self.attacher.name}

    # --- use: activity and inhibitors -------------------------------------------------------------

    def touch(self, m: Mount) -> None:
        m.last_activity = self.clock.monotonic()

    @contextlib.asynccontextmanager
    async def use(self, mount_id: str, *, check: bool = False) -> AsyncIterator[Mount]:
        """Hold the mount for one operation: it counts as activity and blocks expiry and unmounting.

        A broken mount answers MountBroken (503). With `check`, whether its attachment is alive is asked first
        (a download's headers promise bytes: the answer must not turn out truncated when that could be known).
        An error of the kind a dead device gives is checked the same way, and becomes MountBroken if it is."""
        m = self.get(mount_id)
        if check:
            await self.verify([m])
        if m.record.status == BROKEN:
            raise self.broken_error(m)
        if m.record.status != MOUNTED:
            raise errors.Conflict("mount not available", f"mount {mount_id} is {m.record.status}")
        token = object()
        m.holders[token] = asyncio.current_task()
        self.touch(m)
        try:
            yield m
        except Exception as e:
            if device_failure(e):
                await self.verify([m])
                if m.record.status == BROKEN:
                    raise self.broken_error(m) from e
            raise
        finally:
            del m.holders[token]
            self.touch(m)

    # --- broken mounts ----------------------------------------------------------------------------

    @staticmethod
    def broken_error(m: Mount) -> MountBroken:
        return MountBroken("mount broken", f"restore mount {m.mount_id} is broken: {m.record.error}. Unmount it and "
                                           "mount the image again", mount_id=m.mount_id, cause=m.record.error)

    async def verify(self, mounts: Iterable[Mount] | None = None) -> list[Mount]:
        """Whether what serves each mounted mount is alive: its attachment (nbd-pool asked once for all) and
        its FUSE daemons (/proc). The dead are marked broken with the cause; returns those. nbd-pool not
        answering proves nothing: the mounts stay as they are and the next pass asks again."""
        todo = [m for m in (self.all() if mounts is None else mounts)
                if m.record.status == MOUNTED and m.record.attachment is not None]
        if not todo:
            return []
        causes: dict[str, str] = {}
        for m in todo:
            for fs in m.record.mounted_filesystems:
                if fs.fuse is not None and not mounter.daemon_matches(fs.fuse):
                    causes[m.mount_id] = (f"{fs.fuse.program} (pid {fs.fuse.pid}) serving the filesystem of "
                                          f"partition {fs.partition} is gone")
        try:
            health = await self.attacher.health([m.record.attachment for m in todo if m.record.attachment])
        except errors.OmaError as e:
            log.warning("cannot ask %s whether the attachments are alive: %s", self.attacher.name, e)
            health = {}
        for m in todo:
            h = health.get(m.record.attachment.attachment_id) if m.record.attachment else None
            if h is not None and h.state != ATTACHED:
                causes[m.mount_id] = h.cause  # the device's death explains a FUSE daemon's too
        found = []
        for m in todo:
            cause = causes.get(m.mount_id)
            # Still the same mount, still mounted: an unmount may have begun while nbd-pool answered.
            if cause and m.record.status == MOUNTED and self.mounts.get(m.mount_id) is m:
                m.record.status, m.record.error = BROKEN, cause
                log.warning("broken: %s; it answers 503 until unmounted", cause, extra=logs.tag(m.mount_id))
                found.append(m)
        if found:
            await self.save()
        return found

    # --- mount ------------------------------------------------------------------------------------

    def _check_image(self, image: str) -> str:
        """The image's real path. We run as root and omad does not: with image roots configured, nothing
        outside them is looked at (the answer would tell whether it exists, what it is, where a link leads)."""
        if not os.path.isabs(image):
            raise errors.Invalid("invalid image", "the image path must be absolute")
        if self.image_roots and not self.image_roots.written_inside(image):
            raise self._outside(image)
        real = os.path.realpath(image)
        if self.image_roots and not self.image_roots.really_inside(real):
            raise self._outside(image)
        try:
            st = os.stat(real)
        except OSError as e:
            raise errors.NotFound("image not found", f"{image}: {e.strerror}") from e
        if not stat.S_ISREG(st.st_mode):
            raise errors.Invalid("invalid image", f"{image} is not a regular file")
        return real

    def _outside(self, image: str) -> errors.Forbidden:
        return errors.Forbidden("image outside the repositories",
                                f"{image} is not under {', '.join(map(str, self.image_roots.resolved))}")

    async def save(self) -> None:
        await self.state.save([m.record for m in self.all()])

    async def mount(self, image: str, mount_id: str | None = None) -> tuple[Mount, bool]:
        """Attach and mount `image`; returns (mount, created). The same id and image again returns the
        existing mount (a retried call); the same id with another image is a conflict."""
        if mount_id is not None and not MOUNT_ID.fullmatch(mount_id):
            raise errors.Invalid("invalid mount id", f"a mount id matches {MOUNT_ID.pattern}")
        real = self._check_image(image)
        if mount_id in self.mounts:
            m = self.mounts[mount_id]
            if m.record.image == real and m.record.status == MOUNTED:
                return m, False
            raise errors.Conflict("mount id in use", f"mount {mount_id} exists ({m.record.status}, "
                                                     f"{m.record.image})")
        if self.stopping:
            raise ShuttingDown("shutting down", "restore-mounter is stopping; mount again once it is back",
                               mount_id=mount_id)
        if self.available_slots == 0:
            raise errors.Exhausted("no restore slot free", f"all {self.max_mounts} restore mounts are in use",
                                   available_slots=0, max_mounts=self.max_mounts)
        mount_id = mount_id or f"mnt-{uuid.uuid4().hex[:12]}"
        record = MountRecord(mount_id, real, str(self.mount_root / mount_id), MOUNTING, self.clock.time())
        m = Mount(record, self.clock.monotonic(), self.resolver)
        self.mounts[mount_id] = m
        task = asyncio.current_task()
        if task is not None:
            self._making[mount_id] = task
        try:
            await self._make(m)
        finally:
            self._making.pop(mount_id, None)
        return m, True

    async def _make(self, m: Mount) -> None:
        record = m.record
        with logs.resource(m.mount_id):
            try:
                await self.save()
                await self._bring_up(m)
            except BaseException as e:
                log.warning("mounting %s failed (%s); undoing", record.image, e)
                try:
                    await self.tear_down(m)
                except Exception:
                    log.exception("undoing the failed mount left something behind; the next start-up "
                                  "reconciliation removes it")
                    record.status, record.error = ERROR, f"failed mount not fully undone: {e}"
                    await self.save()
                    raise
                del self.mounts[m.mount_id]
                await self.save()
                raise
            record.status = MOUNTED
            self.touch(m)
            await self.save()
            log.info("mounted %s: %s", record.image,
                     ", ".join(f"{f.dirname} {f.type}" for f in record.mounted_filesystems))

    def _check_stopping(self, m: Mount) -> None:
        """Between the steps of a mount: once the daemon stops, a mount not made yet is undone."""
        if self.stopping:
            raise ShuttingDown("shutting down", f"restore-mounter is stopping: mount {m.mount_id} was undone before "
                                                "it was complete; mount again once it is back", mount_id=m.mount_id)

    async def _bring_up(self, m: Mount) -> None:
        r = m.record
        self._check_stopping(m)
        os.mkdir(r.mount_path, 0o700)
        att = await self._attach(r)
        await self.save()
        self._check_stopping(m)  # answered while stopping: detached at once by the undo
        if att.partitions:
            candidates = [(p.number, p.device, p.size, p.type) for p in att.partitions]
        else:
            candidates = [(0, att.device, blkid.device_size(att.device), "")]
        for number, device, size, ptype in candidates:
            self._check_stopping(m)
            fs = FsRecord(number, device, "", "", size)
            r.filesystems.append(fs)
            if ptype.lower() in filesystems.MBR_EXTENDED:
                fs.reason = "extended partition (holds the logical partitions listed after it)"
                continue
            await self._mount_fs(m, fs)
        if not r.mounted_filesystems:
            found = [{"partition": f.partition, "type": f.type or None, "reason": f.reason}
                     for f in r.filesystems]
            raise NoFilesystem("no filesystem to mount",
                               "; ".join(f"partition {f['partition']}: {f['reason']}" for f in found) or
                               "the image holds nothing", filesystems=found)
        m.open_roots()

    async def _attach(self, r: MountRecord) -> Attachment:
        """Attach the image and record the attachment, so that undoing a mount that fails later detaches it.

        nbd-pool goes on attaching after we hang up (cancelled: the client went), so a cancelled mount still
        waits for the answer (within the request's timeout) and records it for the teardown that follows. Not
        when the daemon stops: `stop` gives the answer a grace, then hangs up. Without an answer (timed out,
        connection lost, given up) whatever nbd-pool holds for this mount (its owner tag) is released now; one
        it finishes later goes at the next sweep (`release_strays`) or start-up.
        """
        owner = owner_of(r.mount_id)

        def record(att: Attachment) -> None:
            r.attachment = att

        request = asyncio.ensure_future(self.attacher.attach(r.image, owner))
        self._attaching[r.mount_id] = request
        try:
            att = await run_to_end(request, undo=record)
        except BaseException:
            if r.attachment is None:
                await self._release_owned(owner)
            task = asyncio.current_task()
            if request.cancelled() and self.stopping and (task is None or not task.cancelling()):
                raise ShuttingDown("shutting down", f"restore-mounter is stopping: the attach of mount {r.mount_id} "
                                                    "was given up; mount again once it is back",
                                   mount_id=r.mount_id) from None
            raise
        finally:
            del self._attaching[r.mount_id]
        record(att)
        return att

    async def _release_owned(self, owner: str) -> None:
        try:
            released = await self.attacher.release_unkept(lambda _aid, o: o != owner)
        except errors.OmaError as e:
            log.warning("cannot release what %s may hold for this mount (%s); the next sweep does",
                        self.attacher.name, e)
            return
        if released:
            log.info("released %s, made for this mount without an answer", ", ".join(released))

    async def _mount_fs(self, m: Mount, fs: FsRecord) -> None:
        try:
            probe = await blkid.probe(fs.device, resource_id=m.mount_id)
        except Exception as e:
            fs.reason = f"cannot probe: {e}"
            return
        fs.type, fs.label = probe.type, probe.label
        plans = filesystems.plans_for(probe, self.fat_driver)
        if isinstance(plans, str):
            fs.reason = plans
            return
        point = Path(m.record.mount_path) / fs.dirname
        os.mkdir(point, 0o700)
        fs.mount_point = str(point)
        await self.save()  # recorded before the mount exists
        try:
            done = await filesystems.mount_one(fs.device, point, plans, resource_id=m.mount_id)
        except mounter.MountFailed as e:
            fs.reason = f"mount failed: {e.reason}"
            os.rmdir(point)
            fs.mount_point = ""
            return
        fs.mounted, fs.driver, fs.fuse = True, done.driver, done.fuse
        await self.save()

    # --- stop -------------------------------------------------------------------------------------

    async def stop(self, grace: float, call_timeout: float = 5.0) -> None:
        """The daemon is stopping: no mount is made any more (503 shutting_down), and those being made are
        undone, each answering the same. Mounts already made are left as they are (they outlive the restart).

        An attach in flight is given `grace` seconds to be answered, so that what nbd-pool made is detached at
        once; then the request is given up (we hang up: nbd-pool ends the attach, or finishes it and the
        attachment, tagged with the mount's owner, is released by the next start-up or sweep). Waiting for the
        answer instead kept the stop up to the client's timeout (120 s), past systemd's TimeoutStopSec. From now
        on no call to nbd-pool waits longer than `call_timeout`: what one leaves is recorded for the next start.
        Returns once the mounts being made have ended (their answers written), or after a bound.
        """
        self.stopping = True
        self.attacher.hurry(call_timeout)
        making = [t for t in self._making.values() if t is not asyncio.current_task()]
        if not making:
            return
        log.info("stopping: %d mount(s) being made; waiting up to %g s for nbd-pool to answer their attach",
                 len(making), grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (pending := [f for f in self._attaching.values() if not f.done()]) and loop.time() < deadline:
            await asyncio.wait(pending, timeout=deadline - loop.time())
        for mount_id, request in self._attaching.items():
            if not request.done():
                log.warning("stopping: attach not answered within %g s, given up; what nbd-pool makes of it is "
                            "released by its owner tag", grace, extra=logs.tag(mount_id))
                request.cancel()
        bound = 3 * call_timeout  # the undo: a release by owner tag, a detach, unmounts
        _done, left = await asyncio.wait(making, timeout=bound)
        if left:
            log.warning("stopping: %d mount(s) still being undone after %g s; the next start-up removes what they "
                        "leave", len(left), bound)

    # --- unmount ----------------------------------------------------------------------------------

    async def tear_down(self, m: Mount) -> None:
        """Unmount every filesystem, detach, remove the directories. Idempotent; Busy if something is
        still in use (what could be undone is undone, and the record says what is left)."""
        r = m.record
        busy = []
        for fs in r.filesystems:
            if not fs.mount_point:
                continue
            point = Path(fs.mount_point)
            try:
                await filesystems.unmount_one(point, fs.fuse, resource_id=r.mount_id)
            except mounter.UnmountBusy as e:
                busy.append(str(e))
                continue
            fs.mounted, fs.fuse = False, None
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(point)
            fs.mount_point = ""
        m.roots = {}
        if busy:
            await self.save()
            raise Busy("filesystem busy", "; ".join(busy))
        if r.attachment is not None:
            await self.attacher.detach(r.attachment)
            r.attachment = None
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(r.mount_path)

    async def unmount(self, mount_id: str, *, force: bool = False, why: str = "requested") -> None:
        m = self.get(mount_id)
        with logs.resource(mount_id):
            async with m.lock:
                if self.mounts.get(mount_id) is not m:
                    raise errors.NotFound("mount not found", f"mount {mount_id} was removed meanwhile")
                if m.record.status == MOUNTING:
                    raise errors.Conflict("mount in progress", f"mount {mount_id} is still being mounted")
                if m.in_use and not force:
                    await self._settle(m)
                if m.in_use and not force:
                    raise Busy("mount in use", f"{len(m.holders)} download(s) or archive(s) are running on "
                                               f"{mount_id}; retry later or force", active_operations=len(m.holders))
                m.record.status, m.record.error = UNMOUNTING, ""
                await self.save()
                forced = m.in_use
                if forced:
                    await self._cancel_holders(m)
                try:
                    await self._tear_down(m, patience=2.0 if forced else 0.0)
                except Exception as e:
                    m.record.status, m.record.error = ERROR, str(getattr(e, "details", e))
                    await self.save()
                    log.warning("unmount (%s) failed: %s", why, e)
                    raise
                del self.mounts[mount_id]
                await self.save()
                log.info("unmounted and detached (%s)", why)

    async def _tear_down(self, m: Mount, patience: float) -> None:
        """tear_down, retried while busy for `patience` seconds: a caller handed a file by a holder we just
        cancelled closes that descriptor on its own time (it notices the holder's connection ending)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            try:
                await self.tear_down(m)
                return
            except Busy:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _settle(self, m: Mount, grace: float = 1.0) -> None:
        """Give holders that are ending a moment: a caller that was handed a file closes its connection
        after its own client has the last byte, so an unmount right after a download may arrive first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while m.holders and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def _cancel_holders(self, m: Mount, timeout: float = 10.0) -> None:
        tasks = [t for t in m.holders.values() if t is not None and t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while m.holders and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if m.holders:
            raise Busy("mount in use", f"{len(m.holders)} operation(s) did not stop within {timeout:g} s")

    async def sweep(self) -> int:
        """Notice broken mounts; unmount what has expired, and retry mounts whose teardown failed; returns how
        many went."""
        await self.verify()
        removed = 0
        for m in self.expired() + [m for m in self.all() if m.record.status == ERROR]:
            if m.mount_id not in self.mounts:
                continue
            try:
                await self.unmount(m.mount_id, why="retry" if m.record.status == ERROR else "idle expiry")
                removed += 1
            except errors.OmaError as e:
                log.warning("%s: not removed: %s", m.mount_id, e, extra=logs.tag(m.mount_id))
        try:
            await self.release_strays()
        except errors.OmaError as e:
            log.warning("cannot release stray attachments: %s", e)
        return removed

    async def release_strays(self) -> list[str]:
        """Detach our attachments that no mount holds: made by nbd-pool after their mount stopped waiting (an
        attach timed out), or left by a detach that was interrupted. An attach still in flight (a mount being
        made that has no attachment yet, with that owner) is left alone."""

        def kept(attachment_id: str, owner: str) -> bool:
            return any(m.record.attachment.attachment_id == attachment_id if m.record.attachment is not None else
                       m.record.status == MOUNTING and owner == owner_of(m.mount_id) for m in self.mounts.values())

        return await self.attacher.release_unkept(kept)
