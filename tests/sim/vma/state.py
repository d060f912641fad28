"""Everything one simulated VMA knows: inventory, the VMs' disks as raw files, change tracking,
jobs, armed faults and a log of every request in and out."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import fnmatch
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .cbt import DiskTracker
from .faults import Faults
from .inventory import DiskRef, Inventory, InventoryError, VirtualDisk, VirtualMachine, VmRef

if TYPE_CHECKING:
    from .jobs import Job

DEFAULT_OMA_URL = "http://127.0.0.1:8082"

# Change tracking modes (SimState's `change_tracking`).
MAP = "map"  # VMware's CBT: writes are noted (write_source / changed), an incremental reads only those
SCAN = "scan"  # block maps: an incremental digests the whole source to find what changed (no notes needed)
OFF = "off"  # nothing is tracked: every copy is full


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass
class RecordedRequest:
    """A request the simulator received (what omad sent)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: str
    json: Any  # the parsed body, or None when it is not JSON
    at: float


@dataclasses.dataclass
class OutboundCall:
    """A call the simulator made to the OMA (telemetry, completion, change ids)."""

    method: str
    url: str
    json: Any
    status: Optional[int]  # None: no answer (connection error or timeout)
    response: Any  # parsed JSON, else text, else the error
    at: float


class SimState:
    """The mutable world behind one simulator; tests drive it through these methods."""

    def __init__(
        self,
        inventory: Optional[Inventory] = None,
        *,
        workdir: Union[str, Path, None] = None,
        oma_url: Optional[str] = None,
        auth_failure_status: int = 500,
        telemetry_interval: float = 1.0,
        outbound_timeout: float = 30.0,
        change_tracking: Union[bool, str] = MAP,
        callback_retry_seconds: float = 30.0,
        finalize_seconds: float = 0.0,
    ) -> None:
        self.inventory = inventory if inventory is not None else Inventory()
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="vmasim-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Where jobs call back. None: the replication request's `oma_url`, else DEFAULT_OMA_URL.
        self.oma_url = oma_url
        # What a wrong vCenter login answers: the VMA returns plain text with 500; some builds 401.
        self.auth_failure_status = auth_failure_status
        # Least seconds between two progress telemetry posts of one job (phase changes always post).
        self.telemetry_interval = telemetry_interval
        self.outbound_timeout = outbound_timeout
        # How long a replication keeps retrying a change-id call the OMA does not answer (it restarts).
        self.callback_retry_seconds = callback_retry_seconds
        # How long a replication stays Finalizing after its last change id is stored, before it says Succeeded
        # (the real VMA removes its VMware snapshot there, which takes seconds on a busy vCenter).
        self.finalize_seconds = finalize_seconds
        # How incrementals find what changed: MAP (True), like VMware's CBT, needs every write to a source
        # noted (write_source, or changed() after writing the file directly; a source changed without a
        # note is copied in full); SCAN finds the changes itself by reading the whole source; OFF (False)
        # copies every disk in full, whatever was asked.
        mode = (MAP if change_tracking else OFF) if isinstance(change_tracking, bool) else change_tracking
        if mode not in (MAP, SCAN, OFF):
            raise ValueError(f"change_tracking must be {MAP!r}, {SCAN!r} or {OFF!r}, not {change_tracking!r}")
        self.change_tracking: str = mode
        self.faults = Faults()
        self.requests: list[RecordedRequest] = []
        self.outbound: list[OutboundCall] = []
        self.jobs: dict[str, "Job"] = {}
        self.closing = asyncio.Event()
        # Requests being handled; shutdown lets them finish (an injected delay ends at `closing`).
        self.inflight: "set[asyncio.Task[Any]]" = set()
        self._sources: dict[tuple[str, int], Path] = {}
        self._trackers: dict[tuple[str, int], DiskTracker] = {}

    # -- inventory --------------------------------------------------------------------------------

    def vm(self, ref: VmRef) -> VirtualMachine:
        return self.inventory.vm(ref)

    def add_vm(self, name: str, **kwargs: Any) -> VirtualMachine:
        """Inventory.add_vm (disks=N|[bytes...], nics=M|[network...], disk_bytes=, folder=, ...)."""
        return self.inventory.add_vm(name, **kwargs)

    def remove_vm(self, ref: VmRef) -> None:
        vm = self.vm(ref)
        self.inventory.remove_vm(vm)
        for key in [k for k in self._sources if k[0] == vm.id]:
            del self._sources[key]

    def add_disk(self, vm_ref: VmRef, capacity_bytes: int, **kwargs: Any) -> VirtualDisk:
        return self.vm(vm_ref).add_disk(capacity_bytes, **kwargs)

    def resize_disk(self, vm_ref: VmRef, disk_ref: DiskRef, capacity_bytes: int) -> VirtualDisk:
        """Grow (or shrink) a disk; its source image follows."""
        if capacity_bytes <= 0 or capacity_bytes % 512:
            raise InventoryError(f"disk capacity must be a positive multiple of 512, not {capacity_bytes}")
        vm = self.vm(vm_ref)
        disk = vm.disk(disk_ref)
        disk.capacity_bytes = capacity_bytes
        path = self._sources.get((vm.id, disk.key))
        if path is not None:
            os.truncate(path, capacity_bytes)
        return disk

    def set_power_state(self, vm_ref: VmRef, power_state: str) -> None:
        if power_state not in ("poweredOn", "poweredOff", "suspended"):
            raise InventoryError(f"bad power state {power_state!r}")
        self.vm(vm_ref).power_state = power_state

    # -- the VMs' disks as raw files --------------------------------------------------------------

    def source_path(self, vm_ref: VmRef, disk_ref: DiskRef) -> Path:
        """The raw image that is this disk's content; created sparse (all zeros, the disk's
        capacity) under the workdir on first use. Write into it freely between jobs."""
        vm = self.vm(vm_ref)
        disk = vm.disk(disk_ref)
        path = self._sources.get((vm.id, disk.key))
        if path is None:
            path = self.workdir / "disks" / vm.id / f"{disk.key}.raw"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(disk.capacity_bytes)
            self._sources[(vm.id, disk.key)] = path
        return path

    def set_source(self, vm_ref: VmRef, disk_ref: DiskRef, path: Union[str, Path]) -> VirtualDisk:
        """Use a raw file of the test's as this disk's content; the disk's capacity becomes the
        file's size (it must be a multiple of 512)."""
        vm = self.vm(vm_ref)
        disk = vm.disk(disk_ref)
        size = os.path.getsize(path)
        if size <= 0 or size % 512:
            raise InventoryError(f"source {path} has size {size}, not a positive multiple of 512")
        disk.capacity_bytes = size
        self._sources[(vm.id, disk.key)] = Path(path)
        self._trackers.pop((vm.id, disk.key), None)  # other content: its change ids mean nothing
        return disk

    def write_source(self, vm_ref: VmRef, disk_ref: DiskRef, offset: int, data: bytes) -> None:
        """Write into a disk's source image and note it for change tracking (a guest write)."""
        path = self.source_path(vm_ref, disk_ref)
        tracker = self.tracker(vm_ref, disk_ref)
        tracker.check(str(path))  # a write behind our back before this one still counts as a reset
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        tracker.note(offset, len(data), str(path))

    def changed(self, vm_ref: VmRef, disk_ref: DiskRef, *extents: tuple[int, int]) -> None:
        """The caller wrote these (offset, length) ranges of the disk's source image itself: note them
        (and nothing else changed since the last note), as the VMware host tracks a guest's writes."""
        path = str(self.source_path(vm_ref, disk_ref))
        tracker = self.tracker(vm_ref, disk_ref)
        for offset, length in extents:
            tracker.note(offset, length)
        tracker.note(0, 0, path)

    def tracker(self, vm_ref: VmRef, disk_ref: DiskRef) -> DiskTracker:
        """The disk's change tracking (change ids handed out and what each one stands for)."""
        vm = self.vm(vm_ref)
        disk = vm.disk(disk_ref)
        tracker = self._trackers.get((vm.id, disk.key))
        if tracker is None:
            tracker = DiskTracker(f"{vm.id}/{disk.key}")
            self._trackers[(vm.id, disk.key)] = tracker
        return tracker

    def change_ids(self, vm_ref: VmRef, disk_ref: DiskRef) -> list[str]:
        return self.tracker(vm_ref, disk_ref).change_ids()

    # -- jobs -------------------------------------------------------------------------------------

    def job(self, job_id: str) -> "Job":
        return self.jobs[job_id]

    async def wait_job(self, job_id: str, timeout: float = 30.0, *, statuses: tuple[str, ...] = ("Succeeded", "Failed")) -> "Job":
        """Wait (bounded) until the job exists and reaches one of `statuses`; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.jobs.get(job_id)
            if job is not None and job.status in statuses:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = job.status if job is not None else "absent"
                raise asyncio.TimeoutError(f"job {job_id} is {state}, not {statuses} after {timeout}s")
            if job is None:
                await asyncio.sleep(min(0.02, remaining))
                continue
            await job.wait_change(remaining)

    # -- request log ------------------------------------------------------------------------------

    def requests_to(self, path: str, method: Optional[str] = None) -> list[RecordedRequest]:
        """Requests received whose path matches (fnmatch; without a leading "/" it is under /api/v1/)."""
        pattern = path if path.startswith("/") else "/api/v1/" + path
        return [
            r for r in self.requests
            if fnmatch.fnmatchcase(r.path, pattern) and (method is None or r.method == method.upper())
        ]

    def calls_to(self, path_suffix: str, method: Optional[str] = None) -> list[OutboundCall]:
        """Calls made to the OMA whose URL path (query removed) matches `*{path_suffix}` (fnmatch)."""
        out = []
        for c in self.outbound:
            url_path = c.url.split("?", 1)[0]
            if fnmatch.fnmatchcase(url_path, "*" + path_suffix) and (method is None or c.method == method.upper()):
                out.append(c)
        return out

    def remove_workdir(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
