"""Loop devices (losetup(8)) and their partitions (partx(8), BLKPG) for the local-loop attacher.

The table is read in user space by partx (libblkid) and the partitions are added with `partx --add`:
some kernels (the build machines') do not parse partition tables of loop devices themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from pathlib import Path

from oma_common.process import CommandFailed, run

log = logging.getLogger(__name__)

LOSETUP = "losetup"
PARTX = "partx"
SYS_BLOCK = Path("/sys/class/block")


class LoopError(Exception):
    """A loop device or its partitions could not be set up or torn down."""


@dataclasses.dataclass(frozen=True)
class TableEntry:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str  # GPT type GUID or MBR id ("0x83")
    name: str  # GPT partition name


async def attach(image: Path, *, resource_id: str = "") -> str:
    """Bind `image` read-only to a free loop device; return /dev/loopN."""
    res = await run([LOSETUP, "--read-only", "--show", "--find", "--", str(image)], timeout=60,
                    resource_id=resource_id)
    device = res.text.strip()
    if not re.fullmatch(r"/dev/loop\d+", device):
        raise LoopError(f"losetup printed {device!r} for {image}")
    log.info("%s attached read-only to %s", image, device)
    return device


def backing_file(device: str) -> str | None:
    """The file bound to a loop device, from sysfs; None when the device is not bound."""
    try:
        text = (SYS_BLOCK / Path(device).name / "loop" / "backing_file").read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text.removesuffix(" (deleted)")


async def list_loops() -> dict[str, str]:
    """{device: backing file} of every bound loop device."""
    res = await run([LOSETUP, "--list", "--json", "--output", "NAME,BACK-FILE"], timeout=60)
    if not res.text.strip():
        return {}  # losetup prints nothing when no device is bound
    devices = json.loads(res.text).get("loopdevices", [])
    return {d["name"]: (d.get("back-file") or "").removesuffix(" (deleted)") for d in devices}


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
    base = Path(device).name
    out = {}
    try:
        children = list((SYS_BLOCK / base).iterdir())
    except FileNotFoundError:
        return {}
    for child in children:
        try:
            out[int((child / "partition").read_text())] = f"/dev/{child.name}"
        except (OSError, ValueError):
            continue
    return out


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
