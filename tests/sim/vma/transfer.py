"""Writing one disk into its NBD target, shared by backups and replication: "snapshot" the source
(issue its change id, work out the changed extents since the base change id) and stream it: a full
copy with nbdcopy, an incremental's extents with the simulator's own NBD client (nbdwire.py), within
an optional byte budget that a job fault sets."""

from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable, Optional

from . import cbt
from .cbt import DiskTracker, Extent
from .jobs import DiskJob, Job
from .nbdclient import convert_range, copy_whole
from .nbdwire import write_extents
from .state import MAP, SCAN

# Connections per export, as the real VMA opens (CONTRACTS.md: the OMA exports with --shared >= 5).
CONNECTIONS = 2

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


async def snapshot(disk: DiskJob, tracker: DiskTracker, mode: str) -> Callable[[], Awaitable[str]]:
    """Plan the copy of one disk (its extents and byte total); returns what names the copy once it is
    sent: its change id. MAP issues the change id now and takes the changed areas from the tracker's
    notes (an incremental whose base no longer holds, after a write behind the tracker's back, becomes
    full); SCAN maps the whole source (an incremental now, a full copy in the background while streaming);
    OFF tracks nothing."""
    loop = asyncio.get_running_loop()
    disk.status = "snapshotting"
    if mode == MAP:
        snap = tracker.snapshot(disk.source, disk.base_change_id if disk.sync_type == "incremental" else None)
        if snap.changed is None:
            disk.sync_type = "full"
        else:
            disk.extents = cbt.split_extents(snap.changed, MAX_EXTENT)
        return await _planned(disk, lambda: snap.change_id)
    if mode == SCAN and disk.sync_type == "incremental":
        new_map = await loop.run_in_executor(None, cbt.scan, disk.source)
        disk.extents = cbt.split_extents(cbt.changed_extents(disk.base_map, new_map), MAX_EXTENT)
        return await _planned(disk, lambda: tracker.record(new_map))
    if mode == SCAN:
        mapping = loop.run_in_executor(None, cbt.scan, disk.source)

        async def recorded() -> str:
            return tracker.record(await mapping)
        await _planned(disk, tracker.untracked)
        return recorded
    return await _planned(disk, tracker.untracked)


async def _planned(disk: DiskJob, name: Callable[[], str]) -> Callable[[], Awaitable[str]]:
    if disk.sync_type == "incremental":
        disk.total_bytes = sum(e.length for e in disk.extents if not e.zero)
    else:
        disk.total_bytes = await asyncio.get_running_loop().run_in_executor(None, cbt.allocated_bytes, disk.source)

    async def named() -> str:
        return name()
    return named


async def stream(job: Job, disk: DiskJob, budget: Budget) -> bool:
    """Write the disk; True when all of it went, False when the budget ran out first."""
    disk.status = "streaming"
    job.set(operation=f"Copying {disk.disk_id} ({disk.sync_type}) to {disk.target.url}")
    if disk.sync_type == "incremental":
        return await _stream_extents(job, disk, budget)
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


async def _stream_extents(job: Job, disk: DiskJob, budget: Budget) -> bool:
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

    def on_progress(data_bytes: int) -> None:
        job.add_bytes(disk, data_bytes)
        budget.spend(data_bytes)

    written = await write_extents(disk.source, disk.target, extents, connections=CONNECTIONS,
                                  on_progress=on_progress)
    disk.blocks_written += written.data_blocks
    disk.zero_blocks_written += written.zero_blocks
    disk.total_bytes -= written.zeros_found  # they went as write-zeroes: not data after all
    job.set()
    return complete
