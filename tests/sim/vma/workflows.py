"""The two job kinds the VMA runs for the OMA — a backup (telemetry + per-disk completion) and a
replication (change ids stored through the OMA) — and the manager that starts and stops them."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, Optional

from . import faults as F
from .cbt import DiskTracker
from .inventory import FIRST_DISK_KEY, InventoryError, VirtualMachine
from .jobs import FAILED, FINALIZING, PREPARING, SNAPSHOTTING, STREAMING, SUCCEEDED, DiskJob, Job
from .nbdclient import NbdTarget, TransferError, parse_nbd_url
from .oma import OmaCallError, OmaClient
from .state import DEFAULT_OMA_URL, MAP, SCAN, SimState
from .transfer import Budget, snapshot, stream

log = logging.getLogger(__name__)


class BadRequest(Exception):
    """The start request is malformed (the VMA answers 400, plain text)."""


class Refused(Exception):
    """The VMA cannot start the job (unknown VM, bad login, targets not matching disks): 5xx, plain text."""


class LoginFailed(Refused):
    """vCenter refused the credentials given (the VMA passes vCenter's words on)."""


class AlreadyRunning(Exception):
    """A job with this id is running (409, plain text)."""


def parse_backup_targets(spec: str) -> dict[int, NbdTarget]:
    """`"2000:nbd://127.0.0.1:10100/exp,2001:nbd://..."` → {2000: target, 2001: target}."""
    targets: dict[int, NbdTarget] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, url = part.partition(":")
        if not sep or not key.strip().isdigit():
            raise BadRequest(f"bad nbd_targets entry {part!r}: want <disk key>:nbd://host:port/export")
        try:
            targets[int(key)] = parse_nbd_url(url)
        except ValueError as e:
            raise BadRequest(str(e)) from e
    if not targets:
        raise BadRequest("nbd_targets is empty")
    return targets


class JobManager:
    """Starts jobs as tasks, keeps them in the state, cancels them on shutdown."""

    def __init__(self, state: SimState) -> None:
        self._state = state
        self.oma: Optional[OmaClient] = None  # set when the app starts (it needs a client session)

    # -- starting ---------------------------------------------------------------------------------

    def _check_new(self, job_id: str) -> None:
        old = self._state.jobs.get(job_id)
        if old is not None and old.status not in (SUCCEEDED, FAILED):
            raise AlreadyRunning(f"job {job_id} is already running ({old.status})")

    def _login(self, host: Any, username: Any, password: Any) -> None:
        problem = self._state.inventory.check_host(host)
        if problem:
            raise Refused(problem)
        problem = self._state.inventory.check_credentials(username, password)
        if problem:
            raise LoginFailed(problem)

    def _find_vm(self, *refs: Optional[str]) -> VirtualMachine:
        for ref in refs:
            if ref:
                vm = self._state.inventory.find_vm(ref)
                if vm is not None:
                    return vm
        wanted = next((r for r in refs if r), "")
        raise Refused(f"failed to find VM {wanted!r}: not found in vCenter {self._state.inventory.host}")

    def start_backup(self, req: dict[str, Any]) -> Job:
        for field in ("job_id", "vm_name", "nbd_targets"):
            if not isinstance(req.get(field), str) or not req.get(field):
                raise BadRequest(f"missing or invalid field {field!r}")
        backup_type = req.get("backup_type") or "full"
        if backup_type not in ("full", "incremental"):
            raise BadRequest(f"invalid backup_type {backup_type!r}")
        job_id = req["job_id"]
        self._check_new(job_id)
        targets = parse_backup_targets(req["nbd_targets"])
        self._login(req.get("vcenter_host"), req.get("vcenter_user"), req.get("vcenter_password"))
        vm = self._find_vm(req.get("vm_path"), req["vm_name"])
        fault = self._state.faults.take_job("backup", job_id, vm.name)
        job = Job(job_id, "backup", vm.name, vm.path, fault)
        if fault is not None and fault.mode == F.REFUSE:
            job.fail(fault.message)
            self._state.jobs[job_id] = job
            return job
        # The OMA's target key is 2000 + disk INDEX (not the VMware key): CONTRACTS.md "Backups".
        indexes = sorted(k - FIRST_DISK_KEY for k in targets)
        if indexes != list(range(len(vm.disks))):
            raise Refused(
                f"NBD targets do not match the VM's disks: VM {vm.name!r} has {len(vm.disks)} disk(s), "
                f"targets were given for keys {sorted(targets)}"
            )
        for index, disk in enumerate(vm.disks):
            job.disks.append(DiskJob(index=index, key=disk.key, vmdk_path=disk.vmdk_path,
                                     source=str(self._state.source_path(vm, index)),
                                     target=targets[FIRST_DISK_KEY + index]))
        self._state.jobs[job_id] = job
        oma_url = self._state.oma_url or DEFAULT_OMA_URL
        job.task = asyncio.ensure_future(self._run_backup(job, vm, backup_type, req.get("previous_change_id"), oma_url))
        log.info("backup %s of %s started (%s, %d disks)", job_id, vm.name, backup_type, len(job.disks))
        return job

    def start_replication(self, req: dict[str, Any]) -> Job:
        job_id = req.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise BadRequest("missing or invalid field 'job_id'")
        vm_paths = req.get("vm_paths")
        if not isinstance(vm_paths, list) or not vm_paths or not all(isinstance(p, str) for p in vm_paths):
            raise BadRequest("vm_paths must be a non-empty list of VM paths")
        if len(vm_paths) != 1:
            raise BadRequest("the simulator replicates one VM per job")
        raw_targets = req.get("nbd_targets")
        if not isinstance(raw_targets, list) or not raw_targets:
            raise BadRequest("nbd_targets must be a non-empty list")
        targets: dict[int, NbdTarget] = {}
        for t in raw_targets:
            key = str(t.get("vmware_disk_key", "")) if isinstance(t, dict) else ""
            if not key.isdigit() or not isinstance(t.get("device_path"), str):
                raise BadRequest(f"bad nbd_targets entry {t!r}: want {{device_path, vmware_disk_key}}")
            try:
                targets[int(key)] = parse_nbd_url(t["device_path"])
            except ValueError as e:
                raise BadRequest(str(e)) from e
        self._check_new(job_id)
        self._login(req.get("vcenter"), req.get("username"), req.get("password"))
        vm = self._find_vm(vm_paths[0])
        keys = sorted(d.key for d in vm.disks)
        if sorted(targets) != keys:
            raise Refused(f"NBD targets do not match the VM's disks: VM {vm.name!r} has keys {keys}, "
                          f"targets were given for keys {sorted(targets)}")
        fault = self._state.faults.take_job("replication", job_id, vm.name)
        job = Job(job_id, "replication", vm.name, vm_paths[0], fault)
        if fault is not None and fault.mode == F.REFUSE:
            job.fail(fault.message)
            self._state.jobs[job_id] = job
            return job
        for index, disk in enumerate(vm.disks):
            job.disks.append(DiskJob(index=index, key=disk.key, vmdk_path=disk.vmdk_path,
                                     source=str(self._state.source_path(vm, index)), target=targets[disk.key]))
        self._state.jobs[job_id] = job
        oma_url = self._state.oma_url or req.get("oma_url") or DEFAULT_OMA_URL
        job.task = asyncio.ensure_future(self._run_replication(job, vm, oma_url))
        log.info("replication %s of %s started (%d disks)", job_id, vm.name, len(job.disks))
        return job

    async def shutdown(self) -> None:
        tasks = [j.task for j in self._state.jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- running ----------------------------------------------------------------------------------

    def _choose_base(self, job: Job, disk: DiskJob, tracker: DiskTracker, base: Optional[str]) -> None:
        """An incremental when the tracker knows the base change id, else a full copy."""
        mode = self._state.change_tracking
        disk.base_change_id = base
        disk.base_map = tracker.lookup(base) if mode == SCAN else None
        known = disk.base_map is not None if mode == SCAN else mode == MAP and tracker.knows(base)
        disk.sync_type = "incremental" if known else "full"
        if base and not known:
            log.info("%s %s %s: change id %r unknown, copying in full", job.kind, job.job_id, disk.disk_id, base)

    async def _transfer(self, job: Job, vm: VirtualMachine) -> str:
        """Snapshot and stream every disk, recording each one's new change id. Returns "ok", or
        the mode of the FAIL or DISCONNECT fault that stopped it (a FAIL has noted its error)."""
        fault = job.fault
        budget = Budget(fault.after_bytes if fault is not None and fault.mode in (F.FAIL, F.DISCONNECT) else None)
        job.set(SNAPSHOTTING, f"Creating snapshot of {vm.name}")
        names: list[Callable[[], Awaitable[str]]] = []
        for disk in job.disks:
            size = vm.disk(disk.index).capacity_bytes
            actual = os.path.getsize(disk.source)
            if actual != size:
                raise TransferError(f"source image of {disk.disk_id} has {actual} bytes, the disk {size}")
            names.append(await snapshot(disk, self._state.tracker(vm, disk.index), self._state.change_tracking))
        job.set(STREAMING, "Streaming disks")
        for disk, name in zip(job.disks, names):
            if not await stream(job, disk, budget):
                break  # the fault's byte budget ran out inside this disk
            disk.change_id = await name()
            disk.status = "completed"
            job.set()
            if fault is not None and fault.mode == F.HOLD and disk.index + 1 == fault.after_disks:
                await self._hold(job, fault)
        if fault is not None and fault.mode == F.FAIL:
            job.add_error(fault.message)
            return F.FAIL
        if fault is not None and fault.mode == F.DISCONNECT:
            # Gone silent: progress stays frozen at Streaming; nobody is told anything.
            log.info("job %s: disconnect fault after %d bytes", job.job_id, job.bytes_transferred)
            return F.DISCONNECT
        return "ok"

    async def _hold(self, job: Job, fault: F.JobFault) -> None:
        assert fault.release is not None and fault.held is not None
        log.info("job %s: hold fault after %d disk(s)", job.job_id, fault.after_disks)
        fault.held.set()
        closing = asyncio.ensure_future(self._state.closing.wait())
        released = asyncio.ensure_future(fault.release.wait())
        try:
            await asyncio.wait([closing, released], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            released.cancel()

    async def _hang(self, job: Job) -> None:
        log.info("job %s: never-complete fault, hanging in %s", job.job_id, job.status)
        await self._state.closing.wait()

    async def _run_backup(self, job: Job, vm: VirtualMachine, backup_type: str,
                          previous_change_id: Optional[str], oma_url: str) -> None:
        assert self.oma is not None
        oma = self.oma
        try:
            job.set(PREPARING, f"Preparing {backup_type} backup of {vm.name}")
            for disk in job.disks:
                tracker = self._state.tracker(vm, disk.index)
                base: Optional[str] = None
                if backup_type == "incremental":
                    # Like the real client: ask the OMA for this disk's last change id; the
                    # request's previous_change_id is a fallback when it belongs to this disk.
                    base = await oma.backup_change_id(oma_url, job.vm_name, disk.index)
                    if base is None and tracker.knows(previous_change_id):
                        base = previous_change_id
                self._choose_base(job, disk, tracker, base)
            await oma.telemetry(oma_url, "backup", job.job_id, job.telemetry_body("running"))
            pump_stop = asyncio.Event()
            pump = asyncio.ensure_future(self._telemetry_pump(job, oma_url, pump_stop))
            try:
                outcome = await self._transfer(job, vm)
            finally:
                pump_stop.set()
                await pump
            if outcome == F.FAIL:
                await oma.telemetry(oma_url, "backup", job.job_id, job.telemetry_body("failed"))
                job.fail()
                return
            if outcome == F.DISCONNECT:
                return
            job.set(FINALIZING, "Removing snapshot and reporting completion")
            if job.fault is not None and job.fault.mode == F.HANG:
                await oma.telemetry(oma_url, "backup", job.job_id, job.telemetry_body("running"))
                await self._hang(job)
                return
            await oma.telemetry(oma_url, "backup", job.job_id, job.telemetry_body("completed"))
            for disk in job.disks:
                assert disk.change_id is not None
                await oma.complete_backup(oma_url, job.job_id, disk.index, disk.change_id, disk.bytes_transferred)
            job.set(SUCCEEDED, "Backup completed")
            log.info("backup %s succeeded: %d bytes", job.job_id, job.bytes_transferred)
        except asyncio.CancelledError:
            job.fail("cancelled: the VMA is shutting down")
            raise
        except (TransferError, OmaCallError, InventoryError, OSError) as e:
            log.warning("backup %s failed: %s", job.job_id, e)
            job.add_error(str(e))
            await oma.telemetry(oma_url, "backup", job.job_id, job.telemetry_body("failed"))
            job.fail()
        except Exception as e:  # a simulator bug: still fail the job visibly
            log.exception("backup %s crashed", job.job_id)
            job.add_error(f"internal error: {e!r}")
            await oma.telemetry(oma_url, "backup", job.job_id, job.telemetry_body("failed"))
            job.fail()

    async def _telemetry_pump(self, job: Job, oma_url: str, stop: asyncio.Event) -> None:
        assert self.oma is not None
        while True:
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._state.telemetry_interval)
                return
            except asyncio.TimeoutError:
                pass
            if job.status == STREAMING:
                await self.oma.telemetry(oma_url, "backup", job.job_id, job.telemetry_body("running"))

    async def _run_replication(self, job: Job, vm: VirtualMachine, oma_url: str) -> None:
        assert self.oma is not None
        oma = self.oma
        try:
            job.set(PREPARING, f"Preparing replication of {vm.name}")
            for disk in job.disks:
                base = await oma.replication_change_id(oma_url, job.vm_path, disk.disk_id)
                self._choose_base(job, disk, self._state.tracker(vm, disk.index), base)
            outcome = await self._transfer(job, vm)
            if outcome == F.FAIL:
                job.fail()
            if outcome != "ok":
                return
            job.set(FINALIZING, "Storing change ids")
            if job.fault is not None and job.fault.mode == F.HANG:
                await self._hang(job)
                return
            for disk in job.disks:
                assert disk.change_id is not None
                await oma.store_replication_change_id(oma_url, job.job_id, disk.disk_id, disk.change_id, disk.base_change_id)
            if self._state.finalize_seconds > 0:
                job.set(operation="Removing snapshot")
                await asyncio.sleep(self._state.finalize_seconds)
            job.set(SUCCEEDED, "Replication completed")
            log.info("replication %s succeeded: %d bytes", job.job_id, job.bytes_transferred)
        except asyncio.CancelledError:
            job.fail("cancelled: the VMA is shutting down")
            raise
        except (TransferError, OmaCallError, InventoryError, OSError) as e:
            log.warning("replication %s failed: %s", job.job_id, e)
            job.fail(str(e))
        except Exception as e:
            log.exception("replication %s crashed", job.job_id)
            job.fail(f"internal error: {e!r}")
