"""The kernel-nbd attach backend: `qemu-nbd --connect /dev/nbdN --read-only`, for hosts with the nbd module.

qemu-nbd daemonizes itself in --connect mode unless --verbose is given (qemu-nbd.c: it forks when a device
is given and not verbose), so --verbose keeps it in the foreground as a supervised child, its progress
lines going to our log. The device is chosen without races: a free device (no /sys/block/nbdN/pid, size 0)
is locked with flock on a per-device lock file for the time of the connect, and if another program still
wins it, qemu-nbd fails (the kernel refuses a second socket: EBUSY) and the next device is tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from oma_common.blocking import run_blocking
from oma_common.command import run
from oma_common.process import AdoptedChild, ChildFailed, ChildNotReady, PidMismatch, SupervisedChild

from . import partx
from ..images import OpenedImage
from .attach import (AttachError, AttachRecord, DetachBusy, HeldAttachment, block_device_busy, check_format,
                     partitions_from)
from .partitions import PartitionTableError, read_partition_table

log = logging.getLogger("nbd_pool.kernel_nbd")

BACKEND = "kernel-nbd"
QEMU_NBD = "qemu-nbd"
SYS_BLOCK = Path("/sys/block")
DEV = Path("/dev")
LOCK_DIR = Path("/run/lock/oma-nbd")
_NBD_NAME = re.compile(r"nbd(\d+)$")


def available(dev: Path = DEV) -> bool:
    """Whether the nbd module is loaded (its devices exist)."""
    return (dev / "nbd0").exists()


def build_connect_argv(image: Path, device: str, fmt: str, *, program: str = QEMU_NBD, source: str = "") -> list[str]:
    """`source`: the image as json: options over inherited descriptors (images.OpenedImage.image_opts), so
    that qemu-nbd opens no name of its own; without it `image` is opened by name."""
    if not image.is_absolute():
        raise ValueError(f"image path must be absolute: {image}")
    check_format(fmt)
    if not _NBD_NAME.match(Path(device).name):
        raise ValueError(f"not an nbd device: {device}")
    if source:
        return [program, f"--connect={device}", "--read-only", "--verbose", "--", source]
    return [program, f"--connect={device}", "--read-only", f"--format={fmt}", "--verbose", "--", str(image)]


def nbd_devices(sys_block: Path = SYS_BLOCK) -> list[str]:
    """nbd device names known to the kernel, in numeric order."""
    names = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sys_block.iterdir():
            m = _NBD_NAME.match(entry.name)
            if m:
                names.append((int(m.group(1)), entry.name))
    return [name for _, name in sorted(names)]


def connected_pid(name: str, sys_block: Path = SYS_BLOCK) -> int | None:
    """The pid (a thread id of the qemu-nbd) serving /dev/<name>, or None when disconnected."""
    try:
        return int((sys_block / name / "pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def device_in_use(name: str, sys_block: Path = SYS_BLOCK) -> bool:
    if connected_pid(name, sys_block) is not None:
        return True
    try:
        return int((sys_block / name / "size").read_text()) != 0
    except (FileNotFoundError, ValueError):
        return True  # unreadable: do not touch it


def free_devices(sys_block: Path = SYS_BLOCK, allowed: Sequence[str] | None = None) -> list[str]:
    names = nbd_devices(sys_block)
    if allowed is not None:
        names = [n for n in names if n in {Path(a).name for a in allowed}]
    return [n for n in names if not device_in_use(n, sys_block)]


def _served_by(pid: int, name: str, sys_block: Path) -> bool:
    # /sys/block/nbdN/pid holds the id of the qemu-nbd thread that runs NBD_DO_IT, a thread of `pid`.
    tid = connected_pid(name, sys_block)
    return tid is not None and (tid == pid or Path(f"/proc/{pid}/task/{tid}").exists())


class _DeviceLock:
    """An exclusive, non-blocking flock on LOCK_DIR/<name>.lock; conflicts across processes and fds."""

    def __init__(self, lock_dir: Path, name: str) -> None:
        self.path = lock_dir / f"{name}.lock"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class KernelNbdAttachment(HeldAttachment):
    def __init__(self, backend: KernelNbdBackend, record: AttachRecord, child: SupervisedChild | AdoptedChild | None) -> None:
        super().__init__(record, child)
        self._backend = backend

    async def detach(self) -> None:
        async with self._lock:
            await self._backend._teardown(self._record, self._child)
            self._child = None


class KernelNbdBackend:
    """Attach images read-only as /dev/nbdN through qemu-nbd --connect."""

    name = BACKEND

    def __init__(
        self,
        *,
        devices: Sequence[str] | None = None,  # restrict to these (e.g. the configured /dev/nbd0-7)
        sys_block: Path = SYS_BLOCK,
        dev: Path = DEV,
        lock_dir: Path = LOCK_DIR,
        program: str = QEMU_NBD,
        ready_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.devices = devices
        self.sys_block = sys_block
        self.dev = dev
        self.lock_dir = lock_dir
        self.program = program
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._log = logger or log

    def _connected(self, name: str) -> bool:
        try:
            return connected_pid(name, self.sys_block) is not None and int((self.sys_block / name / "size").read_text()) > 0
        except (FileNotFoundError, ValueError):
            return False

    async def _connect(self, image: Path, fmt: str, rid: str,
                       source: OpenedImage | None = None) -> tuple[str, SupervisedChild]:
        tried = []
        for name in free_devices(self.sys_block, self.devices):
            lock = _DeviceLock(self.lock_dir, name)
            # A flock taken for a caller cancelled meanwhile is dropped, or the device stays locked for good.
            if not await run_blocking(lock.try_acquire, undo=lambda _taken: lock.release()):
                continue  # another attach (here or in another process) is connecting it
            try:
                if device_in_use(name, self.sys_block):
                    continue
                device = str(self.dev / name)
                argv = build_connect_argv(image, device, fmt, program=self.program,
                                          source=source.image_opts() if source else "")
                child = SupervisedChild(argv, resource_id=rid, logger=self._log,
                                        pass_fds=source.fds if source else ())

                async def connected(name: str = name) -> bool:
                    return self._connected(name)

                try:
                    await child.start(connected, timeout=self.ready_timeout, interval=0.02)
                except ChildFailed as exc:
                    if device_in_use(name, self.sys_block):
                        tried.append(name)  # lost the race to a program that ignores our lock: next device
                        continue
                    raise AttachError(f"{rid}: qemu-nbd could not connect {image}: {exc}") from exc
                except ChildNotReady as exc:
                    raise AttachError(f"{rid}: {device} did not come up: {exc}") from exc
                return device, child
            finally:
                lock.release()
        raise AttachError(f"{rid}: no free nbd device" + (f" (lost races for {', '.join(tried)})" if tried else ""))

    async def attach(self, image: Path, workdir: Path, *, fmt: str = "qcow2", resource_id: str | None = None,
                     source: OpenedImage | None = None) -> KernelNbdAttachment:
        """`workdir` is unused: this backend needs no scratch files. With `source` (the image opened by
        descriptor) qemu-nbd is handed its descriptors."""
        rid = resource_id or f"attach {image.name}"
        image = image.absolute()
        check_format(fmt)
        device, child = await self._connect(image, fmt, rid, source)
        record = AttachRecord(BACKEND, rid, str(image), fmt, str(workdir.absolute()), device, child.identity)
        try:
            try:
                table = await run_blocking(read_partition_table, Path(device))  # teardown waits for it
            except (PartitionTableError, OSError) as exc:
                raise AttachError(f"{rid}: cannot read the partition table of {image}: {exc}") from exc
            # With max_part > 0 the kernel adds the partitions itself; partx fills in for one that does not.
            kernel = await partx.expose_partitions(device, table, resource_id=rid)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._teardown(record, child)
            raise
        record = AttachRecord(
            BACKEND, rid, str(image), fmt, str(workdir.absolute()), device, child.identity,
            partitions=tuple(partitions_from(table, kernel)),
        )  # fmt: skip
        self._log.info("%s: %s attached read-only as %s (%d partitions)", rid, image, device, len(record.partitions))
        return KernelNbdAttachment(self, record, child)

    async def resume(self, record: AttachRecord) -> KernelNbdAttachment:
        if record.backend != BACKEND:
            raise AttachError(f"{record.resource_id}: not a {BACKEND} record")
        try:
            child = AdoptedChild.adopt_identity(record.process, resource_id=record.resource_id, logger=self._log)
        except PidMismatch as exc:
            raise AttachError(str(exc)) from exc
        if not _served_by(record.process.pid, Path(record.device).name, self.sys_block):
            child.close()
            raise AttachError(f"{record.resource_id}: {record.device} is not served by pid {child.pid} any more")
        return KernelNbdAttachment(self, record, child)

    async def release(self, record: AttachRecord) -> None:
        await self._teardown(record, None)

    async def _teardown(self, record: AttachRecord, child: SupervisedChild | AdoptedChild | None) -> None:
        rid = record.resource_id
        name = Path(record.device).name
        if child is None and record.process.pid > 0:
            with contextlib.suppress(PidMismatch):
                child = AdoptedChild.adopt_identity(record.process, resource_id=rid, logger=self._log)
        if child is not None and child.pid is not None and _served_by(child.pid, name, self.sys_block):
            if await asyncio.to_thread(block_device_busy, record.device):
                raise DetachBusy(f"{rid}: {record.device} or one of its partitions is in use (mounted?)")
            try:
                await partx.delete_partitions(record.device, resource_id=rid)
            except partx.PartxError as exc:
                raise DetachBusy(f"{rid}: {exc}") from exc
            # Ask qemu-nbd to disconnect; the connected qemu-nbd then exits by itself.
            await run([self.program, "--disconnect", record.device], timeout=30, check=False, resource_id=rid)
        if child is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(child.wait(), self.stop_timeout)
            await child.stop(timeout=self.stop_timeout)
        self._log.info("%s: detached %s from %s", rid, record.image, record.device)


def connected_devices(sys_block: Path = SYS_BLOCK) -> list[tuple[str, int]]:
    """(/dev/nbdN, serving thread id) for every connected nbd device (for reconciliation)."""
    out = []
    for name in nbd_devices(sys_block):
        pid = connected_pid(name, sys_block)
        if pid is not None:
            out.append((f"/dev/{name}", pid))
    return out


async def disconnect(device: str, *, program: str = QEMU_NBD, resource_id: str = "reconcile") -> None:
    """Disconnect an nbd device whatever serves it (an orphan found at start-up)."""
    await run([program, "--disconnect", device], timeout=30, resource_id=resource_id)
