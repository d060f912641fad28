"""The owner of backup_jobs and backup_disks: VM-level backups and their per-disk images.

A backup's status moves only through the transitions here: `create` (pending) → `mark_running` →
`complete` or `fail(reason)`; a copy into another repository is recorded completed at once
(`create_copy`). A disk moves pending → exporting → completed, or failed with its backup.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .base import Reader, get_or_404, record
from .db import Tx

# The only writers of backup_jobs.status and backup_disks.status (tests/omad/test_store_rules.py holds us to it).
TRANSITIONS = ("create", "create_copy", "mark_running", "complete", "fail", "mark_exporting", "complete_disk")


class BackupStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


# The one definition of a backup that is still under way (also the partial index backup_jobs_one_active).
ACTIVE: tuple[BackupStatus, ...] = (BackupStatus.PENDING, BackupStatus.RUNNING)
ENDED: tuple[BackupStatus, ...] = (BackupStatus.COMPLETED, BackupStatus.FAILED)
ACTIVE_PLACEHOLDERS = f"({', '.join('?' * len(ACTIVE))})"


class DiskStatus(enum.StrEnum):
    PENDING = "pending"
    EXPORTING = "exporting"
    COMPLETED = "completed"
    FAILED = "failed"


class VerifyStatus(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class Backup:
    """A row of backup_jobs with its repository's root (where its images are)."""

    backup_id: str
    vm_context_id: str
    vm_name: str
    repository_id: str
    backup_type: str
    parent_backup_id: str | None
    chain_id: str
    status: BackupStatus
    policy_id: str | None
    tags: str  # JSON object, as stored
    bytes_transferred: int
    total_bytes: int
    size_bytes: int
    current_phase: str | None
    progress_percent: float
    transfer_speed_bps: int
    eta_seconds: int | None
    error_message: str | None
    last_activity_at: str | None
    created_by: str
    created_at: str
    started_at: str | None
    completed_at: str | None
    updated_at: str
    copied_from: str | None
    locked_until: str | None
    files_locked: bool
    verify_status: VerifyStatus | None
    verified_at: str | None
    verify_errors: str | None  # JSON [{file, problem}]
    root_path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", BackupStatus(self.status))
        object.__setattr__(self, "files_locked", bool(self.files_locked))
        if self.verify_status is not None:
            object.__setattr__(self, "verify_status", VerifyStatus(self.verify_status))

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def tag_map(self) -> dict[str, Any]:
        return json.loads(self.tags or "{}")  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True)
class BackupDisk:
    """A row of backup_disks: one disk's QCOW2 (its path relative to the repository's root)."""

    backup_id: str
    disk_index: int
    disk_id: str
    capacity_bytes: int
    qcow2_path: str
    backing_file: str | None
    nbd_port: int | None
    nbd_export_name: str | None
    qemu_nbd_pid: int | None
    status: DiskStatus
    change_id: str | None
    previous_change_id: str | None
    bytes_transferred: int
    total_bytes: int
    progress_percent: float
    size_bytes: int | None
    completed_at: str | None
    sha256: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", DiskStatus(self.status))


@dataclasses.dataclass(frozen=True)
class NewDisk:
    """What `create` records of each disk."""

    disk_index: int
    disk_id: str
    capacity_bytes: int
    qcow2_path: str
    backing_file: str | None
    nbd_export_name: str
    previous_change_id: str | None


@dataclasses.dataclass(frozen=True)
class CopiedDisk:
    """What `create_copy` records of each disk of a copy."""

    source: BackupDisk
    qcow2_path: str
    backing_file: str | None
    sha256: str
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class RunningBackup:
    """What the watchdog judges a running backup by."""

    backup_id: str
    created_at: str
    started_at: str | None
    last_activity_at: str | None
    export_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class VmDisk:
    """A disk of a VM as inventory recorded it (read here until inventory's store owner answers it)."""

    disk_id: str
    capacity_bytes: int
    size_gb: int


_SELECT = "SELECT b.*, r.root_path FROM backup_jobs b JOIN backup_repositories r ON r.id = b.repository_id"


def _backup(row: dict[str, Any]) -> Backup:
    return record(Backup, row)


def _disk(row: dict[str, Any]) -> BackupDisk:
    return record(BackupDisk, row)


# -- reading --------------------------------------------------------------------------------------------


async def get(db: Reader, backup_id: str) -> Backup:
    """The backup, or NotFound."""
    return _backup(await get_or_404(db, f"{_SELECT} WHERE b.backup_id = ?", (backup_id,), what="backup",
                                    ident=backup_id))


async def find_one(db: Reader, backup_id: str) -> Backup | None:
    row = await db.fetchone(f"{_SELECT} WHERE b.backup_id = ?", (backup_id,))
    return _backup(row) if row is not None else None


async def exists(db: Reader, backup_id: str) -> bool:
    return bool(await db.scalar("SELECT 1 FROM backup_jobs WHERE backup_id = ?", (backup_id,)))


async def get_status(db: Reader, backup_id: str) -> BackupStatus:
    """The backup's status, or NotFound."""
    row = await get_or_404(db, "SELECT status FROM backup_jobs WHERE backup_id = ?", (backup_id,), what="backup",
                           ident=backup_id)
    return BackupStatus(row["status"])


async def status_of(db: Reader, backup_id: str) -> BackupStatus | None:
    status = await db.scalar("SELECT status FROM backup_jobs WHERE backup_id = ?", (backup_id,))
    return BackupStatus(status) if status is not None else None


async def in_repository(db: Reader, backup_id: str, repository_id: str) -> bool:
    return bool(await db.scalar("SELECT 1 FROM backup_jobs WHERE backup_id = ? AND repository_id = ?",
                                (backup_id, repository_id)))


async def find(db: Reader, *, vm_name: str | None, vm_context_id: str | None, repository_id: str | None,
               backup_type: str | None, status: str | None, limit: int, offset: int) -> tuple[int, list[Backup]]:
    """(how many match, the page of them newest first)."""
    where = ("(? IS NULL OR b.vm_name = ?) AND (? IS NULL OR b.vm_context_id = ?) AND "
             "(? IS NULL OR b.repository_id = ?) AND (? IS NULL OR b.backup_type = ?) AND (? IS NULL OR b.status = ?)")
    params = (vm_name, vm_name, vm_context_id, vm_context_id, repository_id, repository_id, backup_type,
              backup_type, status, status)
    total = await db.scalar(f"SELECT COUNT(*) FROM backup_jobs b WHERE {where}", params)
    rows = await db.fetchall(f"{_SELECT} WHERE {where} ORDER BY b.created_at DESC, b.backup_id DESC LIMIT ? OFFSET ?",
                             (*params, limit, offset))
    return int(total), [_backup(r) for r in rows]


async def active_for_vm(db: Reader, context_id: str) -> Backup | None:
    """The VM's backup under way (at most one: the partial unique index)."""
    row = await db.fetchone(f"{_SELECT} WHERE b.vm_context_id = ? AND b.status IN {ACTIVE_PLACEHOLDERS}",
                            (context_id, *ACTIVE))
    return _backup(row) if row is not None else None


async def latest_completed(db: Reader, context_id: str, repository_id: str) -> Backup | None:
    """The backup an incremental of this VM in this repository continues."""
    row = await db.fetchone(f"{_SELECT} WHERE b.vm_context_id = ? AND b.repository_id = ? AND b.status = ? "
                            "ORDER BY b.completed_at DESC, b.created_at DESC LIMIT 1",
                            (context_id, repository_id, BackupStatus.COMPLETED))
    return _backup(row) if row is not None else None


async def completed_of_vm(db: Reader, context_id: str, repository_id: str | None = None) -> list[Backup]:
    """The VM's completed backups (in one repository, or all), oldest first."""
    rows = await db.fetchall(f"{_SELECT} WHERE b.vm_context_id = ? AND b.status = ? "
                             "AND (? IS NULL OR b.repository_id = ?) ORDER BY b.completed_at, b.created_at",
                             (context_id, BackupStatus.COMPLETED, repository_id, repository_id))
    return [_backup(r) for r in rows]


async def completed_of_policy(db: Reader, policy_id: str) -> list[Backup]:
    """The policy's completed backups, newest first."""
    rows = await db.fetchall(f"{_SELECT} WHERE b.policy_id = ? AND b.status = ? "
                             "ORDER BY b.completed_at DESC, b.created_at DESC", (policy_id, BackupStatus.COMPLETED))
    return [_backup(r) for r in rows]


async def count_of_policy(db: Reader, policy_id: str) -> int:
    return int(await db.scalar("SELECT COUNT(*) FROM backup_jobs WHERE policy_id = ?", (policy_id,)))


async def count_in_repository(db: Reader, repository_id: str) -> int:
    return int(await db.scalar("SELECT COUNT(*) FROM backup_jobs WHERE repository_id = ?", (repository_id,)))


async def dependents(db: Reader, backup_id: str) -> list[str]:
    """Backups whose images are (or are about to be) backed by this one's."""
    rows = await db.fetchall("SELECT backup_id FROM backup_jobs WHERE parent_backup_id = ? AND status != ? "
                             "ORDER BY created_at", (backup_id, BackupStatus.FAILED))
    return [r["backup_id"] for r in rows]


async def parents(db: Reader) -> dict[str, str | None]:
    """Every backup that is not failed, with the backup it is built on."""
    rows = await db.fetchall("SELECT backup_id, parent_backup_id FROM backup_jobs WHERE status != ?",
                             (BackupStatus.FAILED,))
    return {r["backup_id"]: r["parent_backup_id"] for r in rows}


async def lineage(db: Reader, backup_id: str) -> list[Backup]:
    """The backup and every backup it is built on, oldest (the full) first."""
    out: list[Backup] = []
    current: str | None = backup_id
    while current is not None and len(out) < 10000:
        found = await find_one(db, current)
        if found is None:
            break
        out.append(found)
        current = found.parent_backup_id
    out.reverse()
    return out


async def running(db: Reader) -> list[RunningBackup]:
    rows = await db.fetchall(
        "SELECT b.backup_id, b.created_at, b.started_at, b.last_activity_at, "
        "(SELECT group_concat(d.nbd_export_name, char(10)) FROM backup_disks d WHERE d.backup_id = b.backup_id) "
        "AS exports FROM backup_jobs b WHERE b.status = ?", (BackupStatus.RUNNING,))
    return [RunningBackup(r["backup_id"], r["created_at"], r["started_at"], r["last_activity_at"],
                          tuple((r["exports"] or "").split("\n"))) for r in rows]


async def ended_among(db: Reader, backup_ids: Iterable[str]) -> list[str]:
    """Those of the ids whose backups have ended."""
    ids = tuple(backup_ids)
    if not ids:
        return []
    rows = await db.fetchall(f"SELECT backup_id FROM backup_jobs WHERE backup_id IN ({','.join('?' * len(ids))}) "
                             f"AND status IN ({','.join('?' * len(ENDED))})", (*ids, *ENDED))
    return [r["backup_id"] for r in rows]


async def stale_completed(db: Reader, verified_before: str) -> list[str]:
    """Completed backups never verified, or last verified before the time, oldest completion first."""
    rows = await db.fetchall("SELECT backup_id FROM backup_jobs WHERE status = ? AND "
                             "(verified_at IS NULL OR verified_at < ?) ORDER BY completed_at",
                             (BackupStatus.COMPLETED, verified_before))
    return [r["backup_id"] for r in rows]


async def disks(db: Reader, backup_id: str) -> list[BackupDisk]:
    rows = await db.fetchall("SELECT * FROM backup_disks WHERE backup_id = ? ORDER BY disk_index", (backup_id,))
    return [_disk(r) for r in rows]


async def disks_of_completed(db: Reader, context_id: str) -> dict[str, list[BackupDisk]]:
    """The disks of every completed backup of the VM, by backup."""
    rows = await db.fetchall("SELECT d.* FROM backup_disks d JOIN backup_jobs b USING (backup_id) "
                             "WHERE b.vm_context_id = ? AND b.status = ? ORDER BY d.backup_id, d.disk_index",
                             (context_id, BackupStatus.COMPLETED))
    out: dict[str, list[BackupDisk]] = {}
    for r in rows:
        out.setdefault(r["backup_id"], []).append(_disk(r))
    return out


async def disk(db: Reader, backup_id: str, disk_index: int) -> BackupDisk | None:
    row = await db.fetchone("SELECT * FROM backup_disks WHERE backup_id = ? AND disk_index = ?",
                            (backup_id, disk_index))
    return _disk(row) if row is not None else None


async def disk_counts(db: Reader, backup_id: str) -> tuple[int, int]:
    """(disks completed, disks) of the backup."""
    row = await db.fetchone("SELECT COUNT(*) AS total, SUM(status = ?) AS done FROM backup_disks WHERE backup_id = ?",
                            (DiskStatus.COMPLETED, backup_id))
    assert row is not None
    return int(row["done"] or 0), int(row["total"])


async def image_paths(db: Reader, backup_id: str) -> list[Path]:
    """Where the backup's images are (none when it is unknown)."""
    rows = await db.fetchall(
        "SELECT r.root_path, d.qcow2_path FROM backup_disks d JOIN backup_jobs b USING (backup_id) "
        "JOIN backup_repositories r ON r.id = b.repository_id WHERE d.backup_id = ? ORDER BY d.disk_index",
        (backup_id,))
    return [Path(r["root_path"]) / r["qcow2_path"] for r in rows]


async def image_for_restore(db: Reader, backup_id: str, disk_index: int) -> tuple[BackupStatus, Path | None]:
    """The backup's status and the image of one disk (None: no such disk); NotFound when no such backup."""
    row = await get_or_404(db, "SELECT j.status, r.root_path, d.qcow2_path FROM backup_jobs j "
                               "JOIN backup_repositories r ON r.id = j.repository_id "
                               "LEFT JOIN backup_disks d ON d.backup_id = j.backup_id AND d.disk_index = ? "
                               "WHERE j.backup_id = ?", (disk_index, backup_id), what="backup", ident=backup_id)
    path = Path(row["root_path"]) / row["qcow2_path"] if row["qcow2_path"] is not None else None
    return BackupStatus(row["status"]), path


async def latest_change_id(db: Reader, context_id: str, disk_index: int) -> tuple[Backup, str] | None:
    """The newest completed backup of the VM that recorded a change id for the disk, and that change id."""
    row = await db.fetchone("SELECT b.backup_id, d.change_id FROM backup_jobs b JOIN backup_disks d USING "
                            "(backup_id) WHERE b.vm_context_id = ? AND b.status = ? AND d.disk_index = ? AND "
                            "d.change_id IS NOT NULL ORDER BY b.completed_at DESC LIMIT 1",
                            (context_id, BackupStatus.COMPLETED, disk_index))
    if row is None:
        return None
    return await get(db, row["backup_id"]), row["change_id"]


async def id_taken(db: Reader, candidate: str) -> bool:
    """Whether a backup or a job already has the id (a backup's id is also its job's).

    Reads `jobs` here until the jobs table's owner offers the check.
    """
    return bool(await db.scalar("SELECT 1 FROM backup_jobs WHERE backup_id = ? UNION ALL "
                                "SELECT 1 FROM jobs WHERE id = ?", (candidate, candidate)))


async def vm_disks(db: Reader, context_id: str) -> list[VmDisk]:
    """The VM's disks as inventory recorded them (vm_disks is inventory's; read here until its owner does)."""
    rows = await db.fetchall("SELECT disk_id, capacity_bytes, size_gb FROM vm_disks WHERE vm_context_id = ?",
                             (context_id,))
    return [VmDisk(r["disk_id"], int(r["capacity_bytes"] or 0), int(r["size_gb"] or 0)) for r in rows]


# -- the transitions of backup_jobs.status --------------------------------------------------------------


async def create(tx: Tx, *, backup_id: str, vm_context_id: str, vm_name: str, repository_id: str, backup_type: str,
                 parent_backup_id: str | None, chain_id: str, policy_id: str | None, tags: dict[str, Any],
                 created_by: str, now: str, new_disks: Sequence[NewDisk]) -> None:
    """A new backup, pending ("starting"), with its disks pending."""
    await tx.execute(
        "INSERT INTO backup_jobs (backup_id, vm_context_id, vm_name, repository_id, backup_type, parent_backup_id, "
        "chain_id, status, policy_id, tags, created_by, created_at, updated_at, current_phase) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'starting')",
        (backup_id, vm_context_id, vm_name, repository_id, backup_type, parent_backup_id, chain_id,
         BackupStatus.PENDING, policy_id, json.dumps(tags), created_by, now, now))
    for d in new_disks:
        await tx.execute(
            "INSERT INTO backup_disks (backup_id, disk_index, disk_id, capacity_bytes, qcow2_path, backing_file, "
            "nbd_export_name, status, previous_change_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (backup_id, d.disk_index, d.disk_id, d.capacity_bytes, d.qcow2_path, d.backing_file, d.nbd_export_name,
             DiskStatus.PENDING, d.previous_change_id))


async def create_copy(tx: Tx, *, source: Backup, backup_id: str, repository_id: str, parent_backup_id: str | None,
                      chain_id: str, copied_bytes: int, created_by: str, now: str,
                      copied: Sequence[CopiedDisk]) -> None:
    """The copy of `source` in another repository: a backup there, completed, with its disks."""
    await tx.execute(
        "INSERT INTO backup_jobs (backup_id, vm_context_id, vm_name, repository_id, backup_type, parent_backup_id, "
        "chain_id, status, policy_id, tags, bytes_transferred, total_bytes, size_bytes, current_phase, "
        "progress_percent, created_by, created_at, started_at, completed_at, updated_at, copied_from) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'completed', 100, ?, ?, ?, ?, ?, ?)",
        (backup_id, source.vm_context_id, source.vm_name, repository_id, source.backup_type, parent_backup_id,
         chain_id, BackupStatus.COMPLETED, source.policy_id, source.tags, copied_bytes, source.total_bytes,
         sum(c.size_bytes for c in copied), created_by, source.created_at, now, source.completed_at, now,
         source.backup_id))
    for c in copied:
        d = c.source
        await tx.execute(
            "INSERT INTO backup_disks (backup_id, disk_index, disk_id, capacity_bytes, qcow2_path, backing_file, "
            "status, change_id, previous_change_id, bytes_transferred, total_bytes, progress_percent, size_bytes, "
            "completed_at, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 100, ?, ?, ?)",
            (backup_id, d.disk_index, d.disk_id, d.capacity_bytes, c.qcow2_path, c.backing_file,
             DiskStatus.COMPLETED, d.change_id, d.previous_change_id, d.bytes_transferred, d.total_bytes,
             c.size_bytes, now, c.sha256))


async def mark_running(db: Tx, backup_id: str, now: str) -> bool:
    """The VMA accepted the backup; False when it is not pending any more (completions may come first)."""
    return bool(await db.execute(
        "UPDATE backup_jobs SET status = ?, started_at = ?, last_activity_at = ?, updated_at = ?, "
        "current_phase = 'started' WHERE backup_id = ? AND status = ?",
        (BackupStatus.RUNNING, now, now, now, backup_id, BackupStatus.PENDING)))


async def complete(tx: Tx, backup_id: str, *, sizes: dict[int, int], bytes_transferred: int, now: str) -> bool:
    """Every disk is in: record each image's size and the backup completed; False when it had ended."""
    for index, size in sizes.items():
        await tx.execute("UPDATE backup_disks SET size_bytes = ? WHERE backup_id = ? AND disk_index = ?",
                         (size, backup_id, index))
    return bool(await tx.execute(
        "UPDATE backup_jobs SET status = ?, completed_at = ?, updated_at = ?, progress_percent = 100, "
        "current_phase = 'completed', eta_seconds = 0, size_bytes = ?, bytes_transferred = ? "
        f"WHERE backup_id = ? AND status IN {ACTIVE_PLACEHOLDERS}",
        (BackupStatus.COMPLETED, now, now, sum(sizes.values()), bytes_transferred, backup_id, *ACTIVE)))


async def fail(tx: Tx, backup_id: str, reason: str, now: str) -> bool:
    """The backup failed for `reason` (its disks with it); False when it had ended already (nothing changes)."""
    changed = await tx.execute(
        "UPDATE backup_jobs SET status = ?, error_message = ?, completed_at = ?, updated_at = ?, "
        f"current_phase = 'failed' WHERE backup_id = ? AND status IN {ACTIVE_PLACEHOLDERS}",
        (BackupStatus.FAILED, reason, now, now, backup_id, *ACTIVE))
    if changed:
        await tx.execute("UPDATE backup_disks SET status = ? WHERE backup_id = ?", (DiskStatus.FAILED, backup_id))
    return bool(changed)


async def delete(tx: Tx, backup_id: str) -> None:
    """Forget an ended backup (its disks go with it)."""
    await tx.execute("DELETE FROM backup_jobs WHERE backup_id = ?", (backup_id,))


# -- the transitions of backup_disks.status -------------------------------------------------------------


async def set_ports(tx: Tx, backup_id: str, ports: dict[int, int]) -> None:
    """The NBD port of each disk (by index)."""
    for index, port in ports.items():
        await tx.execute("UPDATE backup_disks SET nbd_port = ? WHERE backup_id = ? AND disk_index = ?",
                         (port, backup_id, index))


async def mark_exporting(db: Tx, backup_id: str, disk_index: int, pid: int | None) -> None:
    """The disk's image is exported (qemu-nbd `pid`)."""
    await db.execute("UPDATE backup_disks SET qemu_nbd_pid = ?, status = ? WHERE backup_id = ? AND disk_index = ?",
                     (pid, DiskStatus.EXPORTING, backup_id, disk_index))


async def complete_disk(tx: Tx, backup_id: str, disk_index: int, *, change_id: str, bytes_transferred: int,
                        now: str) -> int:
    """The VMA wrote the disk; returns how many disks of the backup are still to complete."""
    await tx.execute("UPDATE backup_disks SET status = ?, change_id = ?, bytes_transferred = ?, progress_percent = 100, "
                     "completed_at = ? WHERE backup_id = ? AND disk_index = ?",
                     (DiskStatus.COMPLETED, change_id, bytes_transferred, now, backup_id, disk_index))
    await touch(tx, backup_id, now)
    return int(await tx.scalar("SELECT COUNT(*) FROM backup_disks WHERE backup_id = ? AND status != ?",
                               (backup_id, DiskStatus.COMPLETED)))


# -- other columns --------------------------------------------------------------------------------------


async def touch(db: Tx, backup_id: str, now: str) -> None:
    """Something happened to the backup (a completion): it is not idle."""
    await db.execute("UPDATE backup_jobs SET last_activity_at = ?, updated_at = ? WHERE backup_id = ?",
                     (now, now, backup_id))


async def touch_running(db: Tx, backup_id: str, now: str) -> None:
    """A client is connected to one of its exports: a running backup is not idle."""
    await db.execute("UPDATE backup_jobs SET last_activity_at = ? WHERE backup_id = ? AND status = ?",
                     (now, backup_id, BackupStatus.RUNNING))


async def record_progress(tx: Tx, backup_id: str, *, phase: str, bytes_transferred: int, total_bytes: int,
                          transfer_speed_bps: int, eta_seconds: int | None, progress_percent: float,
                          now: str) -> None:
    await tx.execute(
        "UPDATE backup_jobs SET current_phase = ?, bytes_transferred = ?, total_bytes = ?, transfer_speed_bps = ?, "
        "eta_seconds = ?, progress_percent = ?, last_activity_at = ?, updated_at = ? WHERE backup_id = ?",
        (phase, bytes_transferred, total_bytes, transfer_speed_bps, eta_seconds,
         max(0.0, min(100.0, progress_percent)), now, now, backup_id))


async def record_disk_progress(tx: Tx, backup_id: str, disk_index: int, *, bytes_transferred: int,
                               total_bytes: int, progress_percent: float) -> None:
    """A disk's progress, unless it completed already."""
    await tx.execute("UPDATE backup_disks SET bytes_transferred = ?, total_bytes = ?, progress_percent = ? "
                     "WHERE backup_id = ? AND disk_index = ? AND status != ?",
                     (bytes_transferred, total_bytes, max(0.0, min(100.0, progress_percent)), backup_id, disk_index,
                      DiskStatus.COMPLETED))


async def record_checksum(db: Tx, backup_id: str, disk_index: int, sha256: str) -> None:
    """The image's reference checksum, unless one is recorded already."""
    await db.execute("UPDATE backup_disks SET sha256 = ? WHERE backup_id = ? AND disk_index = ? AND sha256 IS NULL",
                     (sha256, backup_id, disk_index))


async def record_verification(db: Tx, backup_id: str, status: VerifyStatus, at: str,
                              errors: list[dict[str, str]]) -> None:
    """The result of a verification: the only writer of verify_status."""
    await db.execute("UPDATE backup_jobs SET verify_status = ?, verified_at = ?, verify_errors = ? WHERE backup_id = ?",
                     (status, at, json.dumps(errors), backup_id))


async def extend_lock(tx: Tx, backup_id: str, until: str) -> None:
    """Hold the backup at least until `until` (a lock never gets shorter)."""
    await tx.execute("UPDATE backup_jobs SET locked_until = ? WHERE backup_id = ? AND "
                     "(locked_until IS NULL OR locked_until < ?)", (until, backup_id, until))


async def set_files_locked(db: Tx, backup_id: str, locked: bool) -> None:
    """Whether the filesystem holds the backup's images immutable too."""
    await db.execute("UPDATE backup_jobs SET files_locked = ? WHERE backup_id = ?", (int(locked), backup_id))


async def detach_policy(tx: Tx, policy_id: str) -> None:
    """The policy is going: its backups stay, under no policy."""
    await tx.execute("UPDATE backup_jobs SET policy_id = NULL WHERE policy_id = ?", (policy_id,))
