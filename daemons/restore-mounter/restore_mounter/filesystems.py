"""Which filesystems are mounted and how: read-only, never replaying a journal, never trusting the guest.

Every mount is `ro,nosuid,nodev,noexec`. Journals are not replayed: replay writes, and a crash-consistent
backup usually has a dirty journal, so what is shown is the on-disk state at snapshot time.
  ext2/3/4  ext4 driver, `noload` (ext4(5): "Don't load the journal on mounting")
  xfs       `norecovery` (xfs(5): requires ro)
  btrfs     `rescue=nologreplay` (btrfs(5): do not replay the log tree; requires ro)
  ntfs      ntfs-3g -o ro (FUSE); a hibernated or dirty NTFS mounts read-only all the same
  vfat      the kernel driver where it exists, else fusefat -o ro (FUSE) — `fat_driver`
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .adapters import blkid, mounter
from .adapters.mounter import FuseDaemon, MountFailed

log = logging.getLogger(__name__)

SAFE = ("ro", "nosuid", "nodev", "noexec")
FAT_DRIVERS = ("auto", "kernel", "fusefat")
MBR_EXTENDED = {"0x5", "0x05", "0xf", "0x0f", "0x85"}

_KERNEL: dict[str, tuple[str, tuple[str, ...]]] = {
    "ext2": ("ext4", ("noload",)),
    "ext3": ("ext4", ("noload",)),
    "ext4": ("ext4", ("noload",)),
    "xfs": ("xfs", ("norecovery",)),
    "btrfs": ("btrfs", ("rescue=nologreplay",)),
}
_NOT_MOUNTED = {
    "swap": "swap space, not a filesystem",
    "LVM2_member": "LVM physical volume: logical volumes are not mounted",
    "crypto_LUKS": "encrypted (LUKS) volume",
    "BitLocker": "encrypted (BitLocker) volume",
    "linux_raid_member": "software RAID member",
    "zfs_member": "ZFS pool member",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    driver: str  # "kernel", "ntfs-3g" or "fusefat"
    fstype: str  # what `mount -t` gets (kernel driver only)
    options: tuple[str, ...]


def plans_for(probe: blkid.Probe, fat_driver: str = "auto") -> list[Plan] | str:
    """The ways to mount what `probe` found, best first; or why it is not mounted."""
    t = probe.type
    if t in _KERNEL:
        fstype, extra = _KERNEL[t]
        return [Plan("kernel", fstype, (*SAFE, *extra))]
    if t == "ntfs":
        return [Plan("ntfs-3g", "ntfs", SAFE)]
    if t == "vfat":
        kernel = Plan("kernel", "vfat", (*SAFE, "shortname=mixed", "utf8"))
        fuse = Plan("fusefat", "vfat", SAFE)
        return {"kernel": [kernel], "fusefat": [fuse]}.get(fat_driver, [kernel, fuse])
    if t in _NOT_MOUNTED:
        return _NOT_MOUNTED[t]
    if t:
        return f"filesystem type {t} is not supported"
    if probe.pttype:
        return f"holds a nested partition table ({probe.pttype})"
    return "no filesystem recognised"


@dataclasses.dataclass
class Mounted:
    driver: str
    fstype: str
    fuse: FuseDaemon | None


async def mount_one(device: str, mount_point: Path, plans: list[Plan], *, resource_id: str = "") -> Mounted:
    """Mount with the first plan that works; a kernel without the driver falls through to the next plan."""
    last: MountFailed | None = None
    for plan in plans:
        try:
            if plan.driver == "kernel":
                await mounter.mount(device, mount_point, plan.fstype, list(plan.options), resource_id=resource_id)
                return Mounted("kernel", plan.fstype, None)
            daemon = await mounter.mount_fuse(plan.driver, device, mount_point, list(plan.options),
                                              resource_id=resource_id)
            return Mounted(plan.driver, plan.fstype, daemon)
        except MountFailed as e:
            last = e
            if not e.unknown_type:
                break
            log.info("%s: no kernel driver for %s; trying the next way", resource_id, plan.fstype)
    assert last is not None
    raise last


async def unmount_one(mount_point: Path, fuse: FuseDaemon | None, *, resource_id: str = "") -> None:
    """Unmount (UnmountBusy if in use) and, for FUSE, see its daemon gone."""
    await mounter.umount(mount_point, resource_id=resource_id)
    if fuse is not None:
        await mounter.stop_fuse_daemon(fuse, resource_id=resource_id)
