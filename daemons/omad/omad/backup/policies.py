"""Backup policies: a primary repository, a retention, and 3-2-1 copy rules into other repositories.

A rule never targets the primary, and a policy names each destination once. A backup started with a policy
must go to the policy's primary repository; when it completes, the policy's immediate rules copy it.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any

from oma_common.errors import Invalid

from ..audit import Audit
from ..store import backups as backup_store
from ..store import policies as store
from ..store import repositories as repository_store
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


def _rule(r: store.CopyRule) -> dict[str, Any]:
    return {"id": r.id, "destination_repository_id": r.destination_repository_id, "copy_mode": r.copy_mode,
            "priority": r.priority, "enabled": r.enabled, "verify_after_copy": r.verify_after_copy,
            "created_at": r.created_at}


class Policies:
    def __init__(self, db: Database, audit: Audit) -> None:
        self.db = db
        self.audit = audit

    async def create(self, spec: PolicySpec, *, actor: str) -> dict[str, Any]:
        pid = f"pol-{secrets.token_hex(6)}"
        rules = [store.NewRule(f"rule-{secrets.token_hex(6)}", r.destination_repository_id, r.copy_mode, r.priority,
                               r.enabled, r.verify_after_copy) for r in spec.copy_rules]
        async with self.db.transaction() as tx:
            await self._validate(tx, spec)
            await store.create(tx, policy_id=pid, name=spec.name, enabled=spec.enabled,
                               primary_repository_id=spec.primary_repository_id, retention_days=spec.retention_days,
                               description=spec.description, created_by=actor, now=utcnow(), new_rules=rules)
            await self.audit.record(actor, "policy.create", f"policy:{pid}", tx=tx, name=spec.name,
                                    rules=len(spec.copy_rules))
        log.info("policy %s created with %d copy rule(s)", spec.name, len(spec.copy_rules), extra={"resource": pid})
        return await self.get(pid)

    async def _validate(self, tx: Tx, spec: PolicySpec) -> None:
        await store.check_name_free(tx, spec.name)
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
        if not await repository_store.exists(tx, repo_id):
            raise Invalid("repository not found", f"{where}: backup repository {repo_id!r} does not exist")

    async def list(self) -> dict[str, Any]:
        items = [await self.get(pid) for pid in await store.ids(self.db)]
        return {"policies": items, "count": len(items)}

    async def get(self, policy_id: str) -> dict[str, Any]:
        p = await store.get(self.db, policy_id)
        rules = await store.rules(self.db, policy_id)
        count = await backup_store.count_of_policy(self.db, policy_id)
        return {"id": p.id, "name": p.name, "enabled": p.enabled, "primary_repository_id": p.primary_repository_id,
                "retention_days": p.retention_days, "description": p.description,
                "copy_rules": [_rule(r) for r in rules], "backup_count": count, "created_by": p.created_by,
                "created_at": p.created_at, "updated_at": p.updated_at}

    async def delete(self, policy_id: str, *, actor: str) -> dict[str, Any]:
        """Delete a policy and its rules; its backups stay (no longer pruned or copied by it)."""
        async with self.db.transaction() as tx:
            p = await store.get(tx, policy_id)
            await backup_store.detach_policy(tx, policy_id)
            await store.delete(tx, policy_id)
            await self.audit.record(actor, "policy.delete", f"policy:{policy_id}", tx=tx, name=p.name)
        return {"message": f"policy {p.name!r} deleted", "policy_id": policy_id}
