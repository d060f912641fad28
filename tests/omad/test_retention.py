"""Retention with a fake clock, on real QCOW2 chains: exactly the expected backups are pruned (dry run first),
a backup a kept incremental is built on stays, a locked one stays, and every remaining chain verifies."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest

from omad.adapters.localfs import LocalFs
from omad.adapters.qemu_img import QemuImg
from omad.audit import Audit
from omad.backup.backups import Backups
from omad.backup.immutability import Immutability
from omad.backup.retention import Retention
from omad.backup.verify import Verifier
from omad.config import BackupConfig, PolicyConfig
from omad.jobs.engine import JobEngine
from omad.jobs.locks import KeyedLocks
from omad.schedule.clock import iso
from omad.store.db import Database

from ..lib.scheduling import FakeClock, add_contexts

pytestmark = pytest.mark.timeout(120)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


async def seed(db: Database, fs: LocalFs, root: Path, ctx: str, name: str, day: int, parent: str | None,
               chain: str | None, policy: str | None) -> str:
    """A completed one-disk backup `day` days after T0, its image a real qcow2 (an overlay of the parent's)."""
    (root / ctx).mkdir(exist_ok=True)
    rel = f"{ctx}/{name}-disk-2000.qcow2"
    backing = f"{parent}-disk-2000.qcow2" if parent else None
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"] + (["-b", backing, "-F", "qcow2"] if backing else [])
    subprocess.run(argv + [str(root / rel), "1M"], check=True, timeout=30)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {day + 1} {day * 4096} 4096", str(root / rel)],
                   check=True, capture_output=True, timeout=30)
    when = iso(T0 + timedelta(days=day))
    async with db.transaction() as tx:
        await tx.execute(
            "INSERT INTO backup_jobs (backup_id, vm_context_id, vm_name, repository_id, backup_type, parent_backup_id, "
            "chain_id, status, policy_id, created_at, completed_at, updated_at) VALUES (?, ?, 'vm', 'repo-1', ?, ?, ?, "
            "'completed', ?, ?, ?, ?)", (name, ctx, "incremental" if parent else "full", parent, chain or name, policy,
                                         when, when, when))
        await tx.execute("INSERT INTO backup_disks (backup_id, disk_index, disk_id, capacity_bytes, qcow2_path, "
                         "backing_file, status, sha256) VALUES (?, 0, 'disk-2000', 1048576, ?, ?, 'completed', ?)",
                         (name, rel, backing, await fs.sha256(root / rel)))
    return name


async def test_retention_prunes_exactly_the_expired_backups_and_keeps_chains(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    now = iso(T0)
    await db.execute("INSERT INTO backup_repositories (id, name, type, config, root_path, created_at, updated_at) "
                     "VALUES ('repo-1', 'r', 'local', '{}', ?, ?, ?)", (str(root), now, now))
    await db.execute("INSERT INTO backup_policies (id, name, primary_repository_id, retention_days, created_at, "
                     "updated_at) VALUES ('pol-1', 'p', 'repo-1', 10, ?, ?)", (now, now))
    ctx = (await add_contexts(db, ["vm"]))["vm"]
    fs, qemu_img, clock = LocalFs(), QemuImg(), FakeClock(T0)
    audit, jobs = Audit(db), JobEngine(db)
    immutability = Immutability(db, audit, cast(Any, None), fs, clock)
    backups = Backups(db, audit, jobs, KeyedLocks(), *cast(Any, [None] * 5), qemu_img, fs, cast(Any, None),
                      BackupConfig(), immutability)
    retention = Retention(db, audit, backups, clock, interval_seconds=3600)
    verifier = Verifier(db, jobs, qemu_img, fs, clock, PolicyConfig())

    # Chain A: full day 0, incs day 1, 2. Chain B: full day 5, inc day 6, inc day 20.
    # Chain C: full day 3 (locked until day 40). A backup outside the policy built on chain A's last: day 4.
    a0 = await seed(db, fs, root, ctx, "a0", 0, None, None, "pol-1")
    a1 = await seed(db, fs, root, ctx, "a1", 1, a0, a0, "pol-1")
    a2 = await seed(db, fs, root, ctx, "a2", 2, a1, a0, "pol-1")
    b0 = await seed(db, fs, root, ctx, "b0", 5, None, None, "pol-1")
    b1 = await seed(db, fs, root, ctx, "b1", 6, b0, b0, "pol-1")
    b2 = await seed(db, fs, root, ctx, "b2", 20, b1, b0, "pol-1")
    c0 = await seed(db, fs, root, ctx, "c0", 3, None, None, "pol-1")
    d0 = await seed(db, fs, root, ctx, "d0", 7, None, None, "pol-1")
    x = await seed(db, fs, root, ctx, "x", 4, d0, d0, None)
    await db.execute("UPDATE backup_jobs SET locked_until = ? WHERE backup_id = ?", (iso(T0 + timedelta(days=40)), c0))

    clock.set(T0 + timedelta(days=25))  # cutoff: day 15 — all but b2 are past retention
    dry = await retention.prune("pol-1", dry_run=True, actor="test")
    assert dry["dry_run"] and dry["status"] == "completed"
    assert dry["removed"] == [a2, a1, a0]  # newest first, children before parents
    kept = {k["backup_id"]: k["reason"] for k in dry["kept"]}
    assert set(kept) == {b0, b1, b2, c0, d0}
    assert "within" in kept[b2] and "b2 is built on it" == kept[b1] and "b1 is built on it" == kept[b0]
    assert "locked" in kept[c0] and kept[d0] == "x is built on it"
    assert await db.scalar("SELECT COUNT(*) FROM backup_jobs") == 9  # a dry run removes nothing

    run = await retention.prune("pol-1", dry_run=False, actor="test")
    assert run["removed"] == [a2, a1, a0] and run["errors"] == [] and not run["dry_run"]
    left = {r["backup_id"] for r in await db.fetchall("SELECT backup_id FROM backup_jobs")}
    assert left == {b0, b1, b2, c0, d0, x}
    assert not (root / ctx / "a0-disk-2000.qcow2").exists()
    for bid in left:  # every remaining chain is whole and readable
        found, _ = await verifier.problems(bid)
        assert found == [], (bid, found)
    runs = await retention.runs("pol-1")
    assert [r["run_id"] for r in runs["runs"]] == [run["run_id"], dry["run_id"]]

    # The scheduled service, on the fake clock: on day 41 (cutoff day 31) chain B has aged out too, and c0's
    # lock has ended; d0 stays for x (outside the policy) built on it.
    await retention.start()
    try:
        await asyncio.sleep(0.01)  # the service is asleep on the clock
        clock.set(T0 + timedelta(days=41))
        for _ in range(50):
            runs = (await retention.runs("pol-1"))["runs"]
            if len(runs) == 3 and runs[0]["status"] != "running":
                break
            await asyncio.sleep(0.02)
        last = (await retention.runs("pol-1"))["runs"][0]
        assert last["triggered_by"] == "retention" and last["removed"] == [b2, b1, b0, c0], last
    finally:
        await retention.stop()
    # Runs someone asked for are in the audit trail, dry or not; a scheduled one when it removed something.
    await retention.prune_all()  # nothing left to remove: no entry
    audit = await db.fetchall("SELECT actor, resource, details FROM audit_log WHERE action = 'policy.prune' "
                              "ORDER BY id")
    assert [(r["actor"], r["resource"], json.loads(r["details"])["run_id"]) for r in audit] == [
        ("test", "policy:pol-1", dry["run_id"]), ("test", "policy:pol-1", run["run_id"]),
        ("retention", "policy:pol-1", last["run_id"])]
    assert json.loads(audit[2]["details"])["removed"] == [b2, b1, b0, c0]
