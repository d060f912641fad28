"""In-process policy services on one database, for the copy and verification tests: real QCOW2 chains in
local repositories (directories), real qemu-img and LocalFs, a fake clock. No daemons, no VMA."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from omad.adapters.localfs import LocalFs
from omad.adapters.qemu_img import QemuImg
from omad.audit import Audit
from omad.backup.copies import Copies
from omad.backup.immutability import Immutability
from omad.backup.repositories import Repositories
from omad.backup.verify import Verifier
from omad.config import PolicyConfig
from omad.jobs.engine import JobEngine
from omad.jobs.locks import KeyedLocks
from omad.schedule.clock import iso
from omad.store.db import Database

from ..lib.scheduling import FakeClock, add_contexts

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


@dataclasses.dataclass
class PolicyRig:
    db: Database
    tmp: Path
    clock: FakeClock
    fs: LocalFs
    cfg: PolicyConfig
    jobs: JobEngine
    verifier: Verifier
    copies: Copies
    ctx: str = ""

    @classmethod
    async def build(cls, db: Database, tmp: Path, *, fs: LocalFs | None = None, clock: FakeClock | None = None,
                    cfg: PolicyConfig | None = None) -> PolicyRig:
        fs = fs or LocalFs()
        clock = clock or FakeClock(T0)
        cfg = cfg or PolicyConfig()
        audit, jobs, qemu_img = Audit(db), JobEngine(db), QemuImg()
        # Local repositories only: neither the secret box nor volume-agent (mounts, chattr) is needed.
        repositories = Repositories(db, audit, cast(Any, None), fs, cast(Any, None))
        immutability = Immutability(db, audit, cast(Any, None), fs, clock)
        verifier = Verifier(db, jobs, qemu_img, fs, clock, cfg)
        copies = Copies(db, audit, jobs, KeyedLocks(), qemu_img, fs, repositories, verifier, immutability, clock,
                        cfg)
        rig = cls(db, tmp, clock, fs, cfg, jobs, verifier, copies)
        rig.ctx = (await add_contexts(db, ["vm"]))["vm"]
        return rig

    async def repo(self, repo_id: str, *, enabled: bool = True) -> Path:
        root = self.tmp / repo_id
        root.mkdir()
        now = iso(T0)
        await self.db.execute("INSERT INTO backup_repositories (id, name, type, config, root_path, enabled, "
                              "created_at, updated_at) VALUES (?, ?, 'local', ?, ?, ?, ?, ?)",
                              (repo_id, repo_id, f'{{"disk_path": "{root}"}}', str(root), int(enabled), now, now))
        return root

    async def policy(self, policy_id: str, primary: str, rules: list[dict[str, Any]], *,
                     enabled: bool = True) -> None:
        now = iso(T0)
        await self.db.execute("INSERT INTO backup_policies (id, name, enabled, primary_repository_id, retention_days, "
                              "created_at, updated_at) VALUES (?, ?, ?, ?, 0, ?, ?)",
                              (policy_id, policy_id, int(enabled), primary, now, now))
        for i, r in enumerate(rules):
            await self.db.execute(
                "INSERT INTO backup_copy_rules (id, policy_id, destination_repository_id, copy_mode, priority, "
                "enabled, verify_after_copy, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (r.get("id", f"rule-{policy_id}-{i}"), policy_id, r["destination_repository_id"],
                 r.get("copy_mode", "scheduled"), r.get("priority", 0), int(r.get("enabled", True)),
                 int(r.get("verify_after_copy", True)), now))

    async def backup(self, name: str, repo_id: str, *, day: float = 0, parent: str | None = None,
                     chain: str | None = None, policy: str | None = None, verified_at: str | None = None) -> str:
        """A completed one-disk backup `day` days after T0; its image a real qcow2 (an overlay of the parent's)
        with some data of its own, its sha256 recorded."""
        root = self.tmp / repo_id
        (root / self.ctx).mkdir(exist_ok=True)
        rel = f"{self.ctx}/{name}-disk-2000.qcow2"
        backing = f"{parent}-disk-2000.qcow2" if parent else None
        argv = ["qemu-img", "create", "-q", "-f", "qcow2"] + (["-b", backing, "-F", "qcow2"] if backing else [])
        subprocess.run(argv + [str(root / rel), "1M"], check=True, timeout=30)
        n = int(day) % 200
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {n + 1} {n * 4096} 4096", str(root / rel)],
                       check=True, capture_output=True, timeout=30)
        when = iso(T0 + timedelta(days=day))
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO backup_jobs (backup_id, vm_context_id, vm_name, repository_id, backup_type, "
                "parent_backup_id, chain_id, status, policy_id, created_at, completed_at, updated_at, verified_at, "
                "verify_status) VALUES (?, ?, 'vm', ?, ?, ?, ?, 'completed', ?, ?, ?, ?, ?, ?)",
                (name, self.ctx, repo_id, "incremental" if parent else "full", parent, chain or parent or name,
                 policy, when, when, when, verified_at, "ok" if verified_at else None))
            await tx.execute("INSERT INTO backup_disks (backup_id, disk_index, disk_id, capacity_bytes, qcow2_path, "
                             "backing_file, status, sha256) VALUES (?, 0, 'disk-2000', 1048576, ?, ?, 'completed', ?)",
                             (name, rel, backing, await self.fs.sha256(root / rel)))
        return name

    def image(self, repo_id: str, backup_id: str) -> Path:
        return self.tmp / repo_id / self.ctx / f"{backup_id}-disk-2000.qcow2"

    async def copy_rows(self, **where: Any) -> list[dict[str, Any]]:
        cond = " AND ".join(f"{k} = ?" for k in where) or "1"
        return await self.db.fetchall(f"SELECT * FROM backup_copies WHERE {cond} ORDER BY rowid",
                                      tuple(where.values()))

    async def settle(self, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until no copy is pending or running; returns every copy row."""
        deadline = time.monotonic() + timeout
        while await self.db.scalar("SELECT COUNT(*) FROM backup_copies WHERE status IN ('pending', 'running')"):
            assert time.monotonic() < deadline, await self.copy_rows()
            await asyncio.sleep(0.02)
        return await self.copy_rows()


def same_content(a: Path, b: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(a), str(b)],
                       capture_output=True, text=True, timeout=120)
    return r.returncode == 0
