"""Writing one disk into its NBD target, shared by backups and replication: "snapshot" the source
(map it, work out the changed extents against the base change id) and stream it, within an
optional byte budget that a job fault sets."""

from __future__ import annotations

import asyncio
import os
from typing import Optional

from . import cbt
from .cbt import BlockMap, Extent
from .jobs import DiskJob, Job
from .nbdclient import convert_range, copy_whole, write_extents

# One qemu-io write never buffers more than this.
MAX_EXTENT = 16 * 1024 * 1024
_ALIGN = 64 * 1024


class Budget:
    """Data bytes a faulty job may still write; None means no limit."""

    def __init__(self, limit: Optional[int]) -> None:
        self.remaining = limit

    @property
    def limited(self) -> bool:
        return self.remaining is not None

    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def spend(self, count: int) -> None:
        if self.remaining is not None:
            self.remaining = max(0, self.remaining - count)


async def snapshot(disk: DiskJob, track: bool = True) -> "Optional[asyncio.Future[BlockMap]]":
    """Plan the copy of one disk. An incremental maps the source now (the extents depend on it);
    a full copy maps it in the background while streaming (the future returned), or not at all
    without `track` (None)."""
    loop = asyncio.get_running_loop()
    disk.status = "snapshotting"
    if disk.sync_type == "incremental":
        new_map = await loop.run_in_executor(None, cbt.scan, disk.source)
        disk.extents = cbt.split_extents(cbt.changed_extents(disk.base_map, new_map), MAX_EXTENT)
        disk.total_bytes = sum(e.length for e in disk.extents if not e.zero)
        future: asyncio.Future[BlockMap] = loop.create_future()
        future.set_result(new_map)
        return future
    disk.total_bytes = await loop.run_in_executor(None, cbt.allocated_bytes, disk.source)
    return loop.run_in_executor(None, cbt.scan, disk.source) if track else None


async def stream(job: Job, disk: DiskJob, budget: Budget, scratch_dir: str) -> bool:
    """Write the disk; True when all of it went, False when the budget ran out first."""
    disk.status = "streaming"
    job.set(operation=f"Copying {disk.disk_id} ({disk.sync_type}) to {disk.target.url}")
    if disk.sync_type == "incremental":
        return await _stream_extents(job, disk, budget, scratch_dir)
    return await _stream_full(job, disk, budget)


async def _stream_full(job: Job, disk: DiskJob, budget: Budget) -> bool:
    size = os.path.getsize(disk.source)
    loop = asyncio.get_running_loop()
    if budget.remaining is None or budget.remaining >= disk.total_bytes:
        total = disk.total_bytes
        await copy_whole(disk.source, disk.target, progress=lambda f: job.set_disk_bytes(disk, int(f * total)))
        disk.blocks_written += await loop.run_in_executor(None, cbt.allocated_blocks, disk.source)
        job.set_disk_bytes(disk, total)
        budget.spend(total)
        return True
    cut = await loop.run_in_executor(None, cbt.offset_after_data, disk.source, budget.remaining)
    cut = min(size, max(_ALIGN, cut - cut % _ALIGN)) if budget.remaining > 0 else 0
    if cut > 0:
        await convert_range(disk.source, disk.target, 0, cut)
        sent = await loop.run_in_executor(None, cbt.allocated_bytes, disk.source, 0, cut)
        disk.blocks_written += -(-cut // cbt.BLOCK_SIZE)
        job.set_disk_bytes(disk, sent)
    budget.spend(budget.remaining)
    return False


async def _stream_extents(job: Job, disk: DiskJob, budget: Budget, scratch_dir: str) -> bool:
    extents: list[Extent] = []
    complete = True
    remaining = budget.remaining
    for ext in disk.extents:
        if remaining is not None and not ext.zero:
            if remaining <= 0:
                complete = False
                break
            if ext.length > remaining:
                length = max(512, remaining - remaining % 512)
                extents.append(Extent(ext.offset, min(length, ext.length)))
                remaining = 0
                complete = False
                break
            remaining -= ext.length
        extents.append(ext)

    async def on_batch(data_bytes: int) -> None:
        job.add_bytes(disk, data_bytes)
        budget.spend(data_bytes)

    await write_extents(disk.source, disk.target, extents, scratch_dir=scratch_dir, on_batch=on_batch)
    disk.blocks_written += cbt.blocks_in([(e.offset, e.end) for e in extents if not e.zero])
    disk.zero_blocks_written += cbt.blocks_in([(e.offset, e.end) for e in extents if e.zero])
    job.set()
    return complete
