"""VM contexts: one per protected VM, with its disks (once per disk id) and NICs, its groups and its jobs."""

from __future__ import annotations

import asyncio
import json
import re
import unicodedata
from datetime import datetime, timezone
from typing import Any

from oma_common.errors import NotFound

from ..store.db import Database, Tx, utcnow
from .vmspec import DiskSpec, NicSpec, VmSpec, disk_changes, nic_changes

# The context row's columns as clients read them (CONTRACTS.md, "VM contexts"), plus a few more of the VM's.
COLUMNS = (
    "context_id", "vm_name", "vmware_vm_id", "vm_path", "vcenter_host", "datacenter", "current_status",
    "current_job_id", "total_jobs_run", "successful_jobs", "failed_jobs", "last_successful_job_id", "cpu_count",
    "memory_mb", "os_type", "power_state", "vm_tools_version", "created_at", "updated_at", "first_job_at",
    "last_job_at", "auto_added", "scheduler_enabled", "credential_id", "ossea_config_id", "last_operation_summary",
    "guest_os", "display_name", "folder_path", "vmx_version", "annotation", "vmware_tools_status",
    "next_scheduled_at", "last_scheduled_job_id",  # kept by the scheduler (migration 0005)
)
BOOLEAN = ("auto_added", "scheduler_enabled")
JSON_TEXT = ("last_operation_summary",)

# The list is the GUI's main table and may hold 10,000 VMs: SQLite renders each item as JSON itself, so
# Python only joins strings, and the whole list is kept rendered until a row it shows changes. The SQL is
# assembled once, at import, from the constant column names above.
def _json_value(column: str) -> str:
    if column in BOOLEAN:
        return f"json(CASE c.{column} WHEN 1 THEN 'true' ELSE 'false' END)"
    if column in JSON_TEXT:
        return f"json(c.{column})"
    return f"c.{column}"


_GROUPS_JSON = (
    "(SELECT json_group_array(json_object('group_id', g.id, 'group_name', g.name, 'priority', m.priority, "
    "'enabled', json(CASE m.enabled WHEN 1 THEN 'true' ELSE 'false' END))) "
    "FROM vm_group_memberships m JOIN vm_machine_groups g ON g.id = m.group_id "
    "WHERE m.vm_context_id = c.context_id)"
)
_ROW_JSON = "json_object(" + ", ".join(f"'{col}', {_json_value(col)}" for col in COLUMNS) + ")"
# One page: groups by correlated subqueries (an index lookup per row).
_PAGE_SQL = (
    "SELECT json_object(" + ", ".join(f"'{col}', {_json_value(col)}" for col in COLUMNS)
    + f", 'groups', json({_GROUPS_JSON}), "
    "'group_count', (SELECT COUNT(*) FROM vm_group_memberships m JOIN vm_machine_groups g ON g.id = m.group_id "
    "WHERE m.vm_context_id = c.context_id)) AS item "
    "FROM vm_replication_contexts c ORDER BY c.vm_name LIMIT ? OFFSET ?"
)
# The whole list: rows and groups in two passes, joined in Python (half the cost of 10,000 subqueries).
_ALL_SQL = f"SELECT c.context_id AS id, {_ROW_JSON} AS item FROM vm_replication_contexts c ORDER BY c.vm_name"
_ALL_GROUPS_SQL = (
    "SELECT m.vm_context_id AS id, json_group_array(json_object('group_id', g.id, 'group_name', g.name, "
    "'priority', m.priority, 'enabled', json(CASE m.enabled WHEN 1 THEN 'true' ELSE 'false' END))) AS groups, "
    "COUNT(*) AS n FROM vm_group_memberships m JOIN vm_machine_groups g ON g.id = m.group_id "
    "GROUP BY m.vm_context_id"
)


class _Rendered:
    """The whole list, rendered once per generation of the contexts and their groups (see change_counters).

    Requests that arrive while a render runs share it, even when a change came in meanwhile: the answer is
    then at most one render (~0.1 s for 10,000 VMs) old, and under a stream of changes at most one render
    runs at a time instead of one per request.
    """

    def __init__(self) -> None:
        self.generation = -1
        self.items: list[str] = []
        self.body = b"[]"  # the items as one JSON array, encoded once
        self._pending: asyncio.Future[None] | None = None

    async def refresh(self, db: Database, generation: int) -> None:
        if generation == self.generation:
            return
        if self._pending is not None:
            await asyncio.shield(self._pending)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending = future
        try:
            items = await _render_all(db)
            if generation > self.generation:
                self.generation, self.items = generation, items
                self.body = ("[" + ",".join(items) + "]").encode()
            future.set_result(None)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved here: a failure nobody waited for is not "never retrieved"
            raise
        finally:
            self._pending = None


async def _render_all(db: Database) -> list[str]:
    groups = {r["id"]: (r["groups"], r["n"]) for r in await db.fetchall(_ALL_GROUPS_SQL)}
    out = []
    for row in await db.fetchall(_ALL_SQL):
        g, n = groups.get(row["id"], ("[]", 0))
        out.append(f'{row["item"][:-1]},"groups":{g},"group_count":{n}}}')
    return out


JOB_COLUMNS = ("j.id AS job_id, j.job_type, j.status, j.progress, j.started_at, j.completed_at, j.created_at, "
               "j.display_name, j.current_step, j.error_message")
TERMINAL = ("completed", "succeeded", "failed", "cancelled", "canceled", "skipped", "rolled_back")
DISK_FIELDS = ("disk_id", "label", "path", "vmdk_path", "size_gb", "capacity_bytes", "datastore", "unit_number",
               "provisioning_type", "disk_change_id", "created_at", "updated_at")
NIC_COLUMNS = "label, network_name, adapter_type, mac_address, connected, type"


def context_dict(row: dict[str, Any]) -> dict[str, Any]:
    out = {col: row.get(col) for col in COLUMNS}
    for col in BOOLEAN:
        out[col] = bool(out[col])
    for col in JSON_TEXT:
        out[col] = json.loads(out[col]) if out[col] else None
    return out


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round((b - a).total_seconds(), 3)


def job_dict(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["progress"] = out["progress"] or 0
    out["duration_seconds"] = _seconds_between(out["started_at"], out["completed_at"])
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

    async def list_json(self, limit: int | None, offset: int) -> tuple[bytes, int, int]:
        """The items of one page (limit None: all) as a JSON array, how many it holds, how many exist."""
        generation = int(await self.db.scalar("SELECT generation FROM change_counters WHERE name = 'vm_contexts'"))
        if limit is not None and generation != self._rendered.generation:
            # A page after a change: cheaper to render the page alone than the whole list.
            rows = await self.db.fetchall(_PAGE_SQL, (limit, offset))
            total = await self.db.scalar("SELECT COUNT(*) FROM vm_replication_contexts")
            return ("[" + ",".join(r["item"] for r in rows) + "]").encode(), len(rows), int(total)
        rendered = self._rendered
        await rendered.refresh(self.db, generation)
        if limit is None and offset == 0:
            return rendered.body, len(rendered.items), len(rendered.items)
        page = rendered.items[offset:] if limit is None else rendered.items[offset:offset + limit]
        return ("[" + ",".join(page) + "]").encode(), len(page), len(rendered.items)

    async def by_name(self, vm_name: str) -> dict[str, Any]:
        row = await self.db.fetchone("SELECT * FROM vm_replication_contexts WHERE vm_name = ?", (vm_name,))
        if row is None:
            raise NotFound("VM context not found", f"no VM context for a VM named {vm_name!r}")
        return row

    async def by_id(self, context_id: str) -> dict[str, Any]:
        row = await self.db.fetchone("SELECT * FROM vm_replication_contexts WHERE context_id = ?", (context_id,))
        if row is None:
            raise NotFound("VM context not found", f"VM context {context_id!r} does not exist")
        return row

    async def detail(self, vm_name: str, history: int = 50) -> dict[str, Any]:
        """`{context, current_job, job_history, disks, networks, cbt_history, last_operation, groups}`."""
        row = await self.by_name(vm_name)
        cid = row["context_id"]
        context = context_dict(row)
        groups = await self.groups_of(cid)
        context["groups"], context["group_count"] = groups, len(groups)
        jobs = [job_dict(j) for j in await self.db.fetchall(
            f"SELECT {JOB_COLUMNS} FROM jobs j WHERE j.context_id = ? ORDER BY j.created_at DESC, j.id DESC LIMIT ?",
            (cid, history))]
        current = None
        if row["current_job_id"]:
            current = next((j for j in jobs if j["job_id"] == row["current_job_id"]), None)
            if current is None:
                found = await self.db.fetchone(f"SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = ?",
                                               (row["current_job_id"],))
                current = job_dict(found) if found else None
        if current is None:
            current = next((j for j in jobs if str(j["status"]).lower() not in TERMINAL), None)
        disks = await self.db.fetchall(
            "SELECT disk_id, label, path, vmdk_path, size_gb, capacity_bytes, datastore, unit_number, "
            "provisioning_type, disk_change_id, created_at, updated_at FROM vm_disks WHERE vm_context_id = ? "
            "ORDER BY disk_id", (cid,))
        networks = await self.networks_of(cid)
        cbt = await self.db.fetchall(
            "SELECT job_id, disk_id, change_id, previous_change_id, sync_type, bytes_transferred, sync_success, "
            "created_at FROM cbt_history WHERE vm_context_id = ? ORDER BY created_at DESC, id DESC LIMIT ?",
            (cid, history))
        for entry in cbt:
            entry["sync_success"] = bool(entry["sync_success"])
        return {"context": context, "current_job": current, "job_history": jobs, "disks": disks,
                "networks": networks, "cbt_history": cbt, "last_operation": context["last_operation_summary"]}

    async def recent_jobs(self, context_id: str, limit: int) -> dict[str, Any]:
        row = await self.by_id(context_id)
        jobs = [job_dict(j) for j in await self.db.fetchall(
            f"SELECT {JOB_COLUMNS} FROM jobs j WHERE j.context_id = ? ORDER BY j.created_at DESC, j.id DESC LIMIT ?",
            (context_id, limit))]
        return {"context_id": context_id, "vm_name": row["vm_name"], "jobs": jobs, "count": len(jobs)}

    async def groups_of(self, context_id: str) -> list[dict[str, Any]]:
        rows = await self.db.fetchall(
            "SELECT g.id AS group_id, g.name AS group_name, m.priority, m.enabled FROM vm_group_memberships m "
            "JOIN vm_machine_groups g ON g.id = m.group_id WHERE m.vm_context_id = ? ORDER BY g.name", (context_id,))
        for r in rows:
            r["enabled"] = bool(r["enabled"])
        return rows

    async def networks_of(self, context_id: str) -> list[dict[str, Any]]:
        rows = await self.db.fetchall(f"SELECT {NIC_COLUMNS} FROM vm_networks WHERE vm_context_id = ? "
                                      "ORDER BY position", (context_id,))
        for r in rows:
            r["connected"] = bool(r["connected"])
        return rows

    async def ungrouped(self) -> list[dict[str, Any]]:
        rows = await self.db.fetchall(
            "SELECT context_id, vm_name, vm_path, vcenter_host, datacenter, current_status, auto_added, "
            "scheduler_enabled, cpu_count, memory_mb, os_type, power_state, created_at, last_job_at "
            "FROM vm_replication_contexts c WHERE NOT EXISTS "
            "(SELECT 1 FROM vm_group_memberships m WHERE m.vm_context_id = c.context_id) ORDER BY vm_name")
        for r in rows:
            r["auto_added"], r["scheduler_enabled"] = bool(r["auto_added"]), bool(r["scheduler_enabled"])
        return rows

    @staticmethod
    async def known(db: Database | Tx, vcenter_host: str
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Existing contexts of one vCenter by VMware id, and all contexts by name (names are unique)."""
        rows = await db.fetchall("SELECT context_id, vm_name, vmware_vm_id, vcenter_host "
                                      "FROM vm_replication_contexts")
        return ({r["vmware_vm_id"]: r for r in rows if r["vcenter_host"] == vcenter_host},
                {r["vm_name"]: r for r in rows})

    # -- writing (inside the caller's transaction) ---------------------------------------------------

    async def create(self, tx: Tx, vm: VmSpec, *, vcenter_host: str, datacenter: str, credential_id: int | None,
                     auto_added: bool) -> str:
        now = utcnow()
        base = new_context_id(vm.name)
        context_id, n = base, 1
        while await tx.scalar("SELECT 1 FROM vm_replication_contexts WHERE context_id = ?", (context_id,)):
            n += 1
            context_id = f"{base}-{n}"
        await tx.execute(
            "INSERT INTO vm_replication_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, datacenter,"
            " cpu_count, memory_mb, os_type, power_state, vm_tools_version, guest_os, display_name, folder_path,"
            " vmx_version, annotation, vmware_tools_status, created_at, updated_at, auto_added, scheduler_enabled,"
            " credential_id, ossea_config_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?,"
            " (SELECT id FROM ossea_configs WHERE is_default = 1))",  # a new VM replicates with the default config
            (context_id, vm.name, vm.id, vm.path, vcenter_host, vm.datacenter or datacenter, vm.cpu_count,
             vm.memory_mb, vm.os_type, vm.power_state, vm.vmware_tools_version, vm.guest_os,
             vm.display_name or vm.name, vm.folder_path, vm.vmx_version, vm.annotation, vm.vmware_tools_status,
             now, now, int(auto_added), credential_id))
        for disk in vm.disks:
            await self._insert_disk(tx, context_id, disk, now)
        await self._replace_nics(tx, context_id, vm.networks)
        return context_id

    async def refresh(self, tx: Tx, context_id: str, vm: VmSpec) -> list[str]:
        """Bring a context up to date with what vCenter says now; returns what changed in its specs.

        The power state and tools status change all the time: they are updated, not reported.
        """
        row = await tx.fetchone("SELECT * FROM vm_replication_contexts WHERE context_id = ?", (context_id,))
        assert row is not None
        changes = []
        name = vm.name
        if name != row["vm_name"] and await tx.scalar(
                "SELECT 1 FROM vm_replication_contexts WHERE vm_name = ? AND context_id != ?", (name, context_id)):
            changes.append(f"renamed to {name!r} in vCenter, but another context has that name: kept {row['vm_name']!r}")
            name = row["vm_name"]
        for label, column, value in (("name", "vm_name", name), ("path", "vm_path", vm.path),
                                     ("CPUs", "cpu_count", vm.cpu_count), ("memory (MB)", "memory_mb", vm.memory_mb),
                                     ("guest OS", "guest_os", vm.guest_os), ("OS type", "os_type", vm.os_type),
                                     ("hardware version", "vmx_version", vm.vmx_version)):
            if row[column] != value:
                changes.append(f"{label} changed from {row[column]!r} to {value!r}")
        old_disks = {d["disk_id"]: d for d in await tx.fetchall(
            "SELECT * FROM vm_disks WHERE vm_context_id = ?", (context_id,))}
        changes += disk_changes(old_disks, vm.disks)
        old_nics = await tx.fetchall(f"SELECT {NIC_COLUMNS} FROM vm_networks WHERE vm_context_id = ? "
                                     "ORDER BY position", (context_id,))
        changes += nic_changes(old_nics, vm.networks)
        now = utcnow()
        await tx.execute(
            "UPDATE vm_replication_contexts SET vm_name = ?, vm_path = ?, cpu_count = ?, memory_mb = ?, os_type = ?,"
            " power_state = ?, vm_tools_version = ?, guest_os = ?, display_name = ?, folder_path = ?, vmx_version = ?,"
            " annotation = ?, vmware_tools_status = ?, updated_at = CASE WHEN ? THEN ? ELSE updated_at END"
            " WHERE context_id = ?",
            (name, vm.path, vm.cpu_count, vm.memory_mb, vm.os_type, vm.power_state, vm.vmware_tools_version,
             vm.guest_os, vm.display_name or vm.name, vm.folder_path, vm.vmx_version, vm.annotation,
             vm.vmware_tools_status, bool(changes), now, context_id))
        for disk in vm.disks:
            if disk.id not in old_disks:
                await self._insert_disk(tx, context_id, disk, now)
            else:
                # The change id stays: a resized disk still continues its CBT chain.
                await tx.execute(
                    "UPDATE vm_disks SET label = ?, path = ?, vmdk_path = ?, size_gb = ?, capacity_bytes = ?,"
                    " datastore = ?, unit_number = ?, provisioning_type = ?, updated_at = ?"
                    " WHERE vm_context_id = ? AND disk_id = ?",
                    (disk.label, disk.path, disk.vmdk_path, disk.size_gb, disk.capacity_bytes, disk.datastore,
                     disk.unit_number, disk.provisioning_type, now, context_id, disk.id))
        gone = [d for d in old_disks if d not in {disk.id for disk in vm.disks}]
        for disk_id in gone:
            await tx.execute("DELETE FROM vm_disks WHERE vm_context_id = ? AND disk_id = ?", (context_id, disk_id))
        await self._replace_nics(tx, context_id, vm.networks)
        return changes

    @staticmethod
    async def _insert_disk(tx: Tx, context_id: str, disk: DiskSpec, now: str) -> None:
        await tx.execute(
            "INSERT INTO vm_disks (vm_context_id, disk_id, label, path, vmdk_path, size_gb, capacity_bytes, datastore,"
            " unit_number, provisioning_type, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (context_id, disk.id, disk.label, disk.path, disk.vmdk_path, disk.size_gb, disk.capacity_bytes,
             disk.datastore, disk.unit_number, disk.provisioning_type, now, now))

    @staticmethod
    async def _replace_nics(tx: Tx, context_id: str, nics: list[NicSpec]) -> None:
        await tx.execute("DELETE FROM vm_networks WHERE vm_context_id = ?", (context_id,))
        await tx.executemany(
            "INSERT INTO vm_networks (vm_context_id, position, label, network_name, adapter_type, mac_address,"
            " connected, type) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(context_id, i, n.label, n.network_name, n.adapter_type, n.mac_address, int(n.connected), n.type)
             for i, n in enumerate(nics)])
