"""VM contexts and what hangs off them: disks, NICs, the CBT history, and the list's change generation."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Reader, get_or_404, record
from .db import Writer

# Named writers of vm_replication_contexts.current_status (tests/omad/test_store_rules.py holds us to it).
TRANSITIONS = ("create", "job_started", "job_ended")


class ContextStatus(enum.StrEnum):
    DISCOVERED = "discovered"
    REPLICATING = "replicating"
    READY_FOR_FAILOVER = "ready_for_failover"
    FAILED_OVER_TEST = "failed_over_test"
    FAILED_OVER_LIVE = "failed_over_live"
    COMPLETED = "completed"
    FAILED = "failed"
    CLEANUP_REQUIRED = "cleanup_required"


@dataclasses.dataclass(frozen=True)
class Context:
    """One row of vm_replication_contexts; the field order is the order clients read (CONTRACTS.md)."""

    context_id: str
    vm_name: str
    vmware_vm_id: str
    vm_path: str
    vcenter_host: str
    datacenter: str
    current_status: ContextStatus
    current_job_id: str | None
    total_jobs_run: int
    successful_jobs: int
    failed_jobs: int
    last_successful_job_id: str | None
    cpu_count: int
    memory_mb: int
    os_type: str
    power_state: str
    vm_tools_version: str
    created_at: str
    updated_at: str
    first_job_at: str | None
    last_job_at: str | None
    auto_added: bool
    scheduler_enabled: bool
    credential_id: int | None
    ossea_config_id: int | None
    last_operation_summary: dict[str, Any] | None
    guest_os: str
    display_name: str
    folder_path: str
    vmx_version: str
    annotation: str
    vmware_tools_status: str
    next_scheduled_at: str | None  # kept by the scheduler (migration 0005)
    last_scheduled_job_id: str | None


COLUMNS = tuple(f.name for f in dataclasses.fields(Context))
_BOOLEAN = ("auto_added", "scheduler_enabled")
_JSON_TEXT = ("last_operation_summary",)


def _context(row: Mapping[str, Any]) -> Context:
    summary = row["last_operation_summary"]
    return record(Context, {**row, "current_status": ContextStatus(row["current_status"]),
                            "auto_added": bool(row["auto_added"]), "scheduler_enabled": bool(row["scheduler_enabled"]),
                            "last_operation_summary": json.loads(summary) if summary else None})


@dataclasses.dataclass(frozen=True)
class ContextKey:
    """What telling contexts apart needs: a discovery matches VMs by VMware id, then by name."""

    context_id: str
    vm_name: str
    vmware_vm_id: str
    vcenter_host: str


@dataclasses.dataclass(frozen=True)
class DiskSpecs:
    """A disk's columns as discovery reports them (the CBT change id is not among them)."""

    disk_id: str
    label: str
    path: str
    vmdk_path: str
    size_gb: int
    capacity_bytes: int
    datastore: str
    unit_number: int | None
    provisioning_type: str


@dataclasses.dataclass(frozen=True)
class Disk(DiskSpecs):
    """One disk of a context (once per disk id, not per job): its specs, then its state; the order is the wire's."""

    disk_change_id: str | None
    created_at: str
    updated_at: str


@dataclasses.dataclass(frozen=True)
class Nic:
    label: str
    network_name: str
    adapter_type: str
    mac_address: str
    connected: bool
    type: str


@dataclasses.dataclass(frozen=True)
class GroupRef:
    """A machine group the context is in, with the membership's own priority and switch."""

    group_id: str
    group_name: str
    priority: int
    enabled: bool


@dataclasses.dataclass(frozen=True)
class CbtEntry:
    job_id: str | None
    disk_id: str
    change_id: str
    previous_change_id: str | None
    sync_type: str | None
    bytes_transferred: int | None
    sync_success: bool
    created_at: str


@dataclasses.dataclass(frozen=True)
class ContextJob:
    """A job about a context as the VM's page shows it (the jobs table belongs to the job engine)."""

    job_id: str
    job_type: str
    status: str
    progress: float
    started_at: str | None
    completed_at: str | None
    created_at: str
    display_name: str
    current_step: str | None
    error_message: str | None


@dataclasses.dataclass(frozen=True)
class Ungrouped:
    """A context in no machine group, as GET /discovery/ungrouped-vms lists it."""

    context_id: str
    vm_name: str
    vm_path: str
    vcenter_host: str
    datacenter: str
    current_status: ContextStatus
    auto_added: bool
    scheduler_enabled: bool
    cpu_count: int
    memory_mb: int
    os_type: str
    power_state: str
    created_at: str
    last_job_at: str | None


@dataclasses.dataclass(frozen=True)
class Specs:
    """What vCenter says of a VM, as a context keeps it (its name only while no other context has it)."""

    vm_name: str
    vm_path: str
    cpu_count: int
    memory_mb: int
    os_type: str
    power_state: str
    vm_tools_version: str
    guest_os: str
    display_name: str
    folder_path: str
    vmx_version: str
    annotation: str
    vmware_tools_status: str


_SPEC_COLUMNS = tuple(f.name for f in dataclasses.fields(Specs))


@dataclasses.dataclass(frozen=True)
class NewContext:
    """The columns a discovery sets when it creates a context."""

    vmware_vm_id: str
    vcenter_host: str
    datacenter: str
    auto_added: bool
    credential_id: int | None
    specs: Specs


# -- the list (the GUI's main table, up to 10,000 VMs) --------------------------------------------------------
#
# SQLite renders each item as JSON itself, so Python only joins strings. The SQL is assembled once, at import,
# from the constant column names above.

def _json_value(column: str) -> str:
    if column in _BOOLEAN:
        return f"json(CASE c.{column} WHEN 1 THEN 'true' ELSE 'false' END)"
    if column in _JSON_TEXT:
        return f"json(c.{column})"
    return f"c.{column}"


_GROUP_JSON = ("json_object('group_id', g.id, 'group_name', g.name, 'priority', m.priority, "
               "'enabled', json(CASE m.enabled WHEN 1 THEN 'true' ELSE 'false' END))")
_ROW_JSON = "json_object(" + ", ".join(f"'{col}', {_json_value(col)}" for col in COLUMNS) + ")"
# An item with its groups by correlated subqueries (an index lookup per row): pages and single rows.
_ITEM_JSON = (
    "json_object(" + ", ".join(f"'{col}', {_json_value(col)}" for col in COLUMNS)
    + f", 'groups', json((SELECT json_group_array({_GROUP_JSON}) FROM vm_group_memberships m "
    "JOIN vm_machine_groups g ON g.id = m.group_id WHERE m.vm_context_id = c.context_id)), "
    "'group_count', (SELECT COUNT(*) FROM vm_group_memberships m JOIN vm_machine_groups g ON g.id = m.group_id "
    "WHERE m.vm_context_id = c.context_id))"
)
_PAGE_SQL = f"SELECT {_ITEM_JSON} AS item FROM vm_replication_contexts c ORDER BY c.vm_name LIMIT ? OFFSET ?"
_SOME_SQL = (f"SELECT c.context_id AS id, c.vm_name AS name, {_ITEM_JSON} AS item FROM vm_replication_contexts c "
             "WHERE c.context_id IN (SELECT value FROM json_each(?))")
# The whole list: rows and groups in two passes, joined in Python (half the cost of 10,000 subqueries).
_ALL_SQL = (f"SELECT c.context_id AS id, c.vm_name AS name, {_ROW_JSON} AS item FROM vm_replication_contexts c "
            "ORDER BY c.vm_name")
_ALL_GROUPS_SQL = (
    f"SELECT m.vm_context_id AS id, json_group_array({_GROUP_JSON}) AS groups, COUNT(*) AS n "
    "FROM vm_group_memberships m JOIN vm_machine_groups g ON g.id = m.group_id GROUP BY m.vm_context_id"
)


@dataclasses.dataclass(frozen=True)
class Rendered:
    """One list item as JSON, with what places it in the list."""

    context_id: str
    vm_name: str
    item: str


async def generation(db: Reader) -> int:
    """Bumped by triggers on every change the list shows, from any connection (migration 0002)."""
    return int(await db.scalar("SELECT generation FROM change_counters WHERE name = 'vm_contexts'"))


async def changed_since(db: Reader, since: int) -> tuple[int, list[str]]:
    """The generation now, and the contexts (ids) changed after generation `since` (migration 0010)."""
    rows = await db.fetchall("SELECT context_id, generation FROM vm_context_changes WHERE generation > ?", (since,))
    newest = max((r["generation"] for r in rows), default=since)
    return newest, [r["context_id"] for r in rows]


async def render_all(db: Reader) -> list[Rendered]:
    """Every item, ordered by VM name."""
    groups = {r["id"]: (r["groups"], r["n"]) for r in await db.fetchall(_ALL_GROUPS_SQL)}
    out = []
    for row in await db.fetchall(_ALL_SQL):
        g, n = groups.get(row["id"], ("[]", 0))
        out.append(Rendered(row["id"], row["name"], f'{row["item"][:-1]},"groups":{g},"group_count":{n}}}'))
    return out


async def render_some(db: Reader, context_ids: Sequence[str]) -> list[Rendered]:
    """The items of these contexts (those that still exist), in no order."""
    rows = await db.fetchall(_SOME_SQL, (json.dumps(list(context_ids)),))
    return [Rendered(r["id"], r["name"], r["item"]) for r in rows]


async def render_page(db: Reader, limit: int, offset: int) -> tuple[list[str], int]:
    """The items of one page by VM name, and how many contexts exist."""
    rows = await db.fetchall(_PAGE_SQL, (limit, offset))
    total = await db.scalar("SELECT COUNT(*) FROM vm_replication_contexts")
    return [r["item"] for r in rows], int(total)


# -- one context ---------------------------------------------------------------------------------------------

async def by_name(db: Reader, vm_name: str) -> Context:
    return _context(await get_or_404(db, "SELECT * FROM vm_replication_contexts WHERE vm_name = ?", (vm_name,),
                                     what="VM context", ident=vm_name))


async def by_id(db: Reader, context_id: str) -> Context:
    return _context(await get_or_404(db, "SELECT * FROM vm_replication_contexts WHERE context_id = ?",
                                     (context_id,), what="VM context", ident=context_id))


async def exists(db: Reader, context_id: str) -> bool:
    return bool(await db.scalar("SELECT 1 FROM vm_replication_contexts WHERE context_id = ?", (context_id,)))


async def name_taken(db: Reader, vm_name: str, *, other_than: str) -> bool:
    return bool(await db.scalar("SELECT 1 FROM vm_replication_contexts WHERE vm_name = ? AND context_id != ?",
                                (vm_name, other_than)))


async def keys(db: Reader) -> list[ContextKey]:
    return [record(ContextKey, r) for r in await db.fetchall(
        "SELECT context_id, vm_name, vmware_vm_id, vcenter_host FROM vm_replication_contexts")]


async def using_credential(db: Reader, credential_id: int) -> int:
    """How many contexts log in to vCenter with this saved credential."""
    return int(await db.scalar("SELECT COUNT(*) FROM vm_replication_contexts WHERE credential_id = ?",
                               (credential_id,)))


async def ungrouped(db: Reader) -> list[Ungrouped]:
    rows = await db.fetchall(
        "SELECT context_id, vm_name, vm_path, vcenter_host, datacenter, current_status, auto_added, "
        "scheduler_enabled, cpu_count, memory_mb, os_type, power_state, created_at, last_job_at "
        "FROM vm_replication_contexts c WHERE NOT EXISTS "
        "(SELECT 1 FROM vm_group_memberships m WHERE m.vm_context_id = c.context_id) ORDER BY vm_name")
    return [record(Ungrouped, {**r, "current_status": ContextStatus(r["current_status"]),
                               "auto_added": bool(r["auto_added"]), "scheduler_enabled": bool(r["scheduler_enabled"])})
            for r in rows]


async def groups_of(db: Reader, context_id: str) -> list[GroupRef]:
    rows = await db.fetchall(
        "SELECT g.id AS group_id, g.name AS group_name, m.priority, m.enabled FROM vm_group_memberships m "
        "JOIN vm_machine_groups g ON g.id = m.group_id WHERE m.vm_context_id = ? ORDER BY g.name", (context_id,))
    return [record(GroupRef, {**r, "enabled": bool(r["enabled"])}) for r in rows]


async def disks_of(db: Reader, context_id: str) -> list[Disk]:
    rows = await db.fetchall(f"SELECT {', '.join(f.name for f in dataclasses.fields(Disk))} FROM vm_disks "
                             "WHERE vm_context_id = ? ORDER BY disk_id", (context_id,))
    return [record(Disk, r) for r in rows]


async def networks_of(db: Reader, context_id: str) -> list[Nic]:
    rows = await db.fetchall("SELECT label, network_name, adapter_type, mac_address, connected, type "
                             "FROM vm_networks WHERE vm_context_id = ? ORDER BY position", (context_id,))
    return [record(Nic, {**r, "connected": bool(r["connected"])}) for r in rows]


async def cbt_of(db: Reader, context_id: str, limit: int) -> list[CbtEntry]:
    rows = await db.fetchall(
        "SELECT job_id, disk_id, change_id, previous_change_id, sync_type, bytes_transferred, sync_success, "
        "created_at FROM cbt_history WHERE vm_context_id = ? ORDER BY created_at DESC, id DESC LIMIT ?",
        (context_id, limit))
    return [record(CbtEntry, {**r, "sync_success": bool(r["sync_success"])}) for r in rows]


_JOB_COLUMNS = ("j.id AS job_id, j.job_type, j.status, j.progress, j.started_at, j.completed_at, j.created_at, "
                "j.display_name, j.current_step, j.error_message")


def _job(row: Mapping[str, Any]) -> ContextJob:
    return record(ContextJob, {**row, "progress": row["progress"] or 0})


async def jobs_of(db: Reader, context_id: str, limit: int) -> list[ContextJob]:
    """The context's latest jobs of every type, newest first."""
    rows = await db.fetchall(f"SELECT {_JOB_COLUMNS} FROM jobs j WHERE j.context_id = ? "
                             "ORDER BY j.created_at DESC, j.id DESC LIMIT ?", (context_id, limit))
    return [_job(r) for r in rows]


async def job(db: Reader, job_id: str) -> ContextJob | None:
    row = await db.fetchone(f"SELECT {_JOB_COLUMNS} FROM jobs j WHERE j.id = ?", (job_id,))
    return _job(row) if row is not None else None


# -- writing (inside the caller's transaction) ---------------------------------------------------------------

# Assembled once, at import, from the constant column names of Specs.
_CREATE_SQL = (
    "INSERT INTO vm_replication_contexts (context_id, vmware_vm_id, vcenter_host, datacenter, current_status,"
    f" auto_added, scheduler_enabled, credential_id, created_at, updated_at, ossea_config_id,"
    f" {', '.join(_SPEC_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?,"
    # A new VM replicates with the default CloudStack config.
    f" (SELECT id FROM ossea_configs WHERE is_default = 1){', ?' * len(_SPEC_COLUMNS)})")
_UPDATE_SPECS_SQL = (
    f"UPDATE vm_replication_contexts SET {', '.join(f'{c} = ?' for c in _SPEC_COLUMNS)},"
    " updated_at = CASE WHEN ? THEN ? ELSE updated_at END WHERE context_id = ?")

async def create(tx: Writer, context_id: str, new: NewContext, now: str) -> None:
    """A new context starts as discovered; the scheduler may pick it up (scheduler_enabled)."""
    await tx.execute(_CREATE_SQL, (context_id, new.vmware_vm_id, new.vcenter_host, new.datacenter,
                                   ContextStatus.DISCOVERED.value, int(new.auto_added), new.credential_id, now, now,
                                   *(getattr(new.specs, c) for c in _SPEC_COLUMNS)))


async def update_specs(tx: Writer, context_id: str, specs: Specs, *, changed: bool, now: str) -> None:
    """Write what vCenter says now; updated_at moves only when the specs changed (not for power state)."""
    await tx.execute(_UPDATE_SPECS_SQL, (*(getattr(specs, c) for c in _SPEC_COLUMNS), changed, now, context_id))


async def add_disk(tx: Writer, context_id: str, disk: DiskSpecs, now: str) -> None:
    await tx.execute(
        "INSERT INTO vm_disks (vm_context_id, disk_id, label, path, vmdk_path, size_gb, capacity_bytes, datastore,"
        " unit_number, provisioning_type, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (context_id, disk.disk_id, disk.label, disk.path, disk.vmdk_path, disk.size_gb, disk.capacity_bytes,
         disk.datastore, disk.unit_number, disk.provisioning_type, now, now))


async def update_disk(tx: Writer, context_id: str, disk: DiskSpecs, now: str) -> None:
    """The change id stays: a resized disk still continues its CBT chain."""
    await tx.execute(
        "UPDATE vm_disks SET label = ?, path = ?, vmdk_path = ?, size_gb = ?, capacity_bytes = ?,"
        " datastore = ?, unit_number = ?, provisioning_type = ?, updated_at = ?"
        " WHERE vm_context_id = ? AND disk_id = ?",
        (disk.label, disk.path, disk.vmdk_path, disk.size_gb, disk.capacity_bytes, disk.datastore,
         disk.unit_number, disk.provisioning_type, now, context_id, disk.disk_id))


async def remove_disk(tx: Writer, context_id: str, disk_id: str) -> None:
    await tx.execute("DELETE FROM vm_disks WHERE vm_context_id = ? AND disk_id = ?", (context_id, disk_id))


async def replace_nics(tx: Writer, context_id: str, nics: Sequence[Nic]) -> None:
    await tx.execute("DELETE FROM vm_networks WHERE vm_context_id = ?", (context_id,))
    await tx.executemany(
        "INSERT INTO vm_networks (vm_context_id, position, label, network_name, adapter_type, mac_address,"
        " connected, type) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(context_id, i, n.label, n.network_name, n.adapter_type, n.mac_address, int(n.connected), n.type)
         for i, n in enumerate(nics)])


# -- the jobs a context has run (replications and backups alike) ---------------------------------------------


async def job_started(tx: Writer, context_id: str, job_id: str, now: str, *,
                      status: ContextStatus | None = None) -> None:
    """A job of this VM began: it is the current one, counted in total_jobs_run; `status` (a replication:
    replicating) moves the context, a backup leaves it where it is."""
    await tx.execute(
        "UPDATE vm_replication_contexts SET current_job_id = ?, total_jobs_run = total_jobs_run + 1,"
        " first_job_at = COALESCE(first_job_at, ?), last_job_at = ?,"
        " current_status = COALESCE(?, current_status) WHERE context_id = ?",
        (job_id, now, now, status.value if status is not None else None, context_id))


async def job_ended(tx: Writer, context_id: str, job_id: str, *, succeeded: bool, summary: dict[str, Any], now: str,
                    status: ContextStatus | None = None) -> None:
    """A job of this VM ended: counted as successful or failed, its summary kept as the last operation; it is
    no longer the current job (unless another one took its place meanwhile); `status` moves the context."""
    await tx.execute(
        "UPDATE vm_replication_contexts SET successful_jobs = successful_jobs + ?, failed_jobs = failed_jobs + ?,"
        " last_successful_job_id = CASE WHEN ? THEN ? ELSE last_successful_job_id END,"
        " current_job_id = CASE WHEN current_job_id = ? THEN NULL ELSE current_job_id END,"
        " last_job_at = ?, last_operation_summary = ?, current_status = COALESCE(?, current_status)"
        " WHERE context_id = ?",
        (int(succeeded), int(not succeeded), int(succeeded), job_id, job_id, now, json.dumps(summary, default=str),
         status.value if status is not None else None, context_id))


async def add_cbt(tx: Writer, context_id: str, *, job_id: str, disk_id: str, change_id: str,
                  previous_change_id: str | None, sync_type: str, bytes_transferred: int | None,
                  success: bool, now: str) -> None:
    """Append one row to the context's CBT history."""
    await tx.execute(
        "INSERT INTO cbt_history (vm_context_id, job_id, disk_id, change_id, previous_change_id, sync_type,"
        " bytes_transferred, sync_success, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (context_id, job_id, disk_id, change_id, previous_change_id, sync_type, bytes_transferred, int(success),
         now))


async def mark_cbt(tx: Writer, job_id: str, *, success: bool, bytes_by_disk: Mapping[str, int]) -> None:
    """The sync behind a job's CBT rows ended: they say whether it succeeded (and what each disk sent)."""
    await tx.execute("UPDATE cbt_history SET sync_success = ? WHERE job_id = ?", (int(success), job_id))
    for disk_id, sent in bytes_by_disk.items():
        await tx.execute("UPDATE cbt_history SET bytes_transferred = ? WHERE job_id = ? AND disk_id = ?",
                         (sent, job_id, disk_id))


async def set_change_id(tx: Writer, context_id: str, disk_id: str, change_id: str | None, now: str) -> None:
    """The change id the next sync of this disk continues from (None: it copies in full)."""
    await tx.execute("UPDATE vm_disks SET disk_change_id = ?, updated_at = ? WHERE vm_context_id = ? AND disk_id = ?",
                     (change_id, now, context_id, disk_id))


async def change_id_by_path(db: Reader, vm_path: str, disk_id: str) -> str:
    """The change id stored for a VM's disk, found by the VM's path; "" when there is none."""
    value = await db.scalar(
        "SELECT d.disk_change_id FROM vm_disks d JOIN vm_replication_contexts c ON c.context_id = d.vm_context_id"
        " WHERE c.vm_path = ? AND d.disk_id = ? ORDER BY c.updated_at DESC LIMIT 1", (vm_path, disk_id))
    return str(value or "")


async def by_vmware_id(db: Reader, vmware_vm_id: str) -> Context | None:
    row = await db.fetchone("SELECT * FROM vm_replication_contexts WHERE vmware_vm_id = ? ORDER BY updated_at DESC"
                            " LIMIT 1", (vmware_vm_id,))
    return _context(row) if row is not None else None
