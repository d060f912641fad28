"""Loop devices through losetup(8) and sysfs, and the partitions the kernel has for a disk (sysfs)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

from .command import run

log = logging.getLogger("oma.blockdev")

LOSETUP = "losetup"
SYS_CLASS_BLOCK = Path("/sys/class/block")
DELETED = " (deleted)"  # what the kernel appends to the backing file of a loop device once it is unlinked


class LoopError(Exception):
    """A loop device or its partitions could not be set up or torn down."""


@dataclasses.dataclass(frozen=True)
class LoopDevice:
    device: str  # /dev/loopN
    back_file: str  # as the kernel reports it; a deleted file ends in " (deleted)"
    read_only: bool
    autoclear: bool  # set by a detach that the kernel deferred because the device is still open

    @property
    def name(self) -> str:
        return Path(self.device).name

    def backed_under(self, root: Path) -> bool:
        back = self.back_file.removesuffix(DELETED)
        return bool(back) and Path(back).is_relative_to(root)


@dataclasses.dataclass(frozen=True)
class KernelPartition:
    number: int
    device: str  # /dev/loop0p1
    start: int  # bytes
    size: int  # bytes


def _flag(value: Any) -> bool:
    # losetup's JSON writes booleans in recent util-linux and "0"/"1" strings in older ones.
    if isinstance(value, str):
        return value.strip() in ("1", "true")
    return bool(value)


def parse_losetup_json(text: str) -> list[LoopDevice]:
    if not text.strip():
        return []  # losetup prints nothing at all when no device is bound
    data = json.loads(text)
    return [
        LoopDevice(d["name"], d.get("back-file") or "", _flag(d.get("ro")), _flag(d.get("autoclear")))
        for d in data.get("loopdevices", [])
    ]


async def list_loops(*, timeout: float = 30.0) -> list[LoopDevice]:
    """Every bound loop device with its backing file."""
    res = await run([LOSETUP, "--list", "--json", "--output", "NAME,BACK-FILE,RO,AUTOCLEAR"], timeout=timeout)
    return parse_losetup_json(res.text)


async def attach_read_only(file: Path, *, timeout: float = 30.0, resource_id: str = "") -> str:
    """Bind `file` to a free loop device, read-only; return /dev/loopN. losetup -f retries its own races."""
    res = await run([LOSETUP, "--read-only", "--show", "--find", "--", str(file)], timeout=timeout,
                    resource_id=resource_id)
    device = res.text.strip()
    if not re.fullmatch(r"/dev/loop\d+", device):
        raise LoopError(f"losetup printed {device!r} for {file}")
    log.info("%s%s attached read-only to %s", f"{resource_id}: " if resource_id else "", file, device)
    return device


def backing_file(device: str, sys_class_block: Path = SYS_CLASS_BLOCK) -> str | None:
    """The backing file of a loop device as the kernel reports it (sysfs: cheap, non-blocking); None if unbound."""
    try:
        return (sys_class_block / Path(device).name / "loop" / "backing_file").read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def kernel_partitions(disk: str, sys_class_block: Path = SYS_CLASS_BLOCK) -> list[KernelPartition]:
    """The partitions the kernel has for `disk`, from sysfs (start and size are in 512-byte units there)."""
    out = []
    try:
        children = list((sys_class_block / Path(disk).name).iterdir())
    except FileNotFoundError:
        return []
    for child in children:
        try:
            number = int((child / "partition").read_text())
            start = int((child / "start").read_text()) * 512
            size = int((child / "size").read_text()) * 512
        except (OSError, ValueError):
            continue  # not a partition (queue/, holders/, size, ...), or one removed meanwhile
        out.append(KernelPartition(number, f"/dev/{child.name}", start, size))
    return sorted(out, key=lambda p: p.number)
