"""Reconciliation at start-up (before READY) and periodically: adopt what is still ours, release leftovers,
free leases nobody uses.

Start-up: recorded exports still alive and still leased are adopted, the others stopped after their
cmdline is checked; recorded attachments still intact are resumed, the others torn down; then whatever is
left under the work root (loop devices, FUSE exports, qemu-storage-daemons), any qemu-nbd on a pool port,
and any connected nbd device that no attachment accounts for, is released; finally expired leases are
renewed or reclaimed (jobs.py) and leases outside the configured range with nothing on them are freed.
Periodically the same runs, except that qemu-nbd processes on pool ports are left alone: while we run, only
a crash between spawn and record makes an orphan there, and that is what start-up is for; a qemu-nbd that
someone else started on a pool port just makes that port "foreign".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from pathlib import Path

from oma_common import mountinfo

from .adapters import kernel_nbd
from .adapters.fuse_loop import FUSE_FILE
from .adapters.orphans import list_orphans, release_orphans
from .attachments import Attachments
from .exports import Exports
from .jobs import Jobs
from .pool import Pool

log = logging.getLogger("nbd_pool.reconcile")


class Reconciler:
    def __init__(self, pool: Pool, exports: Exports, attachments: Attachments, jobs: Jobs, *, work_root: Path,
                 nbd_devices: Collection[str] | None = None, qemu_nbd: str = "qemu-nbd") -> None:
        self.pool = pool
        self.exports = exports
        self.attachments = attachments
        self.jobs = jobs
        self.work_root = work_root
        self.nbd_devices = set(nbd_devices) if nbd_devices is not None else None
        self.qemu_nbd = qemu_nbd

    async def startup(self) -> str:
        """Everything before READY; returns a one-line summary for the STATUS of the service."""
        self.work_root.mkdir(parents=True, exist_ok=True)
        ex = await self.exports.adopt_recorded()
        async with self.attachments.lock:
            at = await self.attachments.resume_recorded()
            problems, released = await self._sweep_orphans(ports=range(self.pool.port_min, self.pool.port_max + 1))
        outside = [lease.port for lease in self.pool.leases()
                   if not self.pool.in_range(lease.port) and self.exports.on_port(lease.port) is None]
        if outside:
            log.warning("ports %s are outside the configured range %d-%d and serve nothing; freed", outside,
                        self.pool.port_min, self.pool.port_max)
            await self.pool.release(ports=outside)
        sweep = await self.jobs.sweep_expired()
        summary = (f"{len(self.pool.leases())} leases, {ex['adopted']} exports adopted ({ex['stopped']} stopped, "
                   f"{ex['gone']} gone), {at['resumed']} attachments resumed ({at['released']} released), "
                   f"{released} leftovers released, {len(sweep['reclaimed'])} expired leases reclaimed")
        if problems:
            summary += f"; {len(problems)} leftovers could not be released (see the log)"
        log.info("reconciled: %s", summary)
        return summary

    async def periodic(self) -> None:
        """One pass of the periodic check."""
        await self.exports.refresh()
        async with self.attachments.lock:
            await self.attachments.check()
            await self._sweep_orphans(ports=None)
        await self.jobs.sweep_expired()

    def _remove_stale_workdirs(self, keep: set[str]) -> int:
        """Work directories no attachment owns, once nothing is mounted in them: at most an empty FUSE mount
        point file is left there (blocking: a few stat calls, run in a thread)."""
        removed = 0
        mounted = {str(m.mount_point) for m in mountinfo.read()}
        for d in sorted(self.work_root.resolve().iterdir()) if self.work_root.is_dir() else []:
            if d.name in keep or not d.is_dir() or d.is_symlink():
                continue
            files = list(d.iterdir())
            if any(str(f) in mounted or f.is_dir() or f.is_symlink() or f.name != FUSE_FILE or f.stat().st_size
                   for f in files):
                log.warning("%s is no attachment's, but not empty; left alone", d)
                continue
            for f in files:
                f.unlink()
            d.rmdir()
            log.info("removed stale work directory %s", d)
            removed += 1
        return removed

    async def _sweep_orphans(self, *, ports: Collection[int] | None) -> tuple[list[str], int]:
        """Release what nobody accounts for. The caller holds the attachments' lock (no attach half-made)."""
        pids, devices, mounts = self.attachments.keep()
        found = await list_orphans(self.work_root, ports=ports, keep_pids=pids | self.exports.pids(),
                                   keep_devices=devices, keep_mounts=mounts)
        problems: list[str] = []
        released = 0
        if found:
            log.warning("leftovers: loop devices %s, processes %s, FUSE mounts %s",
                        [lo.device for lo in found.loops], [p.pid for p in found.processes],
                        [str(m.mount_point) for m in found.fuse_mounts])
            problems = await release_orphans(found, resource_id="reconcile")
            released = len(found.loops) + len(found.processes) + len(found.fuse_mounts) - len(problems)
        released += await asyncio.to_thread(self._remove_stale_workdirs, {Path(r).name for r in self.attachments.workdirs()})
        for device, _tid in kernel_nbd.connected_devices():
            if device in devices or (self.nbd_devices is not None and device not in self.nbd_devices):
                continue
            log.warning("%s is connected but no attachment accounts for it; disconnecting", device)
            try:
                await kernel_nbd.disconnect(device, program=self.qemu_nbd)
                released += 1
            except Exception as exc:  # one device must not stop the rest of the sweep
                problems.append(f"{device}: {exc}")
                log.warning("cannot disconnect %s: %s", device, exc)
        return problems, released
