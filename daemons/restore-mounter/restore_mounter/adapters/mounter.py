"""mount(8) and umount(8), and the FUSE programs (ntfs-3g, fusefat) that mount by forking a daemon.

A FUSE program returns once its filesystem is mounted and leaves a daemon serving it; that daemon is found
in /proc by its command line (program, device, mount point) and remembered with its start time, so that a
later instance of restore-mounter signals it only after checking it is still the same process. Unmounting
a FUSE filesystem makes its daemon exit by itself; it is signalled only if it lingers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from pathlib import Path

import psutil

from oma_common import mountinfo
from oma_common.command import CommandFailed, run

log = logging.getLogger(__name__)

MOUNT = "mount"
UMOUNT = "umount"
FUSE_PROGRAMS = ("ntfs-3g", "fusefat")


class MountFailed(Exception):
    """A filesystem could not be mounted; `reason` is the program's own words."""

    def __init__(self, reason: str, *, unknown_type: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unknown_type = unknown_type  # the kernel has no driver for it (mount exit 32, "unknown filesystem")


class UnmountBusy(Exception):
    """Something still uses the filesystem (an open file, a process's cwd); nothing was unmounted."""


@dataclasses.dataclass(frozen=True)
class FuseDaemon:
    pid: int
    start_time: float
    program: str
    device: str
    mount_point: str


async def mount(device: str, mount_point: Path, fstype: str, options: list[str], *, resource_id: str = "") -> None:
    """Mount with an explicit type (never probed by mount(8)) and the given options."""
    try:
        await run([MOUNT, "-t", fstype, "-o", ",".join(options), "--", device, str(mount_point)], timeout=120,
                  resource_id=resource_id)
    except CommandFailed as e:
        unknown = "unknown filesystem type" in e.stderr
        raise MountFailed(e.stderr or str(e), unknown_type=unknown) from e
    log.info("mounted %s (%s, %s) on %s", device, fstype, ",".join(options), mount_point)


async def mount_fuse(program: str, device: str, mount_point: Path, options: list[str], *,
                     resource_id: str = "") -> FuseDaemon:
    """Run a FUSE program that daemonises; return its daemon once the mount is there."""
    try:
        await run([program, "-o", ",".join(options), device, str(mount_point)], timeout=120, detaching=True,
                  resource_id=resource_id)
    except CommandFailed as e:
        raise MountFailed(e.stderr or str(e)) from e
    daemon = find_fuse_daemon(mount_point, program, device)
    entry = mountinfo.find(mount_point)
    if daemon is None or entry is None or not entry.is_fuse:
        if entry is not None:
            await umount(mount_point, resource_id=resource_id)
        raise MountFailed(f"{program} returned but left no FUSE mount on {mount_point}")
    log.info("mounted %s with %s (pid %d) on %s", device, program, daemon.pid, mount_point)
    return daemon


async def umount(mount_point: Path, *, resource_id: str = "") -> None:
    """Unmount; already unmounted is fine; busy raises UnmountBusy (no lazy unmount: the device must be free)."""
    if mountinfo.find(mount_point) is None:
        return
    try:
        await run([UMOUNT, "--", str(mount_point)], timeout=120, resource_id=resource_id)
    except CommandFailed as e:
        if mountinfo.find(mount_point) is None:
            return
        if "busy" in e.stderr:
            raise UnmountBusy(f"{mount_point} is busy") from e
        raise
    log.info("unmounted %s", mount_point)


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # a zombie or a kernel thread
    return [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def _fuse_args(argv: list[str]) -> tuple[str, str, str] | None:
    """(program, device, mount point) if `argv` is one of our FUSE programs as mount_fuse runs them."""
    if len(argv) < 3 or os.path.basename(argv[0]) not in FUSE_PROGRAMS:
        return None
    return os.path.basename(argv[0]), argv[-2], argv[-1]


def _alive(pid: int, start_time: float | None = None) -> bool:
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False  # exited; only its parent (maybe an init that does not reap) can remove it
        return start_time is None or abs(p.create_time() - start_time) < 0.05
    except psutil.Error:
        return False


def _start_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def fuse_daemons() -> list[FuseDaemon]:
    """Every live daemon of our FUSE programs, whatever it serves."""
    out = []
    for pid in psutil.pids():
        argv = _cmdline(pid)
        args = _fuse_args(argv) if argv else None
        if args and _alive(pid):
            out.append(FuseDaemon(pid, _start_time(pid), *args))
    return out


def find_fuse_daemon(mount_point: Path, program: str, device: str) -> FuseDaemon | None:
    for d in fuse_daemons():
        if (d.program, d.device, d.mount_point) == (program, device, str(mount_point)):
            return d
    return None


def daemon_matches(d: FuseDaemon) -> bool:
    """Whether the remembered daemon is still that process (pid, start time and command line checked)."""
    argv = _cmdline(d.pid)
    return (argv is not None and _fuse_args(argv) == (d.program, d.device, d.mount_point)
            and _alive(d.pid, d.start_time))


async def stop_fuse_daemon(d: FuseDaemon, *, grace: float = 5.0, resource_id: str = "") -> None:
    """After its unmount: wait for the daemon to exit by itself, then SIGTERM, then SIGKILL (checked first)."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            if not daemon_matches(d):
                return
            log.warning("%s pid %d still running after unmount; sending %s", d.program, d.pid,
                        sig.name)
            try:
                os.kill(d.pid, sig)
            except ProcessLookupError:
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while daemon_matches(d):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.02)
        else:
            return
    if daemon_matches(d):
        raise RuntimeError(f"{d.program} pid {d.pid} survived SIGKILL")
