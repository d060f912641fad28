"""The FUSE exports nbd-pool leaves in the mount table, and unmounting them (umount(8), lazily if need be)."""

from __future__ import annotations

import logging
from pathlib import Path

from oma_common import mountinfo
from oma_common.mountinfo import MountEntry
from oma_common.command import CommandFailed, run

log = logging.getLogger("nbd_pool.mountinfo")

UMOUNT = "umount"


def _plain_fuse(m: MountEntry) -> bool:
    # qemu-storage-daemon's FUSE exports are plain FUSE mounts; a fuseblk (ntfs-3g & co.) is never ours.
    return m.fstype == "fuse" or m.fstype.startswith("fuse.")


def under(root: Path, path: Path = mountinfo.MOUNTINFO) -> list[MountEntry]:
    """FUSE mounts at or below `root`, innermost first (the order to unmount them)."""
    return [m for m in mountinfo.under(root, path, include_root=True) if _plain_fuse(m)]


async def unmount(mount_point: Path, *, resource_id: str = "") -> None:
    """Unmount; fall back to a lazy unmount when the FUSE server is gone or the mount is busy.

    A FUSE mount whose server died answers ENOTCONN to everything but can still be unmounted; if something
    still holds it open, MNT_DETACH hides it now and the kernel frees it with the last reference.
    """
    try:
        await run([UMOUNT, "--", str(mount_point)], timeout=30, resource_id=resource_id)
    except CommandFailed as first:
        if not mountinfo.is_mounted(mount_point):
            return
        log.warning("%s: umount %s failed (%s); unmounting lazily", resource_id, mount_point, first.stderr.strip())
        await run([UMOUNT, "--lazy", "--", str(mount_point)], timeout=30, resource_id=resource_id)
    log.info("%s: unmounted %s", resource_id, mount_point)
