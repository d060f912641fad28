"""VM contexts: one per protected VM, with its disks (once per disk id) and NICs, its groups and its jobs."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import re
import unicodedata
from datetime import datetime, timezone
from typing import Any

from ..store import contexts as store
from ..store.contexts import Context, ContextKey, ContextJob, DiskSpecs, Nic, NewContext, Rendered, Specs
from ..store.db import Database, Tx, utcnow
from .vmspec import DiskSpec, VmSpec, disk_changes, nic_changes

log = logging.getLogger(__name__)

TERMINAL = ("completed", "succeeded", "failed", "cancelled", "canceled", "skipped", "rolled_back")
# More changed contexts than this since the last render: render the whole list again instead.
_FULL_RENDER_AFTER = 1000


def _key(r: Rendered) -> tuple[str, str]:
    return (r.vm_name, r.context_id)  # SQLite's BINARY order of vm_name is Python's order of str


class _Rendered:
    """The whole list, kept rendered: at each change generation only the changed contexts are rendered again.

    The items are ordered by VM name; triggers record which contexts each change touched (migration 0010).
    Requests that arrive while a refresh runs share it, even when a change came in meanwhile: the answer is
    then at most one refresh old, and under a stream of changes at most one refresh runs at a time.
    """

    def __init__(self) -> None:
        self.generation = -1
        self.entries: list[Rendered] = []  # by _key
        self.items: list[bytes] = []  # entries' JSON, in the same order
        self._by_id: dict[str, Rendered] = {}
        self._joined: bytes | None = b""  # the items joined by commas, once per generation (10 MB: one copy)
        self._pending: asyncio.Future[None] | None = None

    @property
    def built(self) -> bool:
        return self.generation >= 0

    @property
    def joined(self) -> bytes:
        if self._joined is None:
            self._joined = b",".join(self.items)
        return self._joined

    async def refresh(self, db: Database, generation: int) -> None:
        if generation == self.generation:
            return
        if self._pending is not None:
            await asyncio.shield(self._pending)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending = future
        try:
            await self._catch_up(db, generation)
            future.set_result(None)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved here: a failure nobody waited for is not "never retrieved"
            raise
        finally:
            self._pending = None

    async def _catch_up(self, db: Database, generation: int) -> None:
        # `generation` was read before the queries below, so they see at least every change up to it.
        if self.built:
            newest, changed = await store.changed_since(db, self.generation)
            if len(changed) <= _FULL_RENDER_AFTER:
                self._apply(changed, await store.render_some(db, changed) if changed else [])
                self.generation = max(generation, newest, self.generation)
                return
        entries = await store.render_all(db)
        if generation > self.generation:
            self.entries = entries
            self.items = [e.item.encode() for e in entries]
            self._by_id = {e.context_id: e for e in entries}
            self._joined = None
            self.generation = generation

    def _apply(self, changed: list[str], fresh: list[Rendered]) -> None:
        for context_id in changed:
            old = self._by_id.pop(context_id, None)
            if old is not None:
                i = bisect.bisect_left(self.entries, _key(old), key=_key)
                del self.entries[i], self.items[i]
        for entry in fresh:
            i = bisect.bisect_left(self.entries, _key(entry), key=_key)
            self.entries.insert(i, entry)
            self.items.insert(i, entry.item.encode())
            self._by_id[entry.context_id] = entry
        if changed:
            self._joined = None

    def page(self, limit: int | None, offset: int) -> tuple[list[bytes], int, int]:
        if limit is None and offset == 0:
            return [b"[", self.joined, b"]"], len(self.items), len(self.items)
        page = self.items[offset:] if limit is None else self.items[offset:offset + limit]
        return [b"[", b",".join(page), b"]"], len(page), len(self.items)


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
        self._rendered = _Rendered()

    # -- reading -------------------------------------------------------------------------------------

    async def list_json(self, limit: int | None, offset: int) -> tuple[list[bytes], int, int]:
        """The items of one page (limit None: all) as a JSON array in pieces (to be sent without joining them:
        the whole list is 10 MB), how many it holds, how many exist."""
        generation = await store.generation(self.db)
        rendered = self._rendered
        if limit is not None and not rendered.built:
            # A page before the first whole render: cheaper to render the page alone.
            items, total = await store.render_page(self.db, limit, offset)
            return [("[" + ",".join(items) + "]").encode()], len(items), total
        await rendered.refresh(self.db, generation)
        return rendered.page(limit, offset)

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
