"""The fuse-loop attach backend: qemu-storage-daemon FUSE export of an image + read-only loop device + partx.

For hosts without the nbd kernel module. qemu-storage-daemon opens the image (and its backing chain)
read-only and exposes it as a raw file on a FUSE mount whose mount point must be an existing file; a
read-only loop device turns that file into a block device; partx adds its partitions, because some
kernels do not parse partition tables (reference/HOST-NOTES.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

from oma_common import blockdev, mountinfo
from oma_common.blocking import run_blocking
from oma_common.process import AdoptedChild, PidMismatch, ProcessIdentity, SupervisedChild

from ..images import OpenedImage
from . import fuse_mounts, loopdev, partx
from .attach import (AttachError, AttachRecord, DetachBusy, HeldAttachment, block_device_busy, check_format,
                     partitions_from)
from .partitions import PartitionTableError, read_partition_table

log = logging.getLogger("nbd_pool.fuse_loop")

BACKEND = "fuse-loop"
QSD = "qemu-storage-daemon"
FUSE_FILE = "disk.raw"


def build_qsd_argv(image: Path, fuse_file: Path, fmt: str, *, force_share: bool = False, program: str = QSD,
                   chain: dict[str, object] | None = None) -> list[str]:
    """qemu-storage-daemon argv exporting `image` read-only over FUSE at `fuse_file` (JSON option syntax,
    so that commas in paths need no escaping).

    `chain` is the image as qemu block options over inherited descriptors (images.OpenedImage.blockdev): then
    qemu opens no name of its own. Without it, `image` is opened by name."""
    if not image.is_absolute() or not fuse_file.is_absolute():
        raise ValueError("image and FUSE file paths must be absolute")
    check_format(fmt)
    # Reading an image that a qemu-nbd serves read-write: skip the image lock (read-only only).
    share = {"force-share": True} if force_share else {}
    if chain is not None:
        nodes = [{**chain, "node-name": "disk0"}]
    else:
        proto = {"driver": "file", "node-name": "file0", "filename": str(image), "read-only": True, **share}
        nodes = [proto, {"driver": fmt, "node-name": "disk0", "file": "file0", "read-only": True, **share}]
    export = {
        "type": "fuse",
        "id": "export0",
        "node-name": "disk0",
        "mountpoint": str(fuse_file),
        "writable": False,
        "allow-other": "off",  # only root (us, and the loop driver's kernel threads) may read the raw file
    }

    def js(obj: object) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))

    argv = [program]
    for node in nodes:
        argv += ["--blockdev", js(node)]
    return argv + ["--export", js(export)]


def _prepare_workdir(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    fuse_file = workdir / FUSE_FILE
    if fuse_file.exists() or any(workdir.iterdir()):
        raise AttachError(f"work directory {workdir} is not empty")
    fuse_file.touch(mode=0o600)  # a FUSE export mounts over an existing file
    return fuse_file


def _remove_workdir(workdir: Path, fuse_file: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fuse_file.unlink()
    with contextlib.suppress(FileNotFoundError, OSError):
        workdir.rmdir()  # only if we left nothing else; a stranger's file stays


class FuseLoopAttachment(HeldAttachment):
    def __init__(self, record: AttachRecord, child: SupervisedChild | AdoptedChild | None, logger: logging.Logger) -> None:
        super().__init__(record, child)
        self._log = logger

    async def detach(self, stop_timeout: float = 10.0) -> None:
        async with self._lock:
            await _teardown(self._record, self._child, self._log, stop_timeout=stop_timeout)
            self._child = None


async def _teardown(
    record: AttachRecord, child: SupervisedChild | AdoptedChild | None, lg: logging.Logger, *, stop_timeout: float = 10.0
) -> None:
    """Reverse of attach, each step tolerant of having been done already: partitions, loop device,
    qemu-storage-daemon, FUSE mount, work files. Refuses (DetachBusy) while the device is in use."""
    rid = record.resource_id
    fuse_file = Path(record.fuse_file)
    device = record.device
    if device and blockdev.backing_file(device) == str(fuse_file):
        if await asyncio.to_thread(block_device_busy, device):
            raise DetachBusy(f"{rid}: {device} or one of its partitions is in use (mounted?)")
        try:
            await partx.delete_partitions(device, resource_id=rid)
            await loopdev.detach(device, expect_file=str(fuse_file), resource_id=rid)
        except (partx.PartxError, loopdev.LoopError) as exc:
            raise DetachBusy(f"{rid}: {exc}") from exc
    if child is None and record.process.pid > 0:
        # Nothing supervised (release after a restart): adopt it only if the pid is still that daemon.
        with contextlib.suppress(PidMismatch):
            child = AdoptedChild.adopt_identity(record.process, resource_id=rid, logger=lg)
    if child is not None:
        await child.stop(timeout=stop_timeout)
    if mountinfo.is_mounted(fuse_file):
        # qemu-storage-daemon unmounts its export when it exits cleanly; not when it was killed.
        await fuse_mounts.unmount(fuse_file, resource_id=rid)
    await asyncio.to_thread(_remove_workdir, Path(record.workdir), fuse_file)
    lg.info("%s: detached %s", rid, record.image)


class FuseLoopBackend:
    """Attach images read-only through qemu-storage-daemon (FUSE) and a loop device."""

    name = BACKEND

    def __init__(
        self,
        *,
        program: str = QSD,
        ready_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        force_share: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self.program = program
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.force_share = force_share
        self._log = logger or log

    async def attach(self, image: Path, workdir: Path, *, fmt: str = "qcow2", resource_id: str | None = None,
                     source: OpenedImage | None = None) -> FuseLoopAttachment:
        """Attach read-only; with `source` (the image opened by descriptor) qemu is handed its descriptors."""
        rid = resource_id or f"attach {image.name}"
        image = image.absolute()
        check_format(fmt)
        # Resolved: the kernel reports loop backing files and mount points with symlinks resolved, and
        # teardown and reconciliation compare against those.
        made = await run_blocking(_prepare_workdir, workdir, undo=lambda f: _remove_workdir(f.parent, f))
        fuse_file = made.resolve()
        workdir = fuse_file.parent
        try:
            chain = None
            if source is not None:
                each: dict[str, object] = {"read-only": True, **({"force-share": True} if self.force_share else {})}
                chain = source.blockdev(each)
            argv = build_qsd_argv(image, fuse_file, fmt, force_share=self.force_share, program=self.program,
                                  chain=chain)
        except ValueError:
            await asyncio.to_thread(_remove_workdir, workdir, fuse_file)
            raise
        child = SupervisedChild(argv, resource_id=rid, logger=self._log, pass_fds=source.fds if source else ())
        device = ""
        try:

            async def mounted() -> bool:
                return mountinfo.is_mounted(fuse_file)

            await child.start(mounted, timeout=self.ready_timeout, interval=0.01)
            device = await blockdev.attach_read_only(fuse_file, resource_id=rid)
            # A loop device keeps partitions added with BLKPG after it is detached (the kernel drops them
            # only with partscan on), so a device fresh from losetup -f may show a previous user's.
            await partx.delete_partitions(device, resource_id=rid)
            try:
                table = await run_blocking(read_partition_table, Path(device))  # teardown waits for it
            except (PartitionTableError, OSError) as exc:
                raise AttachError(f"{rid}: cannot read the partition table of {image}: {exc}") from exc
            kernel = await partx.expose_partitions(device, table, resource_id=rid)
            record = AttachRecord(
                backend=BACKEND,
                resource_id=rid,
                image=str(image),
                fmt=fmt,
                workdir=str(workdir),
                device=device,
                process=child.identity,
                fuse_file=str(fuse_file),
                partitions=tuple(partitions_from(table, kernel)),
            )
        except BaseException:
            started = child.pid is not None
            ident = child.identity if started else ProcessIdentity(0, (), None)
            partial = AttachRecord(BACKEND, rid, str(image), fmt, str(workdir), device, ident, str(fuse_file))
            with contextlib.suppress(Exception):
                await _teardown(partial, child if started else None, self._log, stop_timeout=2.0)
            raise
        self._log.info(
            "%s: %s attached read-only as %s (%s, %d partitions)", rid, image, device, table.scheme, len(record.partitions)
        )
        return FuseLoopAttachment(record, child, self._log)

    async def resume(self, record: AttachRecord) -> FuseLoopAttachment:
        """Adopt an attachment made before a restart: the daemon pid, the FUSE mount and the loop device
        must all still be there and belong together."""
        if record.backend != BACKEND:
            raise AttachError(f"{record.resource_id}: not a {BACKEND} record")
        fuse_file = Path(record.fuse_file)
        if not mountinfo.is_mounted(fuse_file):
            raise AttachError(f"{record.resource_id}: FUSE export {fuse_file} is gone")
        if blockdev.backing_file(record.device) != str(fuse_file):
            raise AttachError(f"{record.resource_id}: {record.device} no longer reads {fuse_file}")
        try:
            child = AdoptedChild.adopt_identity(record.process, resource_id=record.resource_id, logger=self._log)
        except PidMismatch as exc:
            raise AttachError(str(exc)) from exc
        missing = [p.device for p in record.partitions if not Path(p.device).exists()]
        if missing:
            child.close()
            raise AttachError(f"{record.resource_id}: partitions gone: {missing}")
        return FuseLoopAttachment(record, child, self._log)

    async def release(self, record: AttachRecord) -> None:
        await _teardown(record, None, self._log, stop_timeout=self.stop_timeout)
