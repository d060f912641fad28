"""Loop devices (losetup(8)) and their partitions (partx(8), BLKPG) for the local-loop attacher.

The table is read in user space by partx (libblkid) and the partitions are added with `partx --add`:
some kernels (the build machines') do not parse partition tables of loop devices themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from pathlib import Path

from oma_common import blockdev
from oma_common.blockdev import DELETED, LOSETUP, LoopError
from oma_common.command import CommandFailed, run

log = logging.getLogger(__name__)

PARTX = "partx"

__all__ = ["LoopError", "TableEntry", "add_partitions", "attach", "backing_file", "detach", "list_loops",
           "partition_devices", "read_table"]


@dataclasses.dataclass(frozen=True)
class TableEntry:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str  # GPT type GUID or MBR id ("0x83")
    name: str  # GPT partition name


async def attach(image: Path, *, resource_id: str = "") -> str:
    """Bind `image` read-only to a free loop device; return /dev/loopN."""
    return await blockdev.attach_read_only(image, timeout=60, resource_id=resource_id)


def backing_file(device: str) -> str | None:
    """The file bound to a loop device, from sysfs; None when the device is not bound."""
    back = blockdev.backing_file(device)
    return None if back is None else back.removesuffix(DELETED)


async def list_loops() -> dict[str, str]:
    """{device: backing file} of every bound loop device."""
    return {d.device: d.back_file.removesuffix(DELETED) for d in await blockdev.list_loops(timeout=60)}


async def read_table(device: str, *, resource_id: str = "") -> list[TableEntry] | None:
    """The partition table of `device` read in user space; None when it has none (a bare filesystem)."""
    res = await run([PARTX, "--pairs", "--bytes", "--output", "NR,START,SIZE,TYPE,NAME", device], timeout=60,
                    check=False, resource_id=resource_id)
    if res.returncode != 0:
        if "failed to read partition table" in res.error_text:
            return None
        raise LoopError(f"partx cannot read the table of {device}: {res.error_text}")
    out = []
    for line in res.text.splitlines():
        kv = dict(re.findall(r'(\w+)="([^"]*)"', line))
        out.append(TableEntry(int(kv["NR"]), int(kv["START"]) * 512, int(kv["SIZE"]), kv.get("TYPE", ""),
                              kv.get("NAME", "")))
    return out


def partition_devices(device: str) -> dict[int, str]:
    """{number: /dev/loopNpM} of the partitions the kernel has for `device`."""
    return {p.number: p.device for p in blockdev.kernel_partitions(device)}


async def add_partitions(device: str, numbers: list[int], *, resource_id: str = "",
                         timeout: float = 5.0) -> dict[int, str]:
    """Make the kernel expose the partitions (`partx --add`) and wait for their device nodes."""
    if numbers:
        try:
            await run([PARTX, "--add", device], timeout=60, resource_id=resource_id)
        except CommandFailed as e:
            raise LoopError(f"partx --add {device}: {e.stderr}") from e
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        have = partition_devices(device)
        missing = [n for n in numbers if n not in have or not Path(have[n]).exists()]
        if not missing:
            return {n: have[n] for n in numbers}
        if loop.time() >= deadline:
            raise LoopError(f"{device}: partitions {missing} did not appear after partx --add")
        await asyncio.sleep(0.02)


async def detach(device: str, image: str | None = None, *, resource_id: str = "", timeout: float = 5.0) -> None:
    """Remove the partitions and unbind the device (only if still bound to `image`, when given)."""
    current = backing_file(device)
    if current is None or (image is not None and current != image):
        return
    if partition_devices(device):
        res = await run([PARTX, "--delete", device], timeout=60, check=False, resource_id=resource_id)
        if partition_devices(device):
            raise LoopError(f"cannot remove the partitions of {device}: {res.error_text}")
    res = await run([LOSETUP, "--detach", device], timeout=60, check=False, resource_id=resource_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while backing_file(device) == current:
        # The kernel defers the detach while the device is open; give the last opener a moment.
        if loop.time() >= deadline:
            raise LoopError(f"{device} still bound to {current} after losetup --detach: {res.error_text}")
        await asyncio.sleep(0.02)
    log.info("%s detached", device)
