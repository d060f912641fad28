"""What the kernel says about a block device (sysfs, proc(5)): its partitions, whether it is a partition, who
holds it (device-mapper, md, bcache), and whether it or a partition of it is mounted or used as swap."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from oma_common.mountinfo import MOUNTINFO
from oma_common.mountinfo import read as read_mounts

SYS_DEV_BLOCK = Path("/sys/dev/block")
PROC_SWAPS = Path("/proc/swaps")


def rdev_of(st_rdev: int) -> str:
    return f"{os.major(st_rdev)}:{os.minor(st_rdev)}"


@dataclasses.dataclass(frozen=True)
class Usage:
    """Reasons a device must not be handed out, in words (empty: none found)."""

    partition_of: str = ""  # the disk this device is a partition of
    mounted: tuple[str, ...] = ()  # "<device> on <mount point>"
    held_by: tuple[str, ...] = ()  # "<device> by <holder>"
    swap: tuple[str, ...] = ()

    def reasons(self) -> list[str]:
        out = []
        if self.partition_of:
            out.append(f"it is a partition of {self.partition_of}")
        out += [f"{m} is mounted" for m in self.mounted]
        out += [f"{h} (this system's storage stack)" for h in self.held_by]
        out += [f"{s} is in use as swap" for s in self.swap]
        return out


def _sysfs(rdev: str, sys_dev_block: Path) -> Path | None:
    p = sys_dev_block / rdev
    return Path(os.path.realpath(p)) if p.exists() else None


def usage(device: Path, rdev: str, *, sys_dev_block: Path = SYS_DEV_BLOCK, mountinfo: Path = MOUNTINFO,
          swaps: Path = PROC_SWAPS) -> Usage:
    """How `device` (with major:minor `rdev`) and its partitions are used on this system."""
    node = _sysfs(rdev, sys_dev_block)
    partition_of = ""
    parts: dict[str, str] = {rdev: str(device)}  # major:minor → /dev name, the device and its partitions
    holders: list[str] = []
    if node is not None:
        if (node / "partition").exists():
            partition_of = f"/dev/{node.parent.name}"
        for child in node.iterdir() if node.is_dir() else []:
            if (child / "partition").exists():
                try:
                    parts[(child / "dev").read_text().strip()] = f"/dev/{child.name}"
                except OSError:
                    continue
        for name in parts.values():
            holder_dir = node / "holders" if name == str(device) else node / Path(name).name / "holders"
            try:
                holders += [f"{name} is held by {h}" for h in sorted(os.listdir(holder_dir))]
            except OSError:
                pass
    names = set(parts.values())
    mounted = tuple(f"{parts.get(m.dev) or m.source} on {m.mount_point}" for m in read_mounts(mountinfo)
                    if m.dev in parts or (m.source.startswith("/") and os.path.realpath(m.source) in names))
    try:
        swap_lines = swaps.read_text().splitlines()[1:]
    except OSError:
        swap_lines = []
    in_swap = tuple(line.split()[0] for line in swap_lines
                    if line.split() and os.path.realpath(line.split()[0]) in names)
    return Usage(partition_of, tuple(dict.fromkeys(mounted)), tuple(holders), in_swap)
