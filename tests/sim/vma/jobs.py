"""A backup or replication job as the VMA tracks it, and the two views of it: the progress body
(`GET /api/v1/progress/{job_id}`) and the backup client's telemetry body."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Optional

from .cbt import BlockMap, Extent
from .faults import JobFault
from .nbdclient import NbdTarget
from .state import now_rfc3339

# The VMA's capitalised job statuses (CONTRACTS.md).
QUEUED = "Queued"
PREPARING = "Preparing"
SNAPSHOTTING = "Snapshotting"
STREAMING = "Streaming"
FINALIZING = "Finalizing"
SUCCEEDED = "Succeeded"
FAILED = "Failed"

# Telemetry phases per status.
_PHASES = {
    QUEUED: "queued",
    PREPARING: "preparing",
    SNAPSHOTTING: "snapshot",
    STREAMING: "transferring",
    FINALIZING: "finalizing",
    SUCCEEDED: "completed",
    FAILED: "failed",
}

MB = 1000 * 1000


@dataclasses.dataclass
class DiskJob:
    """One disk of a job: where it comes from, where it goes, what is sent."""

    index: int
    key: int
    vmdk_path: str
    source: str
    target: NbdTarget
    sync_type: str = "full"  # full | incremental
    base_change_id: Optional[str] = None
    base_map: Optional[BlockMap] = None  # the SCAN mode's map behind base_change_id
    extents: list[Extent] = dataclasses.field(default_factory=list)  # incremental only
    total_bytes: int = 0  # data bytes this copy sends (allocated bytes for a full copy)
    bytes_transferred: int = 0
    status: str = "pending"  # pending | snapshotting | streaming | completed | failed
    change_id: Optional[str] = None
    # 64 KiB blocks (cbt.BLOCK_SIZE) sent with data, and sent as write-zeroes: what tests check an
    # incremental against (only the changed blocks). A full copy counts every allocated block as data.
    blocks_written: int = 0
    zero_blocks_written: int = 0

    @property
    def disk_id(self) -> str:
        return f"disk-{self.key}"

    def percent(self) -> float:
        if self.total_bytes <= 0:
            return 100.0 if self.status == "completed" else 0.0
        return round(min(100.0, 100.0 * self.bytes_transferred / self.total_bytes), 2)


class Job:
    """A running or finished job; every change wakes waiters (tests, never the VMA's own logic)."""

    def __init__(self, job_id: str, kind: str, vm_name: str, vm_path: str, fault: Optional[JobFault]) -> None:
        self.job_id = job_id
        self.kind = kind  # backup | replication
        self.vm_name = vm_name
        self.vm_path = vm_path
        self.fault = fault
        self.disks: list[DiskJob] = []
        self.status = QUEUED
        self.current_operation = "Queued"
        self.errors: list[dict[str, str]] = []
        self.started_at = now_rfc3339()
        self.last_update = self.started_at
        self._t0 = time.monotonic()
        self._rate_t = self._t0
        self._rate_bytes = 0
        self.current_mbps = 0.0
        self.peak_mbps = 0.0
        self.task: Optional["asyncio.Task[None]"] = None
        self._changed = asyncio.Event()
        self._ended: Optional[float] = None  # when it reached Succeeded or Failed (elapsed stops there)
        # (status, seconds since the start) at each status change: where a job's time went.
        self.timeline: list[tuple[str, float]] = [(QUEUED, 0.0)]

    # -- state changes ----------------------------------------------------------------------------

    def set(self, status: Optional[str] = None, operation: Optional[str] = None) -> None:
        if status is not None and status != self.status:
            self.timeline.append((status, time.monotonic() - self._t0))
            if status in (SUCCEEDED, FAILED):
                self._ended = time.monotonic()
        if status is not None:
            self.status = status
        if operation is not None:
            self.current_operation = operation
        self._touch()

    def add_error(self, message: str) -> None:
        """Note an error (shown in progress and telemetry) without ending the job yet."""
        self.errors.append({"message": message, "timestamp": now_rfc3339()})
        for disk in self.disks:
            if disk.status != "completed":
                disk.status = "failed"
        self._touch()

    def fail(self, message: Optional[str] = None) -> None:
        """End the job as Failed (with `message`, or the last error noted)."""
        if message is not None:
            self.add_error(message)
        self.set(FAILED, f"Failed: {self.last_error}")

    def add_bytes(self, disk: DiskJob, count: int) -> None:
        disk.bytes_transferred += count
        self._touch()

    def set_disk_bytes(self, disk: DiskJob, count: int) -> None:
        disk.bytes_transferred = max(disk.bytes_transferred, count)
        self._touch()

    def _touch(self) -> None:
        now = time.monotonic()
        done = self.bytes_transferred
        if now - self._rate_t >= 0.25 or self.status in (SUCCEEDED, FAILED):
            dt = max(now - self._rate_t, 1e-6)
            self.current_mbps = round((done - self._rate_bytes) / dt / MB, 3)
            self.peak_mbps = max(self.peak_mbps, self.current_mbps)
            self._rate_t, self._rate_bytes = now, done
        self.last_update = now_rfc3339()
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # -- figures ----------------------------------------------------------------------------------

    @property
    def sync_type(self) -> str:
        return "incremental" if self.disks and all(d.sync_type == "incremental" for d in self.disks) else "full"

    @property
    def bytes_transferred(self) -> int:
        return sum(d.bytes_transferred for d in self.disks)

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.disks)

    def percent(self) -> float:
        if self.status == SUCCEEDED:
            return 100.0
        total = self.total_bytes
        if total <= 0:
            return 0.0
        return round(min(100.0, 100.0 * self.bytes_transferred / total), 2)

    def elapsed(self) -> float:
        return (self._ended if self._ended is not None else time.monotonic()) - self._t0

    def average_bps(self) -> float:
        return self.bytes_transferred / max(self.elapsed(), 1e-6)

    def eta_seconds(self) -> int:
        if self.status in (SUCCEEDED, FAILED):
            return 0
        rate = self.average_bps()
        remaining = max(0, self.total_bytes - self.bytes_transferred)
        return int(remaining / rate) if rate > 0 else 0

    @property
    def last_error(self) -> Optional[str]:
        return self.errors[-1]["message"] if self.errors else None

    # -- views ------------------------------------------------------------------------------------

    def progress_body(self) -> dict[str, Any]:
        """The VMA's `GET /api/v1/progress/{job_id}` body; throughput in MB/s (10^6 bytes)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "sync_type": self.sync_type,
            "phase": _PHASES[self.status],
            "percentage": self.percent(),
            "current_operation": self.current_operation,
            "bytes_transferred": self.bytes_transferred,
            "total_bytes": self.total_bytes,
            "throughput": {
                "current_mbps": self.current_mbps,
                "average_mbps": round(self.average_bps() / MB, 3),
                "peak_mbps": self.peak_mbps,
                "last_update": self.last_update,
            },
            "timing": {
                "start_time": self.started_at,
                "last_update": self.last_update,
                "elapsed_ms": int(self.elapsed() * 1000),
                "eta_seconds": self.eta_seconds(),
            },
            "disk_progresses": [
                {
                    "disk_id": d.disk_id,
                    "disk_key": d.key,
                    "disk_index": d.index,
                    "vmdk_path": d.vmdk_path,
                    "sync_type": d.sync_type,
                    "status": d.status,
                    "percentage": d.percent(),
                    "bytes_transferred": d.bytes_transferred,
                    "total_bytes": d.total_bytes,
                    "change_id": d.change_id,
                    "blocks_written": d.blocks_written,
                    "zero_blocks_written": d.zero_blocks_written,
                }
                for d in self.disks
            ],
            "errors": list(self.errors),
            "last_error": self.last_error,
        }

    def telemetry_body(self, status: str) -> dict[str, Any]:
        """The backup client's telemetry (`status`: running | completed | failed)."""
        body: dict[str, Any] = {
            "job_id": self.job_id,
            "job_type": self.kind,
            "status": status,
            # The final posts name the outcome even though the job is still finalizing.
            "current_phase": status if status in ("completed", "failed") else _PHASES[self.status],
            "bytes_transferred": self.bytes_transferred,
            "total_bytes": self.total_bytes,
            "transfer_speed_bps": int(self.average_bps()),
            "eta_seconds": self.eta_seconds(),
            "progress_percent": self.percent(),
            "disks": [
                {
                    "disk_index": d.index,
                    "bytes_transferred": d.bytes_transferred,
                    "total_bytes": d.total_bytes,
                    "status": d.status,
                    "progress_percent": d.percent(),
                }
                for d in self.disks
            ],
            "timestamp": now_rfc3339(),
        }
        if status == "failed" and self.errors:
            body["error"] = {"message": self.errors[-1]["message"], "code": "TRANSFER_FAILED"}
        return body
