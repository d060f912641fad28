"""Finding and releasing what a crashed nbd-pool may have left: loop devices, qemu children, FUSE mounts.

Everything is found from the host's own records (losetup, /proc, mountinfo), scoped to a work root or a
port range so that nothing of anybody else's is touched. The daemon passes what it has adopted as `keep`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import psutil

from oma_common import mountinfo
from oma_common.blockdev import LoopDevice
from oma_common.mountinfo import MountEntry
from oma_common.process import AdoptedChild, PidMismatch, ProcessError

from . import fuse_mounts, loopdev, partx
from .attach import block_device_busy

log = logging.getLogger("nbd_pool.orphans")

PROGRAMS = ("qemu-nbd", "qemu-storage-daemon")


@dataclasses.dataclass(frozen=True)
class OrphanProcess:
    pid: int
    argv: tuple[str, ...]
    start_time: float


@dataclasses.dataclass(frozen=True)
class Orphans:
    loops: list[LoopDevice]
    processes: list[OrphanProcess]
    fuse_mounts: list[MountEntry]

    def __bool__(self) -> bool:
        return bool(self.loops or self.processes or self.fuse_mounts)


def _port_of(argv: Sequence[str]) -> int | None:
    """The --port/-p value of a qemu-nbd argv."""
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--port="):
            value = arg.split("=", 1)[1]
        elif arg in ("-p", "--port") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("-p") and len(arg) > 2 and not arg.startswith("--"):
            value = arg[2:]
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def listening_ports(proc: psutil.Process) -> set[int]:
    """The TCP ports `proc` listens on, read from its own sockets (qemu-nbd given its listener by socket
    activation names no port in its argv). Blocking: psutil reads /proc/<pid>/fd and /proc/<pid>/net."""
    # net_connections() is psutil 6's name; Debian 12 ships psutil 5.9, which only has connections().
    conns = (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr}


def references_root(argv: Sequence[str], root: Path) -> bool:
    """Whether an argument names a path under `root`, as given or with symlinks resolved."""
    prefixes = {str(r).rstrip("/") + "/" for r in (root.absolute(), root.resolve())}
    return any(p in a for p in prefixes for a in argv[1:])


#: A process is only ever ours if it shares these namespaces with us. /proc shows the processes of every
#: container below ours too: a container's qemu-nbd on "our" port number listens in another network, and
#: its argv names files of another file system; signalling it would cut that system's backups.
OWN_NAMESPACES = ("pid", "net")


def namespaces(pid: int | str) -> tuple[tuple[int, int], ...] | None:
    """The (device, inode) of `pid`'s OWN_NAMESPACES, or None if they cannot be read (gone, not ours)."""
    try:
        return tuple((st.st_dev, st.st_ino) for st in (os.stat(f"/proc/{pid}/ns/{ns}") for ns in OWN_NAMESPACES))
    except OSError:
        return None


def qemu_processes(*, root: Path | None = None, ports: Collection[int] | None = None, programs: Sequence[str] = PROGRAMS) -> list[OrphanProcess]:
    """qemu-nbd / qemu-storage-daemon processes in our own PID and network namespaces whose argv references
    `root` or (qemu-nbd) listens on one of `ports`. Blocking: psutil walks /proc; run it in an executor."""
    found = []
    own = namespaces("self")
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            argv = proc.info["cmdline"] or []
            if not argv or os.path.basename(argv[0]) not in programs:
                continue
            if namespaces(proc.info["pid"]) != own:
                continue  # a container's (or unreadable: then not one we started)
            hit = root is not None and references_root(argv, root)
            if not hit and ports is not None and os.path.basename(argv[0]) == "qemu-nbd":
                port = _port_of(argv)
                hit = (port in ports) if port is not None else bool(listening_ports(proc) & set(ports))
            if hit:
                found.append(OrphanProcess(proc.info["pid"], tuple(argv), proc.info["create_time"]))
        except psutil.Error:
            continue
    return found


async def list_orphans(
    root: Path,
    *,
    ports: Collection[int] | None = None,
    keep_pids: Collection[int] = (),
    keep_devices: Collection[str] = (),
    keep_mounts: Collection[Path] = (),
) -> Orphans:
    """Loop devices backed by files under `root`, qemu processes referencing `root` (or serving `ports`),
    and FUSE mounts under `root`, minus what the daemon keeps (adopted exports and attachments)."""
    root = root.resolve()  # the kernel reports backing files and mount points resolved
    loops = [d for d in await loopdev.loops_under(root) if d.device not in keep_devices]
    procs = await asyncio.to_thread(qemu_processes, root=root, ports=ports)
    keep_mount_set = {Path(m) for m in keep_mounts}
    mounts = [m for m in fuse_mounts.under(root) if m.mount_point not in keep_mount_set]
    return Orphans(loops, [p for p in procs if p.pid not in keep_pids], mounts)


async def release_orphans(orphans: Orphans, *, stop_timeout: float = 5.0, resource_id: str = "reconcile") -> list[str]:
    """Release in dependency order: partitions and loop devices, then processes, then leftover FUSE mounts.

    Returns one message per item that could not be released (busy, unkillable); never raises for one item.
    """
    problems: list[str] = []
    in_use: set[str] = set()  # backing files of busy loop devices: their FUSE export must stay up too
    for loop in orphans.loops:
        try:
            if await asyncio.to_thread(block_device_busy, loop.device):
                problems.append(f"{loop.device} is in use (mounted?); left alone with its FUSE export")
                in_use.add(loop.back_file.removesuffix(" (deleted)"))
                continue
            await partx.delete_partitions(loop.device, resource_id=resource_id)
            await loopdev.detach(loop.device, expect_file=loop.back_file.removesuffix(" (deleted)"), resource_id=resource_id)
        except (partx.PartxError, loopdev.LoopError, ProcessError, OSError) as exc:
            problems.append(f"{loop.device}: {exc}")
    for proc in orphans.processes:
        if any(f'"{f}"' in a or a == f for f in in_use for a in proc.argv):
            continue
        try:
            # Checked again against argv and start time just before signalling: the pid may have been reused.
            child = AdoptedChild.adopt(proc.pid, list(proc.argv), resource_id=resource_id, start_time=proc.start_time)
        except PidMismatch:
            continue  # gone already
        try:
            await child.stop(timeout=stop_timeout)
        except ProcessError as exc:
            problems.append(f"pid {proc.pid}: {exc}")
        finally:
            child.close()
    remaining = {m.mount_point for m in mountinfo.read()}
    for mount in orphans.fuse_mounts:
        if mount.mount_point not in remaining or str(mount.mount_point) in in_use:
            continue  # unmounted by its qemu-storage-daemon on SIGTERM, or still backing a busy device
        try:
            await fuse_mounts.unmount(mount.mount_point, resource_id=resource_id)
        except ProcessError as exc:
            problems.append(f"{mount.mount_point}: {exc}")
    for p in problems:
        log.warning("%s: %s", resource_id, p)
    return problems
