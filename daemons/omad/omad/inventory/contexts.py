"""VM contexts: one per protected VM, with its disks (once per disk id) and NICs, its groups and its jobs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import unicodedata
from datetime import datetime, timezone
from typing import Any

from ..store import contexts as store
from ..store.contexts import Context, ContextKey, ContextJob, DiskSpecs, Nic, NewContext, Specs
from ..store.db import Database, Tx, utcnow
from .rendered import KeptList, Listing
from .vmspec import DiskSpec, VmSpec, disk_changes, nic_changes

log = logging.getLogger(__name__)

TERMINAL = ("completed", "succeeded", "failed", "cancelled", "canceled", "skipped", "rolled_back")


def plain(rec: Any) -> dict[str, Any]:
    """A record's fields as a dict, shallow (dataclasses.asdict deep-copies: a third of a VM page's time)."""
    return {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}


def context_dict(ctx: Context) -> dict[str, Any]:
    """The context as clients read it (CONTRACTS.md, "VM contexts")."""
    return plain(ctx)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round((b - a).total_seconds(), 3)


def job_dict(job: ContextJob) -> dict[str, Any]:
    out = plain(job)
    out["duration_seconds"] = _seconds_between(job.started_at, job.completed_at)
    return out


def new_context_id(vm_name: str, when: datetime | None = None) -> str:
    """ctx-<vm>-YYYYMMDD-HHMMSS with the name reduced to URL-safe ASCII (the id travels in paths)."""
    ascii_name = unicodedata.normalize("NFKD", vm_name).encode("ascii", "ignore").decode("ascii")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_name).strip("-.")[:64].rstrip("-.") or "vm"
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return f"ctx-{safe}-{stamp}"


class Contexts:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._kept = KeptList(db)

    # -- reading -------------------------------------------------------------------------------------

    def listing(self, limit: int | None, offset: int) -> contextlib.AbstractAsyncContextManager[Listing]:
        """One page of the list (limit None: all), as fresh as every change committed before the call; the
        whole list's file stays open while the listing is held."""
        return self._kept.listing(limit, offset)

    async def by_name(self, vm_name: str) -> dict[str, Any]:
        """The context's columns as a dict (backup/ reads it so; new code uses store.contexts.by_name)."""
        return plain(await store.by_name(self.db, vm_name))

    async def by_id(self, context_id: str) -> dict[str, Any]:
        """As by_name, by context id."""
        return plain(await store.by_id(self.db, context_id))

    async def detail(self, vm_name: str, history: int = 50) -> dict[str, Any]:
        """`{context, current_job, job_history, disks, networks, cbt_history, last_operation, groups}`."""
        ctx = await store.by_name(self.db, vm_name)
        cid = ctx.context_id
        context = context_dict(ctx)
        groups = [plain(g) for g in await store.groups_of(self.db, cid)]
        context["groups"], context["group_count"] = groups, len(groups)
        jobs = await store.jobs_of(self.db, cid, history)
        current: ContextJob | None = None
        if ctx.current_job_id:
            current = next((j for j in jobs if j.job_id == ctx.current_job_id), None)
            if current is None:
                current = await store.job(self.db, ctx.current_job_id)
        if current is None:
            current = next((j for j in jobs if str(j.status).lower() not in TERMINAL), None)
        disks = [plain(d) for d in await store.disks_of(self.db, cid)]
        networks = [plain(n) for n in await store.networks_of(self.db, cid)]
        cbt = [plain(e) for e in await store.cbt_of(self.db, cid, history)]
        return {"context": context, "current_job": job_dict(current) if current else None,
                "job_history": [job_dict(j) for j in jobs], "disks": disks, "networks": networks,
                "cbt_history": cbt, "last_operation": context["last_operation_summary"]}

    async def recent_jobs(self, context_id: str, limit: int) -> dict[str, Any]:
        ctx = await store.by_id(self.db, context_id)
        jobs = [job_dict(j) for j in await store.jobs_of(self.db, context_id, limit)]
        return {"context_id": context_id, "vm_name": ctx.vm_name, "jobs": jobs, "count": len(jobs)}

    async def ungrouped(self) -> list[dict[str, Any]]:
        return [plain(u) for u in await store.ungrouped(self.db)]

    @staticmethod
    async def known(db: Database | Tx, vcenter_host: str) -> tuple[dict[str, ContextKey], dict[str, ContextKey]]:
        """Existing contexts of one vCenter by VMware id, and all contexts by name (names are unique)."""
        keys = await store.keys(db)
        return ({k.vmware_vm_id: k for k in keys if k.vcenter_host == vcenter_host}, {k.vm_name: k for k in keys})

    # -- writing (inside the caller's transaction) ---------------------------------------------------

    async def create(self, tx: Tx, vm: VmSpec, *, vcenter_host: str, datacenter: str, credential_id: int | None,
                     auto_added: bool) -> str:
        now = utcnow()
        base = new_context_id(vm.name)
        context_id, n = base, 1
        while await store.exists(tx, context_id):
            n += 1
            context_id = f"{base}-{n}"
        await store.create(tx, context_id, NewContext(
            vmware_vm_id=vm.id, vcenter_host=vcenter_host, datacenter=vm.datacenter or datacenter,
            auto_added=auto_added, credential_id=credential_id, specs=_specs(vm, vm.name)), now)
        for disk in vm.disks:
            await store.add_disk(tx, context_id, _disk(disk), now)
        await store.replace_nics(tx, context_id, _nics(vm))
        return context_id

    async def refresh(self, tx: Tx, context_id: str, vm: VmSpec) -> list[str]:
        """Bring a context up to date with what vCenter says now; returns what changed in its specs.

        The power state and tools status change all the time: they are updated, not reported.
        """
        ctx = await store.by_id(tx, context_id)
        changes = []
        name = vm.name
        if name != ctx.vm_name and await store.name_taken(tx, name, other_than=context_id):
            changes.append(f"renamed to {name!r} in vCenter, but another context has that name: kept {ctx.vm_name!r}")
            name = ctx.vm_name
        for label, column, value in (("name", "vm_name", name), ("path", "vm_path", vm.path),
                                     ("CPUs", "cpu_count", vm.cpu_count), ("memory (MB)", "memory_mb", vm.memory_mb),
                                     ("guest OS", "guest_os", vm.guest_os), ("OS type", "os_type", vm.os_type),
                                     ("hardware version", "vmx_version", vm.vmx_version)):
            if getattr(ctx, column) != value:
                changes.append(f"{label} changed from {getattr(ctx, column)!r} to {value!r}")
        old_disks = {d.disk_id: d for d in await store.disks_of(tx, context_id)}
        changes += disk_changes(old_disks, vm.disks)
        changes += nic_changes(await store.networks_of(tx, context_id), vm.networks)
        now = utcnow()
        await store.update_specs(tx, context_id, _specs(vm, name), changed=bool(changes), now=now)
        for disk in vm.disks:
            if disk.id not in old_disks:
                await store.add_disk(tx, context_id, _disk(disk), now)
            else:
                await store.update_disk(tx, context_id, _disk(disk), now)
        for disk_id in old_disks.keys() - {disk.id for disk in vm.disks}:
            await store.remove_disk(tx, context_id, disk_id)
        await store.replace_nics(tx, context_id, _nics(vm))
        return changes


def _specs(vm: VmSpec, name: str) -> Specs:
    return Specs(vm_name=name, vm_path=vm.path, cpu_count=vm.cpu_count, memory_mb=vm.memory_mb, os_type=vm.os_type,
                 power_state=vm.power_state, vm_tools_version=vm.vmware_tools_version, guest_os=vm.guest_os,
                 display_name=vm.display_name or vm.name, folder_path=vm.folder_path, vmx_version=vm.vmx_version,
                 annotation=vm.annotation, vmware_tools_status=vm.vmware_tools_status)


def _disk(d: DiskSpec) -> DiskSpecs:
    return DiskSpecs(disk_id=d.id, label=d.label, path=d.path, vmdk_path=d.vmdk_path, size_gb=d.size_gb,
                     capacity_bytes=d.capacity_bytes, datastore=d.datastore, unit_number=d.unit_number,
                     provisioning_type=d.provisioning_type)


def _nics(vm: VmSpec) -> list[Nic]:
    return [Nic(label=n.label, network_name=n.network_name, adapter_type=n.adapter_type, mac_address=n.mac_address,
                connected=n.connected, type=n.type) for n in vm.networks]
