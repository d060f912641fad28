"""The owner of backup_policies, backup_copy_rules, backup_copies and prune_runs: what a policy asks for and
what its copies and retention runs did.

A copy's status moves only through `create_copy` (pending) → `start_copy` → `complete_copy` or
`fail_copy(reason)`; a retention run's through `start_run` → `finish_run`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from typing import Any

from . import jobs
from .backups import ACTIVE, ACTIVE_PLACEHOLDERS, BackupStatus, VerifyStatus
from .base import Reader, get_or_404, name_free, record
from .db import Writer

# The only writers of backup_copies.status and prune_runs.status (tests/omad/test_store_rules.py holds us to it);
# mark_job_running writes jobs.status until the jobs table's owner offers that transition.
TRANSITIONS = ("create_copy", "start_copy", "mark_job_running", "complete_copy", "complete_copy_by_chain",
               "fail_copy", "start_run", "finish_run")


class CopyMode(enum.StrEnum):
    IMMEDIATE = "immediate"
    SCHEDULED = "scheduled"


# A copy lives the life of a backup (the same CHECK): pending → running → completed or failed.
CopyStatus = BackupStatus
COPY_ACTIVE = ACTIVE


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class Policy:
    id: str
    name: str
    enabled: bool
    primary_repository_id: str
    retention_days: int
    description: str
    created_by: str
    created_at: str
    updated_at: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "enabled", bool(self.enabled))


@dataclasses.dataclass(frozen=True)
class CopyRule:
    id: str
    policy_id: str
    destination_repository_id: str
    copy_mode: CopyMode
    priority: int
    enabled: bool
    verify_after_copy: bool
    created_at: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "copy_mode", CopyMode(self.copy_mode))
        object.__setattr__(self, "enabled", bool(self.enabled))
        object.__setattr__(self, "verify_after_copy", bool(self.verify_after_copy))


@dataclasses.dataclass(frozen=True)
class NewRule:
    id: str
    destination_repository_id: str
    copy_mode: str
    priority: int
    enabled: bool
    verify_after_copy: bool


@dataclasses.dataclass(frozen=True)
class Copy:
    """A row of backup_copies: a backup copied (or being copied) into another repository."""

    id: str
    source_backup_id: str
    destination_repository_id: str
    copy_backup_id: str | None
    rule_id: str | None
    status: CopyStatus
    verify_after_copy: bool
    verified: bool
    attempts: int
    bytes_copied: int
    progress_percent: float
    error_message: str | None
    created_by: str
    created_at: str
    started_at: str | None
    completed_at: str | None
    updated_at: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", CopyStatus(self.status))
        object.__setattr__(self, "verify_after_copy", bool(self.verify_after_copy))
        object.__setattr__(self, "verified", bool(self.verified))


@dataclasses.dataclass(frozen=True)
class DueCopy:
    """A copy a scheduled rule asks for."""

    rule_id: str
    destination_repository_id: str
    verify_after_copy: bool
    backup_id: str


@dataclasses.dataclass(frozen=True)
class PruneRun:
    """A row of prune_runs (`removed`, `kept`, `errors` as stored JSON)."""

    id: str
    policy_id: str
    dry_run: bool
    triggered_by: str
    as_of: str
    status: RunStatus
    removed: str
    kept: str
    errors: str
    started_at: str
    finished_at: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", RunStatus(self.status))
        object.__setattr__(self, "dry_run", bool(self.dry_run))


# -- policies and their rules ---------------------------------------------------------------------------


async def get(db: Reader, policy_id: str) -> Policy:
    """The policy, or NotFound."""
    return record(Policy, await get_or_404(db, "SELECT * FROM backup_policies WHERE id = ?", (policy_id,),
                                           what="policy", ident=policy_id))


async def find_one(db: Reader, policy_id: str) -> Policy | None:
    row = await db.fetchone("SELECT * FROM backup_policies WHERE id = ?", (policy_id,))
    return record(Policy, row) if row is not None else None


async def ids(db: Reader) -> list[str]:
    """Every policy's id, by name."""
    return [r["id"] for r in await db.fetchall("SELECT id FROM backup_policies ORDER BY name")]


async def with_retention(db: Reader) -> list[str]:
    """The enabled policies that prune (retention_days > 0), by name."""
    return [r["id"] for r in await db.fetchall("SELECT id FROM backup_policies WHERE enabled = 1 AND "
                                               "retention_days > 0 ORDER BY name")]


async def check_name_free(db: Reader, name: str) -> None:
    await name_free(db, "SELECT 1 FROM backup_policies WHERE name = ?", (name,), what="policy", name=name)


async def rules(db: Reader, policy_id: str) -> list[CopyRule]:
    """The policy's copy rules, highest priority first."""
    rows = await db.fetchall("SELECT * FROM backup_copy_rules WHERE policy_id = ? ORDER BY priority DESC, "
                             "created_at, id", (policy_id,))
    return [record(CopyRule, r) for r in rows]


async def immediate_rules(db: Reader, backup_id: str) -> list[CopyRule]:
    """The enabled immediate rules of the enabled policy of a backup (not a copy), highest priority first."""
    rows = await db.fetchall(
        "SELECT r.* FROM backup_jobs b JOIN backup_policies p ON p.id = b.policy_id "
        "JOIN backup_copy_rules r ON r.policy_id = p.id WHERE b.backup_id = ? AND b.copied_from IS NULL "
        "AND p.enabled = 1 AND r.enabled = 1 AND r.copy_mode = ? ORDER BY r.priority DESC, r.id",
        (backup_id, CopyMode.IMMEDIATE))
    return [record(CopyRule, r) for r in rows]


async def create(tx: Writer, *, policy_id: str, name: str, enabled: bool, primary_repository_id: str, retention_days: int,
                 description: str, created_by: str, now: str, new_rules: Sequence[NewRule]) -> None:
    await tx.execute(
        "INSERT INTO backup_policies (id, name, enabled, primary_repository_id, retention_days, description, "
        "created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (policy_id, name, int(enabled), primary_repository_id, retention_days, description, created_by, now, now))
    for r in new_rules:
        await tx.execute(
            "INSERT INTO backup_copy_rules (id, policy_id, destination_repository_id, copy_mode, priority, enabled, "
            "verify_after_copy, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (r.id, policy_id, r.destination_repository_id, CopyMode(r.copy_mode), r.priority, int(r.enabled),
             int(r.verify_after_copy), now))


async def delete(tx: Writer, policy_id: str) -> None:
    """The policy and its rules (its backups must be detached first)."""
    await tx.execute("DELETE FROM backup_policies WHERE id = ?", (policy_id,))


# -- copies ---------------------------------------------------------------------------------------------


def _copy(row: dict[str, Any]) -> Copy:
    return record(Copy, row)


async def get_copy(db: Reader, copy_id: str) -> Copy:
    """The copy, or NotFound."""
    return _copy(await get_or_404(db, "SELECT * FROM backup_copies WHERE id = ?", (copy_id,), what="copy",
                                  ident=copy_id))


async def find_copy(db: Reader, copy_id: str) -> Copy | None:
    row = await db.fetchone("SELECT * FROM backup_copies WHERE id = ?", (copy_id,))
    return _copy(row) if row is not None else None


async def copies_of(db: Reader, backup_id: str) -> list[Copy]:
    """Every copy of the backup (failed tries too), oldest first."""
    rows = await db.fetchall("SELECT * FROM backup_copies WHERE source_backup_id = ? ORDER BY created_at",
                             (backup_id,))
    return [_copy(r) for r in rows]


async def live_copy(db: Reader, backup_id: str, repository_id: str) -> Copy | None:
    """The copy of the backup into the repository that has not failed (at most one: backup_copies_one)."""
    row = await db.fetchone("SELECT * FROM backup_copies WHERE source_backup_id = ? AND destination_repository_id = ? "
                            "AND status != ?", (backup_id, repository_id, CopyStatus.FAILED))
    return _copy(row) if row is not None else None


async def held_copy(db: Reader, backup_id: str, repository_id: str) -> str | None:
    """The id of the repository's completed copy of the backup, if it holds one."""
    return await db.scalar(  # type: ignore[no-any-return]
        "SELECT c.copy_backup_id FROM backup_copies c JOIN backup_jobs b ON b.backup_id = c.copy_backup_id "
        "WHERE c.source_backup_id = ? AND c.destination_repository_id = ? AND c.status = ? AND b.status = ?",
        (backup_id, repository_id, CopyStatus.COMPLETED, BackupStatus.COMPLETED))


async def due_scheduled(db: Reader) -> list[DueCopy]:
    """(rule, backup) pairs the scheduled rules of enabled policies ask for: completed backups of the policy,
    not known bad, that the destination neither holds nor is copying; higher priority, then older, first."""
    rows = await db.fetchall(
        "SELECT r.id AS rule_id, r.destination_repository_id, r.verify_after_copy, b.backup_id "
        "FROM backup_copy_rules r JOIN backup_policies p ON p.id = r.policy_id "
        "JOIN backup_jobs b ON b.policy_id = p.id "
        "WHERE p.enabled = 1 AND r.enabled = 1 AND r.copy_mode = ? AND b.status = ? "
        "AND b.copied_from IS NULL AND b.repository_id != r.destination_repository_id "
        "AND COALESCE(b.verify_status, '') != ? "
        "AND NOT EXISTS (SELECT 1 FROM backup_copies c WHERE c.source_backup_id = b.backup_id "
        "AND c.destination_repository_id = r.destination_repository_id AND c.status != ?) "
        "ORDER BY r.priority DESC, r.id, b.completed_at, b.created_at, b.backup_id",
        (CopyMode.SCHEDULED, BackupStatus.COMPLETED, VerifyStatus.FAILED, CopyStatus.FAILED))
    return [DueCopy(r["rule_id"], r["destination_repository_id"], bool(r["verify_after_copy"]), r["backup_id"])
            for r in rows]


async def create_copy(tx: Writer, *, copy_id: str, source_backup_id: str, repository_id: str, rule_id: str | None,
                      verify_after_copy: bool, created_by: str, now: str) -> None:
    """A copy asked for: pending."""
    await tx.execute(
        "INSERT INTO backup_copies (id, source_backup_id, destination_repository_id, rule_id, status, "
        "verify_after_copy, created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (copy_id, source_backup_id, repository_id, rule_id, CopyStatus.PENDING, int(verify_after_copy), created_by,
         now, now))


async def start_copy(db: Writer, copy_id: str, now: str) -> bool:
    """pending → running: the copy's job got its lock and runs. False when it is no longer pending (a copy of a
    backup above it took it over while it waited: complete_copy_by_chain)."""
    return bool(await db.execute(
        "UPDATE backup_copies SET status = ?, started_at = ?, updated_at = ? WHERE id = ? AND status = ?",
        (CopyStatus.RUNNING, now, now, copy_id, CopyStatus.PENDING)))


async def mark_job_running(db: Writer, job_id: str, now: str) -> None:
    """The copy's row in `jobs` runs too (through the jobs table's own transition)."""
    await jobs.start(db, job_id, now=now)


async def set_attempt(db: Writer, copy_id: str, attempt: int, now: str) -> None:
    await db.execute("UPDATE backup_copies SET attempts = ?, updated_at = ? WHERE id = ?", (attempt, now, copy_id))


async def record_copy_progress(db: Writer, copy_id: str, *, bytes_copied: int, progress_percent: float, now: str) -> None:
    await db.execute("UPDATE backup_copies SET bytes_copied = ?, progress_percent = ?, updated_at = ? WHERE id = ?",
                     (bytes_copied, progress_percent, now, copy_id))


async def complete_copy(tx: Writer, copy_id: str, *, copy_backup_id: str, verified: bool, now: str) -> None:
    """The copy is in place as `copy_backup_id`."""
    await tx.execute("UPDATE backup_copies SET status = ?, copy_backup_id = ?, completed_at = ?, progress_percent = 100, "
                     "updated_at = ?, error_message = NULL, verified = ? WHERE id = ?",
                     (CopyStatus.COMPLETED, copy_backup_id, now, now, int(verified), copy_id))


async def complete_copy_by_chain(tx: Writer, source_backup_id: str, repository_id: str, *, copy_backup_id: str,
                                 verify_after_copy: bool, created_by: str, new_id: str, now: str) -> None:
    """A backup copied because a chain above it needed it: a copy of it still waiting becomes completed (it then
    finds itself done), else the copy is recorded as `new_id`."""
    waiting = await tx.scalar(f"SELECT id FROM backup_copies WHERE source_backup_id = ? AND "
                              f"destination_repository_id = ? AND status IN {ACTIVE_PLACEHOLDERS}",
                              (source_backup_id, repository_id, *COPY_ACTIVE))
    if waiting:
        await tx.execute("UPDATE backup_copies SET status = ?, copy_backup_id = ?, completed_at = ?, "
                         "progress_percent = 100, updated_at = ? WHERE id = ?",
                         (CopyStatus.COMPLETED, copy_backup_id, now, now, waiting))
        return
    await tx.execute(
        "INSERT INTO backup_copies (id, source_backup_id, destination_repository_id, copy_backup_id, status, "
        "verify_after_copy, verified, attempts, created_by, created_at, completed_at, updated_at, progress_percent) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, 100)",
        (new_id, source_backup_id, repository_id, copy_backup_id, CopyStatus.COMPLETED, int(verify_after_copy),
         int(verify_after_copy), created_by, now, now, now))


async def fail_copy(db: Writer, copy_id: str, reason: str, now: str) -> None:
    """The copy failed for `reason` (asked for again, it is a new copy)."""
    await db.execute("UPDATE backup_copies SET status = ?, error_message = ?, completed_at = ?, updated_at = ? "
                     "WHERE id = ?", (CopyStatus.FAILED, reason, now, now, copy_id))


async def forget_copies_into(tx: Writer, copy_backup_id: str) -> None:
    """The copy-backup is deleted: the links that name it go too."""
    await tx.execute("DELETE FROM backup_copies WHERE copy_backup_id = ?", (copy_backup_id,))


# -- retention runs -------------------------------------------------------------------------------------


async def get_run(db: Reader, run_id: str) -> PruneRun:
    """The retention run, or NotFound."""
    return record(PruneRun, await get_or_404(db, "SELECT * FROM prune_runs WHERE id = ?", (run_id,),
                                             what="prune run", ident=run_id))


async def runs_of(db: Reader, policy_id: str, limit: int) -> list[PruneRun]:
    """The policy's runs, newest first."""
    rows = await db.fetchall("SELECT * FROM prune_runs WHERE policy_id = ? ORDER BY started_at DESC, rowid DESC "
                             "LIMIT ?", (policy_id, limit))
    return [record(PruneRun, r) for r in rows]


async def start_run(db: Writer, *, run_id: str, policy_id: str, dry_run: bool, triggered_by: str, as_of: str,
                    now: str) -> None:
    await db.execute("INSERT INTO prune_runs (id, policy_id, dry_run, triggered_by, as_of, status, started_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (run_id, policy_id, int(dry_run), triggered_by, as_of, RunStatus.RUNNING, now))


async def finish_run(db: Writer, run_id: str, *, removed: list[str], kept: list[dict[str, str]],
                     errors: list[dict[str, Any]], now: str) -> RunStatus:
    """The run is over: failed when any removal was refused, else completed."""
    status = RunStatus.FAILED if errors else RunStatus.COMPLETED
    await db.execute("UPDATE prune_runs SET status = ?, removed = ?, kept = ?, errors = ?, finished_at = ? WHERE id = ?",
                     (status, json.dumps(removed), json.dumps(kept), json.dumps(errors, default=str), now, run_id))
    return status
