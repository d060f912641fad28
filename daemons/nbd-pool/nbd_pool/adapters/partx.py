"""Partition devices through partx(8) (BLKPG) and sysfs, checked against the table read in user space."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from oma_common.blockdev import SYS_CLASS_BLOCK, KernelPartition, kernel_partitions
from oma_common.command import run

from .partitions import PartitionTable

log = logging.getLogger("nbd_pool.partx")

PARTX = "partx"


class PartxError(Exception):
    """Partitions could not be added or removed, or the kernel's view differs from the table."""


def partition_name(disk: str, number: int) -> str:
    """Kernel naming: a disk name ending in a digit gets a 'p' (loop0p1, nbd0p1), others not (sda1)."""
    base = Path(disk).name
    return f"{base}p{number}" if base[-1:].isdigit() else f"{base}{number}"


async def delete_partitions(disk: str, *, resource_id: str = "", sys_class_block: Path = SYS_CLASS_BLOCK) -> None:
    """Remove every partition of `disk` from the kernel; EBUSY (a partition is mounted) raises PartxError."""
    for part in kernel_partitions(disk, sys_class_block):
        res = await run([PARTX, "--delete", "--nr", str(part.number), disk], timeout=30, check=False, resource_id=resource_id)
        if res.returncode != 0:
            raise PartxError(f"cannot remove {part.device}: {res.stderr.decode('utf-8', 'replace').strip()}")
    left = kernel_partitions(disk, sys_class_block)
    if left:
        raise PartxError(f"{disk}: partitions still present after partx --delete: {[p.device for p in left]}")


async def expose_partitions(
    disk: str,
    table: PartitionTable,
    *,
    resource_id: str = "",
    timeout: float = 5.0,
    sys_class_block: Path = SYS_CLASS_BLOCK,
    dev_root: Path = Path("/dev"),
) -> list[KernelPartition]:
    """Make the kernel expose every partition of `table` on `disk` and check it agrees with our reading.

    Partitions the kernel already has (a kernel that parses tables, e.g. nbd with max_part) are kept; the
    missing ones are added one by one with `partx --add --nr N`.
    """
    have = {p.number for p in kernel_partitions(disk, sys_class_block)}
    for entry in table.partitions:
        if entry.number in have:
            continue
        res = await run([PARTX, "--add", "--nr", str(entry.number), disk], timeout=30, check=False, resource_id=resource_id)
        # A kernel that scans tables itself may have added it meanwhile (partx then fails with EBUSY):
        # whether it exists is checked below, so only log here.
        if res.returncode != 0:
            log.info("%s: partx --add --nr %d %s: %s", resource_id, entry.number, disk, res.stderr.decode("utf-8", "replace").strip())
    parts = {p.number: p for p in kernel_partitions(disk, sys_class_block)}
    for entry in table.partitions:
        got = parts.get(entry.number)
        if got is None:
            raise PartxError(f"{disk}: partition {entry.number} missing after partx --add")
        if (got.start, got.size) != (entry.start, entry.size):
            raise PartxError(
                f"{disk}: kernel has partition {entry.number} at {got.start}+{got.size}, "
                f"the table says {entry.start}+{entry.size}"
            )
    # devtmpfs creates the nodes with the devices; udev (on the appliance) may lag a little behind.
    wanted = [parts[e.number] for e in table.partitions]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while missing := [p.device for p in wanted if not (dev_root / Path(p.device).name).exists()]:
        if loop.time() >= deadline:
            raise PartxError(f"{disk}: device nodes did not appear: {missing}")
        await asyncio.sleep(0.02)
    if wanted:
        log.info("%s: %s partitions %s", resource_id, disk, " ".join(p.device for p in wanted))
    return wanted
