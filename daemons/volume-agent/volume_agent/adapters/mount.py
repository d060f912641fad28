"""mount(8) and umount(8) for network shares, the mount table (proc(5) mountinfo), and the kernel's
filesystems: argv lists only, secrets in the environment (mount.cifs(8): USER, PASSWD), never in argv.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

# The mount table is read by the shared parser; these names are this adapter's API (repositories, tests).
from oma_common.mountinfo import MountEntry
from oma_common.mountinfo import find as mounted_at
from oma_common.mountinfo import parse as parse_mountinfo
from oma_common.mountinfo import read as read_mounts
from oma_common.command import CommandFailed, CommandResult, run

log = logging.getLogger("volume_agent.mount")

FILESYSTEMS = Path("/proc/filesystems")
# The user-space helper each kind needs, and the Debian package that has it.
HELPERS = {"nfs": ("mount.nfs", "nfs-common"), "cifs": ("mount.cifs", "cifs-utils")}
# The kernel module directory that would provide the filesystem when it is not built in.
MODULE_DIRS = {"nfs": "kernel/fs/nfs", "cifs": "kernel/fs/smb/client"}


def kernel_lacks(fstype: str, filesystems: Path = FILESYSTEMS, modules: Path = Path("/lib/modules")) -> bool:
    """True when the running kernel neither has `fstype` loaded nor a module that could provide it."""
    try:
        loaded = {line.split()[-1] for line in filesystems.read_text().splitlines() if line.strip()}
    except OSError:
        return False  # cannot tell: do not claim it
    if fstype in loaded:
        return False
    module_dir = modules / os.uname().release / MODULE_DIRS.get(fstype, f"kernel/fs/{fstype}")
    return not module_dir.exists()


def helper_missing(fstype: str) -> str | None:
    """The package to install when the filesystem's mount helper is absent, else None."""
    helper, package = HELPERS.get(fstype, ("", ""))
    if not helper:
        return None
    found = shutil.which(helper) or shutil.which(helper, path="/sbin:/usr/sbin")
    return None if found else package


def mount_argv(fstype: str, source: str, mount_point: Path | str, options: Sequence[str], *,
               program: str = "mount") -> list[str]:
    """`mount --no-canonicalize -t TYPE -o OPTS -- SOURCE MOUNTPOINT`; -i is never given, so the helper
    (mount.nfs, mount.cifs) runs and does the name resolution and protocol negotiation the kernel cannot.
    The mount point is usually /proc/self/fd/N of a checked descriptor: --no-canonicalize keeps mount(8) from
    resolving it to a name again."""
    argv = [program, "--no-canonicalize", "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    return argv + ["--", source, str(mount_point)]


async def mount(argv: list[str], *, env: Mapping[str, str] | None, timeout: float,
                pass_fds: Sequence[int] = ()) -> CommandResult:
    """Run mount; CommandFailed carries its exit code and message. `env` adds to a minimal environment;
    `pass_fds` are inherited by mount and its helper (the mount point's descriptor)."""
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    return await run(argv, env={**base, **(env or {})}, timeout=timeout, logger=log, pass_fds=pass_fds)


async def umount(mount_point: Path, *, timeout: float, program: str = "umount", lazy: bool = False) -> None:
    """`lazy`: detach now and clean up once unused (umount(8) --lazy), for a mount that nothing may wait on."""
    await run([program, *(["--lazy"] if lazy else []), "--", str(mount_point)], timeout=timeout, logger=log)


__all__ = ["CommandFailed", "MountEntry", "helper_missing", "kernel_lacks", "mount", "mount_argv", "mounted_at",
           "parse_mountinfo", "read_mounts", "umount"]
