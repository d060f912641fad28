"""The owners of the backup tables: status transitions on a real migrated database, and nobody else writing
those tables or their status columns."""

from __future__ import annotations

import ast
import re
import sqlite3
from pathlib import Path

import pytest

from oma_common.errors import Conflict, NotFound
from omad.store import backups, policies, repositories
from omad.store.backups import BackupStatus, DiskStatus, NewDisk
from omad.store.db import Database
from omad.store.policies import CopyStatus, RunStatus

from ..lib.scheduling import add_contexts

NOW = "2025-03-01T12:00:00.000Z"
LATER = "2025-03-01T12:05:00.000Z"
OMAD = Path(__file__).resolve().parents[2] / "daemons" / "omad" / "omad"


@pytest.fixture
async def ctx(db: Database, tmp_path: Path) -> str:
    """One VM context and one local repository ("repo-1")."""
    context = (await add_contexts(db, ["vm"]))["vm"]
    async with db.transaction() as tx:
        await repositories.create(tx, repository("repo-1", "one", tmp_path / "repo"))
    return context


def repository(repo_id: str, name: str, root: Path) -> repositories.Repository:
    return repositories.Repository(
        id=repo_id, name=name, type="local", enabled=True, config="{}", secret_sealed=None, root_path=str(root),
        is_immutable=False, min_retention_days=0, description="", created_by="test", created_at=NOW, updated_at=NOW,
        total_bytes=10, used_bytes=1, available_bytes=9, last_check_at=NOW, last_check_error=None)


async def new_backup(db: Database, ctx: str, backup_id: str, disks: int = 2) -> None:
    async with db.transaction() as tx:
        await backups.create(
            tx, backup_id=backup_id, vm_context_id=ctx, vm_name="vm", repository_id="repo-1", backup_type="full",
            parent_backup_id=None, chain_id=backup_id, policy_id=None, tags={"k": "v"}, created_by="test", now=NOW,
            new_disks=[NewDisk(i, f"disk-{2000 + i}", 1 << 20, f"{ctx}/{backup_id}-disk-{2000 + i}.qcow2", None,
                               f"{backup_id}-disk-{2000 + i}", None) for i in range(disks)])


async def complete_all(db: Database, backup_id: str) -> bool:
    async with db.transaction() as tx:
        for d in await backups.disks(tx, backup_id):
            await backups.complete_disk(tx, backup_id, d.disk_index, change_id=f"c{d.disk_index}",
                                        bytes_transferred=100, now=LATER)
        return await backups.complete(tx, backup_id, sizes={0: 4096, 1: 8192}, bytes_transferred=200, now=LATER)


async def test_a_backup_runs_and_completes_and_then_cannot_be_failed(db: Database, ctx: str) -> None:
    await new_backup(db, ctx, "b1")
    b = await backups.get(db, "b1")
    assert b.status is BackupStatus.PENDING and b.active and b.tag_map() == {"k": "v"}
    assert [d.status for d in await backups.disks(db, "b1")] == [DiskStatus.PENDING] * 2

    assert await backups.mark_running(db, "b1", NOW)
    assert not await backups.mark_running(db, "b1", NOW)  # only a pending backup starts running
    await backups.mark_exporting(db, "b1", 0, 4242)
    assert (await backups.disk(db, "b1", 0)).status is DiskStatus.EXPORTING  # type: ignore[union-attr]

    async with db.transaction() as tx:
        left = await backups.complete_disk(tx, "b1", 0, change_id="c0", bytes_transferred=100, now=LATER)
    assert left == 1 and await backups.disk_counts(db, "b1") == (1, 2)
    assert await complete_all(db, "b1")
    b = await backups.get(db, "b1")
    assert (b.status, b.size_bytes, b.bytes_transferred, b.completed_at) == (BackupStatus.COMPLETED, 12288, 200,
                                                                             LATER)
    assert [d.size_bytes for d in await backups.disks(db, "b1")] == [4096, 8192]

    async with db.transaction() as tx:
        assert not await backups.fail(tx, "b1", "too late", LATER)
    b = await backups.get(db, "b1")
    assert b.status is BackupStatus.COMPLETED and b.error_message is None
    assert {d.status for d in await backups.disks(db, "b1")} == {DiskStatus.COMPLETED}
    assert not await backups.mark_running(db, "b1", LATER)
    assert await backups.active_for_vm(db, ctx) is None
    assert [x.backup_id for x in await backups.completed_of_vm(db, ctx)] == ["b1"]


async def test_fail_records_the_reason_once_and_frees_the_vm(db: Database, ctx: str) -> None:
    await new_backup(db, ctx, "b1")
    assert (await backups.active_for_vm(db, ctx)).backup_id == "b1"  # type: ignore[union-attr]
    async with db.transaction() as tx:
        assert await backups.fail(tx, "b1", "the VMA went away", LATER)
    b = await backups.get(db, "b1")
    assert (b.status, b.error_message, b.completed_at, b.current_phase) == (
        BackupStatus.FAILED, "the VMA went away", LATER, "failed")
    assert {d.status for d in await backups.disks(db, "b1")} == {DiskStatus.FAILED}

    async with db.transaction() as tx:  # failing again changes nothing, completing neither
        assert not await backups.fail(tx, "b1", "second reason", NOW)
    assert not await complete_all(db, "b1")
    assert (await backups.get(db, "b1")).error_message == "the VMA went away"
    assert await backups.get_status(db, "b1") is BackupStatus.FAILED

    # Nothing active: the VM may start again. A failed backup holds nobody's chain.
    assert await backups.active_for_vm(db, ctx) is None
    await new_backup(db, ctx, "b2")
    assert (await backups.active_for_vm(db, ctx)).backup_id == "b2"  # type: ignore[union-attr]
    assert await backups.dependents(db, "b1") == []


async def test_the_database_allows_one_active_backup_per_vm(db: Database, ctx: str) -> None:
    await new_backup(db, ctx, "b1")
    with pytest.raises(sqlite3.IntegrityError):
        await new_backup(db, ctx, "b2")
    assert not await backups.exists(db, "b2")  # the transaction left nothing behind


async def test_lookups_answer_404_and_409(db: Database, ctx: str) -> None:
    with pytest.raises(NotFound, match="backup not found"):
        await backups.get(db, "nope")
    with pytest.raises(NotFound):
        await backups.get_status(db, "nope")
    assert await backups.status_of(db, "nope") is None
    with pytest.raises(NotFound, match="repository not found"):
        await repositories.get(db, "repo-nope")
    with pytest.raises(NotFound, match="policy not found"):
        await policies.get(db, "pol-nope")
    with pytest.raises(NotFound, match="copy not found"):
        await policies.get_copy(db, "copy-nope")
    with pytest.raises(Conflict, match="repository exists"):
        await repositories.check_name_free(db, "one")
    await repositories.check_name_free(db, "two")
    assert (await repositories.get(db, "repo-1")).enabled is True  # a record as written, flags as bools


async def test_a_copy_fails_with_its_reason_and_may_be_asked_for_again(db: Database, ctx: str,
                                                                       tmp_path: Path) -> None:
    await new_backup(db, ctx, "b1")
    assert await complete_all(db, "b1")
    async with db.transaction() as tx:
        await repositories.create(tx, repository("repo-2", "two", tmp_path / "repo2"))
        await policies.create_copy(tx, copy_id="copy-1", source_backup_id="b1", repository_id="repo-2",
                                   rule_id=None, verify_after_copy=True, created_by="test", now=NOW)
    assert (await policies.get_copy(db, "copy-1")).status is CopyStatus.PENDING
    await policies.start_copy(db, "copy-1", NOW)
    await policies.set_attempt(db, "copy-1", 2, NOW)
    await policies.fail_copy(db, "copy-1", "destination full", LATER)
    c = await policies.get_copy(db, "copy-1")
    assert (c.status, c.error_message, c.attempts, c.completed_at) == (CopyStatus.FAILED, "destination full", 2, LATER)
    assert await policies.live_copy(db, "b1", "repo-2") is None

    async with db.transaction() as tx:  # a failed copy is history: a new one may run
        await policies.create_copy(tx, copy_id="copy-2", source_backup_id="b1", repository_id="repo-2",
                                   rule_id=None, verify_after_copy=False, created_by="test", now=NOW)
        with pytest.raises(sqlite3.IntegrityError):  # but only one live copy per destination
            await policies.create_copy(tx, copy_id="copy-3", source_backup_id="b1", repository_id="repo-2",
                                       rule_id=None, verify_after_copy=False, created_by="test", now=NOW)
    assert (await policies.live_copy(db, "b1", "repo-2")).id == "copy-2"  # type: ignore[union-attr]
    assert [c.id for c in await policies.copies_of(db, "b1")] == ["copy-1", "copy-2"]


async def test_a_prune_run_fails_when_a_removal_was_refused(db: Database, ctx: str) -> None:
    async with db.transaction() as tx:
        await policies.create(tx, policy_id="pol-1", name="p", enabled=True, primary_repository_id="repo-1",
                              retention_days=7, description="", created_by="test", now=NOW, new_rules=[])
    for run_id, errors in (("prune-a", []), ("prune-b", [{"backup_id": "b9", "error": "locked"}])):
        await policies.start_run(db, run_id=run_id, policy_id="pol-1", dry_run=False, triggered_by="test",
                                 as_of=NOW, now=NOW)
        assert (await policies.get_run(db, run_id)).status is RunStatus.RUNNING
        await policies.finish_run(db, run_id, removed=[], kept=[], errors=errors, now=LATER)
    assert (await policies.get_run(db, "prune-a")).status is RunStatus.COMPLETED
    b = await policies.get_run(db, "prune-b")
    assert b.status is RunStatus.FAILED and b.finished_at == LATER and "locked" in b.errors


# -- ownership: SQL on the backup tables lives in store/, and a status changes only in its transitions ----

_TABLES = r"(backup_jobs|backup_disks|backup_repositories|backup_policies|backup_copy_rules|backup_copies|prune_runs)"
_SQL_ON_TABLES = re.compile(rf"\b(FROM|INTO|UPDATE|JOIN)\s+{_TABLES}\b")
_STATUS_WRITE = re.compile(r"UPDATE\s+(\w+)\s+SET\b(?:(?!\bWHERE\b)[^;])*?\bstatus\s*=")  # in the SET list

# The transitions: the only functions that write each status column.
TRANSITIONS = {
    "backup_jobs": {"mark_running", "complete", "fail"},
    "backup_disks": {"mark_exporting", "complete_disk", "fail"},
    "backup_copies": {"start_copy", "complete_copy", "complete_copy_by_chain", "fail_copy"},
    "prune_runs": {"finish_run"},
}


def _strings(node: ast.AST) -> list[str]:
    """The string literals under `node`, an f-string's pieces joined around its placeholders."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.append(n.value)
        elif isinstance(n, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in n.values))
    return out


def test_no_module_outside_store_holds_sql_on_the_backup_tables() -> None:
    offenders = []
    for path in OMAD.rglob("*.py"):
        if path.parent.name == "store":
            continue
        for text in _strings(ast.parse(path.read_text())):
            if _SQL_ON_TABLES.search(text):
                offenders.append(f"{path.relative_to(OMAD)}: {text[:80]}")
    assert offenders == []


def test_backup_statuses_are_written_only_by_their_transitions() -> None:
    writers: dict[str, set[str]] = {}
    for path in (OMAD / "store").glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.AsyncFunctionDef | ast.FunctionDef):
                for text in _strings(fn):
                    for m in _STATUS_WRITE.finditer(text):
                        writers.setdefault(m.group(1), set()).add(fn.name)
    assert {t: writers.get(t, set()) for t in TRANSITIONS} == TRANSITIONS
