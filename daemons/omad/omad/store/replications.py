"""Replication jobs, their disks (volume, export, reported change ids), each replicated disk's volume and the
volumes being created for them (recorded before volume-agent is asked, until the volume is recorded)."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Reader, get_or_404, record
from .db import Database, Tx, Writer

# Named writers of replication_jobs.status (tests/omad/test_store_rules.py holds us to it).
TRANSITIONS = ("create", "complete", "fail")


class ReplicationStatus(enum.StrEnum):
    REPLICATING = "replicating"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (ReplicationStatus.REPLICATING,)


@dataclasses.dataclass(frozen=True)
class Replication:
    job_id: str
    vm_context_id: str
    vm_name: str
    vm_path: str
    replication_type: str
    status: ReplicationStatus
    ossea_config_id: int
    target_network: str
    schedule_execution_id: str | None
    vm_group_id: str | None
    scheduled_by: str | None
    created_by: str
    progress_percent: float
    bytes_transferred: int
    total_bytes: int
    current_operation: str
    vma_status: str
    vma_sync_type: str
    vma_eta_seconds: int | None
    vma_progress: dict[str, Any]
    error_message: str | None
    created_at: str
    updated_at: str
    started_at: str | None
    completed_at: str | None
    last_activity_at: str

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclasses.dataclass(frozen=True)
class ReplicationDisk:
    job_id: str
    disk_id: str
    disk_key: int
    unit_number: int
    capacity_bytes: int
    volume_id: str | None
    nbd_port: int | None
    export_name: str
    base_change_id: str
    change_id: str | None
    previous_change_id: str | None
    change_id_mismatch: bool


@dataclasses.dataclass(frozen=True)
class Volume:
    vm_context_id: str
    disk_id: str
    volume_id: str
    volume_name: str
    size_bytes: int
    device_path: str | None
    link_path: str | None
    created_by_job: str | None
    created_at: str
    updated_at: str
    # What the last completed sync wrote at the volume's end (volume-agent's stamp); None: nothing yet.
    sync_stamp: str | None = None


@dataclasses.dataclass(frozen=True)
class VolumeCreate:
    """A volume omad asked (or was about to ask) volume-agent to create for a disk, not yet in replication_volumes."""

    vm_context_id: str
    disk_id: str
    volume_name: str
    job_id: str
    size_bytes: int
    created_at: str


@dataclasses.dataclass(frozen=True)
class NewReplication:
    job_id: str
    vm_context_id: str
    vm_name: str
    vm_path: str
    replication_type: str
    ossea_config_id: int
    target_network: str
    schedule_execution_id: str | None
    vm_group_id: str | None
    scheduled_by: str | None
    created_by: str


@dataclasses.dataclass(frozen=True)
class NewDisk:
    disk_id: str
    disk_key: int
    unit_number: int
    capacity_bytes: int
    export_name: str
    base_change_id: str


def _replication(row: Mapping[str, Any]) -> Replication:
    return record(Replication, {**row, "status": ReplicationStatus(row["status"]),
                                "vma_progress": json.loads(row["vma_progress"] or "{}")})


def _disk(row: Mapping[str, Any]) -> ReplicationDisk:
    return record(ReplicationDisk, {**row, "change_id_mismatch": bool(row["change_id_mismatch"])})


# -- reading -------------------------------------------------------------------------------------------------


async def get(db: Reader, job_id: str) -> Replication:
    return _replication(await get_or_404(db, "SELECT * FROM replication_jobs WHERE job_id = ?", (job_id,),
                                         what="replication job", ident=job_id))


async def find_one(db: Reader, job_id: str) -> Replication | None:
    row = await db.fetchone("SELECT * FROM replication_jobs WHERE job_id = ?", (job_id,))
    return _replication(row) if row is not None else None


async def active_for_vm(db: Reader, context_id: str) -> Replication | None:
    row = await db.fetchone("SELECT * FROM replication_jobs WHERE vm_context_id = ? AND status = ?",
                            (context_id, ReplicationStatus.REPLICATING.value))
    return _replication(row) if row is not None else None


async def running(db: Reader) -> list[Replication]:
    rows = await db.fetchall("SELECT * FROM replication_jobs WHERE status = ? ORDER BY created_at",
                             (ReplicationStatus.REPLICATING.value,))
    return [_replication(r) for r in rows]


async def find(db: Reader, *, vm_context_id: str | None, status: str | None, limit: int,
               offset: int) -> tuple[int, list[Replication]]:
    where, params = "WHERE (? IS NULL OR vm_context_id = ?) AND (? IS NULL OR status = ?)", \
        [vm_context_id, vm_context_id, status, status]
    total = int(await db.scalar(f"SELECT COUNT(*) FROM replication_jobs {where}", params) or 0)
    rows = await db.fetchall(f"SELECT * FROM replication_jobs {where} ORDER BY created_at DESC, job_id DESC "
                             "LIMIT ? OFFSET ?", [*params, limit, offset])
    return total, [_replication(r) for r in rows]


async def disks(db: Reader, job_id: str) -> list[ReplicationDisk]:
    rows = await db.fetchall("SELECT * FROM replication_disks WHERE job_id = ? ORDER BY disk_key", (job_id,))
    return [_disk(r) for r in rows]


async def volumes_of(db: Reader, context_id: str) -> dict[str, Volume]:
    rows = await db.fetchall("SELECT * FROM replication_volumes WHERE vm_context_id = ?", (context_id,))
    return {r["disk_id"]: record(Volume, r) for r in rows}


async def volume_create_of(db: Reader, context_id: str, disk_id: str) -> VolumeCreate | None:
    row = await db.fetchone("SELECT * FROM replication_volume_creates WHERE vm_context_id = ? AND disk_id = ?",
                            (context_id, disk_id))
    return record(VolumeCreate, row) if row is not None else None


async def volume_creates_without_context(db: Reader) -> list[VolumeCreate]:
    """Volumes being created for a VM context that no longer exists."""
    rows = await db.fetchall("SELECT * FROM replication_volume_creates WHERE vm_context_id NOT IN"
                             " (SELECT context_id FROM vm_replication_contexts) ORDER BY created_at")
    return [record(VolumeCreate, r) for r in rows]


async def volume_recorded(db: Reader, volume_id: str) -> bool:
    """Whether a disk of any VM context has that volume recorded as its own."""
    return bool(await db.scalar("SELECT 1 FROM replication_volumes WHERE volume_id = ?", (volume_id,)))


async def volume_name_claimed(db: Reader, volume_name: str, volume_id: str, *, besides: VolumeCreate) -> bool:
    """Whether a recorded volume (that id) or another pending create (that name) stands for that volume."""
    return bool(await db.scalar(
        "SELECT 1 FROM replication_volumes WHERE volume_id = ? UNION ALL SELECT 1 FROM replication_volume_creates"
        " WHERE volume_name = ? AND NOT (vm_context_id = ? AND disk_id = ?) LIMIT 1",
        (volume_id, volume_name, besides.vm_context_id, besides.disk_id)))


async def cbt_of_job(db: Reader, job_id: str) -> list[dict[str, Any]]:
    return await db.fetchall(
        "SELECT disk_id, change_id, previous_change_id, sync_type, bytes_transferred, sync_success, created_at"
        " FROM cbt_history WHERE job_id = ? ORDER BY id", (job_id,))


# -- writing -------------------------------------------------------------------------------------------------


async def create(tx: Writer, new: NewReplication, new_disks: Sequence[NewDisk], now: str) -> None:
    await tx.execute(
        "INSERT INTO replication_jobs (job_id, vm_context_id, vm_name, vm_path, replication_type, status,"
        " ossea_config_id, target_network, schedule_execution_id, vm_group_id, scheduled_by, created_by,"
        " created_at, updated_at, started_at, last_activity_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (new.job_id, new.vm_context_id, new.vm_name, new.vm_path, new.replication_type,
         ReplicationStatus.REPLICATING.value, new.ossea_config_id, new.target_network, new.schedule_execution_id,
         new.vm_group_id, new.scheduled_by, new.created_by, now, now, now, now))
    for d in new_disks:
        await tx.execute(
            "INSERT INTO replication_disks (job_id, disk_id, disk_key, unit_number, capacity_bytes, export_name,"
            " base_change_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (new.job_id, d.disk_id, d.disk_key, d.unit_number, d.capacity_bytes, d.export_name, d.base_change_id))


async def set_disk_volume(tx: Writer, job_id: str, disk_id: str, volume_id: str, *, reset_base: bool) -> None:
    """The disk's volume; `reset_base`: it is new, so this sync offers no change id for it."""
    await tx.execute("UPDATE replication_disks SET volume_id = ?,"
                     " base_change_id = CASE WHEN ? THEN '' ELSE base_change_id END WHERE job_id = ? AND disk_id = ?",
                     (volume_id, int(reset_base), job_id, disk_id))


async def set_ports(tx: Writer, job_id: str, ports: Mapping[str, int]) -> None:
    """Each disk's NBD port, by export name."""
    for export, port in ports.items():
        await tx.execute("UPDATE replication_disks SET nbd_port = ? WHERE job_id = ? AND export_name = ?",
                         (port, job_id, export))


async def record_change_id(tx: Writer, job_id: str, disk_id: str, *, change_id: str, previous_change_id: str | None,
                           mismatch: bool, now: str) -> bool:
    """The VMA reported a disk's new change id; False when the job has no such disk."""
    changed = await tx.execute(
        "UPDATE replication_disks SET change_id = ?, previous_change_id = ?, change_id_mismatch = ?"
        " WHERE job_id = ? AND disk_id = ?", (change_id, previous_change_id, int(mismatch), job_id, disk_id))
    await tx.execute("UPDATE replication_jobs SET last_activity_at = ?, updated_at = ? WHERE job_id = ?",
                     (now, now, job_id))
    return bool(changed)


async def update_progress(db: Database | Tx, job_id: str, *, percent: float, bytes_transferred: int, total_bytes: int,
                          operation: str, vma_status: str, vma_sync_type: str, vma_eta_seconds: int | None,
                          body: Mapping[str, Any], moved: bool, now: str) -> None:
    """The VMA's latest progress; `moved` (bytes or status changed) counts as a sign of life."""
    await db.execute(
        "UPDATE replication_jobs SET progress_percent = ?, bytes_transferred = ?, total_bytes = ?,"
        " current_operation = ?, vma_status = ?, vma_sync_type = ?, vma_eta_seconds = ?, vma_progress = ?,"
        " updated_at = ?, last_activity_at = CASE WHEN ? THEN ? ELSE last_activity_at END"
        " WHERE job_id = ? AND status = ?",
        (percent, bytes_transferred, total_bytes, operation, vma_status, vma_sync_type, vma_eta_seconds,
         json.dumps(dict(body), default=str), now, int(moved), now, job_id, ReplicationStatus.REPLICATING.value))


async def update_settings(tx: Writer, job_id: str, *, target_network: str | None) -> None:
    if target_network is not None:
        await tx.execute("UPDATE replication_jobs SET target_network = ? WHERE job_id = ?", (target_network, job_id))


async def complete(tx: Writer, job_id: str, now: str) -> bool:
    changed = await tx.execute(
        "UPDATE replication_jobs SET status = ?, progress_percent = 100, completed_at = ?, updated_at = ?"
        " WHERE job_id = ? AND status = ?",
        (ReplicationStatus.COMPLETED.value, now, now, job_id, ReplicationStatus.REPLICATING.value))
    return bool(changed)


async def fail(tx: Writer, job_id: str, reason: str, now: str, *, cancelled: bool = False) -> bool:
    status = ReplicationStatus.CANCELLED if cancelled else ReplicationStatus.FAILED
    changed = await tx.execute(
        "UPDATE replication_jobs SET status = ?, error_message = ?, completed_at = ?, updated_at = ?"
        " WHERE job_id = ? AND status = ?", (status.value, reason, now, now, job_id,
                                             ReplicationStatus.REPLICATING.value))
    return bool(changed)


async def delete(tx: Writer, job_id: str) -> None:
    await tx.execute("DELETE FROM cbt_history WHERE job_id = ?", (job_id,))
    await tx.execute("DELETE FROM jobs WHERE id = ?", (job_id,))  # cascades to the replication rows


async def intend_volume(tx: Writer, create: VolumeCreate) -> None:
    """Record, before volume-agent is asked, that a volume of that name is being created for the disk."""
    await tx.execute(
        "INSERT INTO replication_volume_creates (vm_context_id, disk_id, volume_name, job_id, size_bytes, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (vm_context_id, disk_id) DO UPDATE SET"
        " volume_name = excluded.volume_name, job_id = excluded.job_id, size_bytes = excluded.size_bytes,"
        " created_at = excluded.created_at",
        (create.vm_context_id, create.disk_id, create.volume_name, create.job_id, create.size_bytes,
         create.created_at))


async def drop_volume_create(tx: Writer, context_id: str, disk_id: str) -> None:
    """The disk's volume is recorded (save_volume, same transaction) or was removed: nothing is pending for it."""
    await tx.execute("DELETE FROM replication_volume_creates WHERE vm_context_id = ? AND disk_id = ?",
                     (context_id, disk_id))


async def save_volume(tx: Writer, vol: Volume) -> None:
    """Insert or update a disk's volume; its sync stamp is kept only while the volume stays the same one."""
    await tx.execute(
        "INSERT INTO replication_volumes (vm_context_id, disk_id, volume_id, volume_name, size_bytes, device_path,"
        " link_path, created_by_job, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (vm_context_id, disk_id) DO UPDATE SET volume_id = excluded.volume_id,"
        " volume_name = excluded.volume_name, size_bytes = excluded.size_bytes, device_path = excluded.device_path,"
        " link_path = excluded.link_path, created_by_job = excluded.created_by_job, updated_at = excluded.updated_at,"
        " sync_stamp = CASE WHEN replication_volumes.volume_id = excluded.volume_id"
        " THEN replication_volumes.sync_stamp END",
        (vol.vm_context_id, vol.disk_id, vol.volume_id, vol.volume_name, vol.size_bytes, vol.device_path,
         vol.link_path, vol.created_by_job, vol.created_at, vol.updated_at))


async def set_sync_stamp(tx: Writer, context_id: str, disk_id: str, volume_id: str, stamp: str | None,
                         now: str) -> None:
    """The stamp a completed sync left on the disk's volume (None: it could not be written)."""
    await tx.execute("UPDATE replication_volumes SET sync_stamp = ?, updated_at = ?"
                     " WHERE vm_context_id = ? AND disk_id = ? AND volume_id = ?",
                     (stamp, now, context_id, disk_id, volume_id))


async def set_volume_device(tx: Writer, context_id: str, disk_id: str, *, device_path: str | None,
                            link_path: str | None, now: str) -> None:
    await tx.execute("UPDATE replication_volumes SET device_path = ?, link_path = ?, updated_at = ?"
                     " WHERE vm_context_id = ? AND disk_id = ?", (device_path, link_path, now, context_id, disk_id))
