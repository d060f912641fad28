"""Retention: a policy's backups older than its `retention_days` are pruned, on a schedule and on demand.

A backup goes only when it is past retention, not locked, and nothing kept is built on it: every backup a
kept one needs (its chain below) is kept, so each remaining chain stays restorable. Removal goes newest
first through the same delete as the API's. Every run (dry runs too) is recorded with what went, what
stayed and why; a run someone asked for is in the audit trail, a scheduled one when it removed or failed to
remove something (each removed backup is audited by the delete as well).
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import timedelta
from typing import Any, Protocol

from oma_common.errors import OmaError
from oma_common.periodic import Periodic

from ..audit import Audit
from ..schedule.clock import Clock, iso
from ..store import backups as backup_store
from ..store import policies as store
from ..store.db import Database

log = logging.getLogger(__name__)


class Deleter(Protocol):
    async def delete(self, backup_id: str, *, actor: str) -> dict[str, Any]: ...


def _public(run: store.PruneRun) -> dict[str, Any]:
    return {"policy_id": run.policy_id, "dry_run": run.dry_run, "triggered_by": run.triggered_by,
            "as_of": run.as_of, "status": run.status, "removed": json.loads(run.removed),
            "kept": json.loads(run.kept), "errors": json.loads(run.errors), "started_at": run.started_at,
            "finished_at": run.finished_at, "run_id": run.id}


class Retention:
    def __init__(self, db: Database, audit: Audit, backups: Deleter, clock: Clock, *,
                 interval_seconds: float) -> None:
        self.db = db
        self.audit = audit
        self.backups = backups
        self.clock = clock
        self.interval = interval_seconds
        self._periodic = Periodic("retention pass", self.prune_all, lambda: self.interval, clock=clock, logger=log)

    async def plan(self, policy_id: str) -> tuple[list[str], list[dict[str, str]], str]:
        """(what would go, newest first; what stays with why; the time measured from)."""
        policy = await store.get(self.db, policy_id)
        now = self.clock.now()
        as_of = iso(now)
        rows = await backup_store.completed_of_policy(self.db, policy_id)
        if not rows:
            return [], [], as_of
        days = policy.retention_days
        cutoff = iso(now - timedelta(days=days))
        reasons: dict[str, str] = {}
        for r in rows:
            if days == 0:
                reasons[r.backup_id] = "the policy keeps backups forever (retention_days 0)"
            elif (r.completed_at or "") >= cutoff:
                reasons[r.backup_id] = f"within {days} day(s) of retention"
            elif r.locked_until and r.locked_until > as_of:
                reasons[r.backup_id] = f"locked until {r.locked_until}"
        # Whatever any backup that stays is built on stays too (also backups outside the policy).
        parent = await backup_store.parents(self.db)
        ours = {r.backup_id for r in rows}
        keepers = [b for b in parent if b not in ours or b in reasons]
        for b in keepers:
            child, up = b, parent.get(b)
            while up is not None:
                if up in ours and up not in reasons:
                    reasons[up] = f"{child} is built on it"
                child, up = up, parent.get(up)
        removable = [r.backup_id for r in rows if r.backup_id not in reasons]
        # Newest first, children always before their parents.
        depth: dict[str, int] = {}
        for b in removable:
            n, up = 0, parent.get(b)
            while up is not None:
                n, up = n + 1, parent.get(up)
            depth[b] = n
        removable.sort(key=lambda b: -depth[b])
        kept = [{"backup_id": r.backup_id, "reason": reasons[r.backup_id]} for r in rows if r.backup_id in reasons]
        return removable, kept, as_of

    async def prune(self, policy_id: str, *, dry_run: bool, actor: str) -> dict[str, Any]:
        """A run someone asked for (POST /policies/{id}/prune): audited whatever it found."""
        run = await self._prune(policy_id, dry_run=dry_run, actor=actor)
        await self._audit(actor, run)
        return run

    async def _audit(self, actor: str, run: dict[str, Any]) -> None:
        await self.audit.record(actor, "policy.prune", f"policy:{run['policy_id']}",
                                outcome="failed" if run["errors"] else "ok", run_id=run["run_id"],
                                dry_run=run["dry_run"], removed=run["removed"], kept=len(run["kept"]),
                                errors=len(run["errors"]))

    async def _prune(self, policy_id: str, *, dry_run: bool, actor: str) -> dict[str, Any]:
        run_id = f"prune-{secrets.token_hex(6)}"
        removable, kept, as_of = await self.plan(policy_id)
        await store.start_run(self.db, run_id=run_id, policy_id=policy_id, dry_run=dry_run, triggered_by=actor,
                              as_of=as_of, now=iso(self.clock.now()))
        removed: list[str] = []
        errors: list[dict[str, Any]] = []
        if dry_run:
            removed = removable
        else:
            for backup_id in removable:
                try:
                    await self.backups.delete(backup_id, actor=actor)
                    removed.append(backup_id)
                except OmaError as e:
                    errors.append({"backup_id": backup_id, "error": str(e), **e.extra})
                    log.warning("prune of %s refused: %s", backup_id, e, extra={"resource": policy_id})
        await store.finish_run(self.db, run_id, removed=removed, kept=kept, errors=errors, now=iso(self.clock.now()))
        log.info("%s: %d backup(s) %s, %d kept, %d error(s)", "dry run" if dry_run else "pruned", len(removed),
                 "would go" if dry_run else "removed", len(kept), len(errors), extra={"resource": policy_id})
        return await self.run(run_id)

    async def run(self, run_id: str) -> dict[str, Any]:
        return _public(await store.get_run(self.db, run_id))

    async def runs(self, policy_id: str, limit: int = 50) -> dict[str, Any]:
        await store.get(self.db, policy_id)  # NotFound
        found = await store.runs_of(self.db, policy_id, limit)
        return {"policy_id": policy_id, "runs": [_public(r) for r in found], "count": len(found)}

    async def prune_all(self) -> list[dict[str, Any]]:
        """The scheduled pass: every enabled policy with a retention."""
        out = []
        for policy_id in await store.with_retention(self.db):
            try:
                run = await self._prune(policy_id, dry_run=False, actor="retention")
                if run["removed"] or run["errors"]:  # an hourly "nothing to do" is no news for the trail
                    await self._audit("retention", run)
                out.append(run)
            except OmaError as e:
                log.error("retention failed: %s", e, extra={"resource": policy_id})
        return out

    async def start(self) -> None:
        await self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
