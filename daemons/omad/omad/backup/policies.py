"""Backup policies: a primary repository, a retention, and 3-2-1 copy rules into other repositories.

A rule never targets the primary, and a policy names each destination once. A backup started with a policy
must go to the policy's primary repository; when it completes, the policy's immediate rules copy it.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound

from ..audit import Audit
from ..store.db import Database, Tx, utcnow

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Rule:
    destination_repository_id: str
    copy_mode: str = "immediate"
    priority: int = 0
    enabled: bool = True
    verify_after_copy: bool = True


@dataclasses.dataclass
class PolicySpec:
    name: str
    primary_repository_id: str
    retention_days: int
    enabled: bool = True
    description: str = ""
    copy_rules: list[Rule] = dataclasses.field(default_factory=list)


def _rule(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "destination_repository_id": r["destination_repository_id"], "copy_mode": r["copy_mode"],
            "priority": r["priority"], "enabled": bool(r["enabled"]), "verify_after_copy": bool(r["verify_after_copy"]),
            "created_at": r["created_at"]}


class Policies:
    def __init__(self, db: Database, audit: Audit) -> None:
        self.db = db
        self.audit = audit

    async def create(self, spec: PolicySpec, *, actor: str) -> dict[str, Any]:
        pid = f"pol-{secrets.token_hex(6)}"
        now = utcnow()
        async with self.db.transaction() as tx:
            await self._validate(tx, spec)
            await tx.execute(
                "INSERT INTO backup_policies (id, name, enabled, primary_repository_id, retention_days, description, "
                "created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pid, spec.name, int(spec.enabled), spec.primary_repository_id, spec.retention_days, spec.description,
                 actor, now, now))
            for r in spec.copy_rules:
                await tx.execute(
                    "INSERT INTO backup_copy_rules (id, policy_id, destination_repository_id, copy_mode, priority, "
                    "enabled, verify_after_copy, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (f"rule-{secrets.token_hex(6)}", pid, r.destination_repository_id, r.copy_mode, r.priority,
                     int(r.enabled), int(r.verify_after_copy), now))
            await self.audit.record(actor, "policy.create", f"policy:{pid}", tx=tx, name=spec.name,
                                    rules=len(spec.copy_rules))
        log.info("policy %s created with %d copy rule(s)", spec.name, len(spec.copy_rules), extra={"resource": pid})
        return await self.get(pid)

    async def _validate(self, tx: Tx, spec: PolicySpec) -> None:
        if await tx.scalar("SELECT 1 FROM backup_policies WHERE name = ?", (spec.name,)):
            raise Conflict("policy exists", f"a backup policy named {spec.name!r} already exists")
        await self._repository(tx, spec.primary_repository_id, "primary_repository_id")
        seen: set[str] = set()
        for i, r in enumerate(spec.copy_rules):
            where = f"copy_rules[{i}].destination_repository_id"
            await self._repository(tx, r.destination_repository_id, where)
            if r.destination_repository_id == spec.primary_repository_id:
                raise Invalid("copy targets the primary", f"{where}: a copy never goes to the primary repository")
            if r.destination_repository_id in seen:
                raise Invalid("duplicate destination", f"{where}: repository {r.destination_repository_id} is "
                                                       "already a destination of this policy")
            seen.add(r.destination_repository_id)

    @staticmethod
    async def _repository(tx: Tx, repo_id: str, where: str) -> None:
        if not await tx.scalar("SELECT 1 FROM backup_repositories WHERE id = ?", (repo_id,)):
            raise Invalid("repository not found", f"{where}: backup repository {repo_id!r} does not exist")

    async def list(self) -> dict[str, Any]:
        rows = await self.db.fetchall("SELECT id FROM backup_policies ORDER BY name")
        items = [await self.get(r["id"]) for r in rows]
        return {"policies": items, "count": len(items)}

    async def get(self, policy_id: str) -> dict[str, Any]:
        row = await self.db.fetchone("SELECT * FROM backup_policies WHERE id = ?", (policy_id,))
        if row is None:
            raise NotFound("policy not found", f"backup policy {policy_id!r} does not exist")
        rules = await self.db.fetchall("SELECT * FROM backup_copy_rules WHERE policy_id = ? "
                                       "ORDER BY priority DESC, created_at, id", (policy_id,))
        count = await self.db.scalar("SELECT COUNT(*) FROM backup_jobs WHERE policy_id = ?", (policy_id,))
        return {"id": row["id"], "name": row["name"], "enabled": bool(row["enabled"]),
                "primary_repository_id": row["primary_repository_id"], "retention_days": row["retention_days"],
                "description": row["description"], "copy_rules": [_rule(r) for r in rules],
                "backup_count": int(count), "created_by": row["created_by"], "created_at": row["created_at"],
                "updated_at": row["updated_at"]}

    async def delete(self, policy_id: str, *, actor: str) -> dict[str, Any]:
        """Delete a policy and its rules; its backups stay (no longer pruned or copied by it)."""
        async with self.db.transaction() as tx:
            row = await tx.fetchone("SELECT name FROM backup_policies WHERE id = ?", (policy_id,))
            if row is None:
                raise NotFound("policy not found", f"backup policy {policy_id!r} does not exist")
            await tx.execute("UPDATE backup_jobs SET policy_id = NULL WHERE policy_id = ?", (policy_id,))
            await tx.execute("DELETE FROM backup_policies WHERE id = ?", (policy_id,))
            await self.audit.record(actor, "policy.delete", f"policy:{policy_id}", tx=tx, name=row["name"])
        return {"message": f"policy {row['name']!r} deleted", "policy_id": policy_id}
