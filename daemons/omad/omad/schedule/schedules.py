"""Schedules: cron in an IANA time zone, what each run does and within which limits, and their executions."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound

from ..audit import Audit
from ..store.db import Database, Tx
from . import cron
from .clock import Clock, iso, parse_iso
from .launcher import JobLauncher, Target

log = logging.getLogger(__name__)

UPCOMING = 5  # next run times shown with one schedule
_BOOLEAN = ("enabled", "skip_if_running")
_EXEC_BOOLEAN = ("late",)
_UPDATABLE = ("name", "description", "cron_expression", "timezone", "enabled", "skip_if_running",
              "max_concurrent_jobs", "retry_attempts", "retry_delay_minutes", "action", "backup_type",
              "replication_type", "repository_id", "policy_id")

# A VM's next scheduled time: the earliest next run of the enabled schedules of the groups it is an enabled
# member of; NULL when the scheduler leaves it alone. Only rows whose value changes are written.
_REFRESH_NEXT = """
WITH next AS (
    SELECT m.vm_context_id AS id, MIN(s.next_run_at) AS at
    FROM vm_group_memberships m
    JOIN vm_machine_groups g ON g.id = m.group_id
    JOIN schedules s ON s.id = g.schedule_id
    WHERE m.enabled = 1 AND s.enabled = 1
    GROUP BY m.vm_context_id
)
UPDATE vm_replication_contexts AS c SET next_scheduled_at = n.at
FROM (SELECT c2.context_id AS id, CASE WHEN c2.scheduler_enabled = 1 THEN next.at END AS at
      FROM vm_replication_contexts c2 LEFT JOIN next ON next.id = c2.context_id) AS n
WHERE n.id = c.context_id AND c.next_scheduled_at IS NOT n.at
"""


async def refresh_next_scheduled(db: Database | Tx) -> None:
    """Bring every VM context's next_scheduled_at up to date (after any change of schedules or groups)."""
    await db.execute(_REFRESH_NEXT)


def target_of(row: Mapping[str, Any]) -> Target:
    return Target(row["id"], row["name"], row["action"], row["backup_type"], row["repository_id"],
                  row["policy_id"])


def execution_dict(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["execution_id"] = out["id"]
    for key in _EXEC_BOOLEAN:
        out[key] = bool(out[key])
    return out


async def load_execution(db: Database | Tx, execution_id: int) -> dict[str, Any]:
    row = await db.fetchone("SELECT * FROM schedule_executions WHERE id = ?", (execution_id,))
    if row is None:
        raise NotFound("execution not found", f"schedule execution {execution_id} does not exist")
    return execution_dict(row)


def _text_id(value: Any) -> str | None:
    """Repository and policy ids arrive as numbers or strings; "" clears them."""
    if value is None or value == "":
        return None
    return str(value)


class Schedules:
    def __init__(self, db: Database, audit: Audit, clock: Clock, launchers: Mapping[str, JobLauncher],
                 on_change: Callable[[], None] = lambda: None,
                 on_disable: Callable[[str], None] = lambda schedule_id: None) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.launchers = launchers
        self.on_change = on_change  # wakes the scheduler: its next due time may have moved
        self.on_disable = on_disable  # tells a tick in progress to start nothing more for this schedule

    # -- reading -------------------------------------------------------------------------------------

    async def list(self) -> list[dict[str, Any]]:
        rows = await self.db.fetchall("SELECT * FROM schedules ORDER BY name")
        return await self._decorate(rows)

    async def get(self, schedule_id: str) -> dict[str, Any]:
        row = await self._row(self.db, schedule_id)
        out = (await self._decorate([row]))[0]
        upcoming: list[str] = []
        if row["enabled"] and row["next_run_at"]:
            expr, tz = cron.parse(row["cron_expression"]), cron.zone(row["timezone"])
            t = parse_iso(row["next_run_at"])
            upcoming.append(iso(t))
            while len(upcoming) < UPCOMING and (t := expr.next_after(t, tz)) is not None:  # type: ignore[assignment]
                upcoming.append(iso(t))
        out["upcoming_runs"] = upcoming
        return out

    async def _decorate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Booleans, the groups using each schedule, how many VMs it protects, and its latest execution."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for g in await self.db.fetchall("SELECT id, name, schedule_id FROM vm_machine_groups "
                                        "WHERE schedule_id IS NOT NULL ORDER BY priority, name"):
            groups.setdefault(g["schedule_id"], []).append({"id": g["id"], "name": g["name"]})
        vms = {r["schedule_id"]: r["n"] for r in await self.db.fetchall(
            "SELECT g.schedule_id, COUNT(DISTINCT m.vm_context_id) AS n FROM vm_machine_groups g "
            "JOIN vm_group_memberships m ON m.group_id = g.id WHERE g.schedule_id IS NOT NULL AND m.enabled = 1 "
            "GROUP BY g.schedule_id")}
        last = {r["schedule_id"]: execution_dict(r) for r in await self.db.fetchall(
            "SELECT * FROM schedule_executions WHERE id IN "
            "(SELECT MAX(id) FROM schedule_executions GROUP BY schedule_id)")}
        out = []
        for row in rows:
            item = dict(row)
            for key in _BOOLEAN:
                item[key] = bool(item[key])
            item["groups"] = groups.get(row["id"], [])
            item["group_count"] = len(item["groups"])
            item["vm_count"] = vms.get(row["id"], 0)
            item["last_execution"] = last.get(row["id"])
            out.append(item)
        return out

    async def executions(self, schedule_id: str, *, limit: int, offset: int, status: str | None
                         ) -> dict[str, Any]:
        await self._row(self.db, schedule_id)
        where, params = "schedule_id = ?", [schedule_id]
        if status:
            where += " AND status = ?"
            params.append(status)
        rows = await self.db.fetchall(f"SELECT * FROM schedule_executions WHERE {where} ORDER BY id DESC "
                                      "LIMIT ? OFFSET ?", (*params, limit, offset))
        total = await self.db.scalar(f"SELECT COUNT(*) FROM schedule_executions WHERE {where}", params)
        items = [execution_dict(r) for r in rows]
        return {"schedule_id": schedule_id, "executions": items, "count": len(items), "total": int(total),
                "limit": limit, "offset": offset}

    async def execution(self, schedule_id: str, execution_id: int) -> dict[str, Any]:
        """One execution with its VMs (status, attempts, reason) and every job it created."""
        out = await load_execution(self.db, execution_id)
        if out["schedule_id"] != schedule_id:
            raise NotFound("execution not found", f"schedule {schedule_id} has no execution {execution_id}")
        out["vms"] = await self.db.fetchall(
            "SELECT v.vm_context_id, c.vm_name, v.group_id, g.name AS group_name, v.status, v.attempts, "
            "v.start_failures, v.job_id, v.retry_at, v.reason, v.started_at, v.completed_at "
            "FROM schedule_execution_vms v LEFT JOIN vm_replication_contexts c ON c.context_id = v.vm_context_id "
            "LEFT JOIN vm_machine_groups g ON g.id = v.group_id WHERE v.execution_id = ? ORDER BY v.position",
            (execution_id,))
        out["jobs"] = await self.db.fetchall(
            "SELECT job_id, vm_context_id, attempt, status, created_at, finished_at FROM schedule_execution_jobs "
            "WHERE execution_id = ? ORDER BY created_at, job_id", (execution_id,))
        return out

    # -- writing -------------------------------------------------------------------------------------

    async def create(self, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        values = {**fields, "repository_id": _text_id(fields.get("repository_id")),
                  "policy_id": _text_id(fields.get("policy_id"))}
        expr, tz = cron.parse(values["cron_expression"]), cron.zone(values["timezone"])
        schedule_id = str(uuid.uuid4())
        await self._check_target(schedule_id, values)
        now = self.clock.now()
        next_run = expr.next_after(now, tz) if values["enabled"] else None
        async with self.db.transaction() as tx:
            await self._name_free(tx, values["name"])
            await tx.execute(
                "INSERT INTO schedules (id, name, description, cron_expression, timezone, enabled, skip_if_running,"
                " max_concurrent_jobs, retry_attempts, retry_delay_minutes, action, backup_type, replication_type,"
                " repository_id, policy_id, next_run_at, created_by, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (schedule_id, values["name"], values["description"], expr.text, values["timezone"],
                 int(values["enabled"]), int(values["skip_if_running"]), values["max_concurrent_jobs"],
                 values["retry_attempts"], values["retry_delay_minutes"], values["action"], values["backup_type"],
                 values.get("replication_type"), values["repository_id"], values["policy_id"],
                 iso(next_run) if next_run else None, actor, iso(now), iso(now)))
            await self.audit.record(actor, "schedule.create", f"schedule:{schedule_id}", tx=tx,
                                    name=values["name"], cron_expression=expr.text, timezone=values["timezone"],
                                    schedule_action=values["action"])
        log.info("schedule %r created: %r in %s, next run %s", values["name"], expr.text, values["timezone"],
                 iso(next_run) if next_run else "-", extra={"resource": schedule_id})
        self.on_change()
        return await self.get(schedule_id)

    async def update(self, schedule_id: str, fields: dict[str, Any], *, actor: str,
                     audit_action: str = "schedule.update") -> dict[str, Any]:
        """Change the given fields; a new expression, time zone or enabling recomputes the next run."""
        async with self.db.transaction() as tx:
            row = await self._row(tx, schedule_id)
            new = {**row, **{k: v for k, v in fields.items() if k in _UPDATABLE}}
            for key in ("repository_id", "policy_id"):
                if key in fields:
                    new[key] = _text_id(fields[key])
            expr, tz = cron.parse(new["cron_expression"]), cron.zone(new["timezone"])
            new["cron_expression"] = expr.text
            await self._check_target(schedule_id, new)
            if new["name"] != row["name"]:
                await self._name_free(tx, new["name"])
            now = self.clock.now()
            timing = any(new[k] != row[k] for k in ("cron_expression", "timezone")) or \
                bool(new["enabled"]) != bool(row["enabled"])
            next_run = row["next_run_at"]
            if timing:
                at = expr.next_after(now, tz) if new["enabled"] else None
                next_run = iso(at) if at else None
            await tx.execute(
                "UPDATE schedules SET name = ?, description = ?, cron_expression = ?, timezone = ?, enabled = ?,"
                " skip_if_running = ?, max_concurrent_jobs = ?, retry_attempts = ?, retry_delay_minutes = ?,"
                " action = ?, backup_type = ?, replication_type = ?, repository_id = ?, policy_id = ?,"
                " next_run_at = ?, updated_at = ? WHERE id = ?",
                (new["name"], new["description"], new["cron_expression"], new["timezone"], int(new["enabled"]),
                 int(new["skip_if_running"]), new["max_concurrent_jobs"], new["retry_attempts"],
                 new["retry_delay_minutes"], new["action"], new["backup_type"], new["replication_type"],
                 new["repository_id"], new["policy_id"], next_run, iso(now), schedule_id))
            if row["enabled"] and not new["enabled"]:
                await self._cancel_pending(tx, schedule_id, actor)
            await refresh_next_scheduled(tx)
            changed = sorted(k for k in _UPDATABLE if _norm(new[k]) != _norm(row[k]))
            await self.audit.record(actor, audit_action, f"schedule:{schedule_id}", tx=tx, changed=changed)
        if row["enabled"] and not new["enabled"]:
            self.on_disable(schedule_id)  # right after the commit, before anything else can run
        log.info("schedule %r updated (%s), next run %s", new["name"], ", ".join(changed) or "no change",
                 next_run or "-", extra={"resource": schedule_id})
        self.on_change()
        return await self.get(schedule_id)

    async def set_enabled(self, schedule_id: str, enabled: bool, *, actor: str) -> dict[str, Any]:
        """Enable (the next run is computed from now: runs missed while disabled are not made up) or disable
        (no new runs; a running execution finishes the jobs it started and starts no more)."""
        return await self.update(schedule_id, {"enabled": enabled}, actor=actor,
                                 audit_action="schedule.enable" if enabled else "schedule.disable")

    async def delete(self, schedule_id: str, *, actor: str) -> None:
        """Delete a schedule and its executions; its groups stay, without a schedule. 409 while it runs."""
        async with self.db.transaction() as tx:
            row = await self._row(tx, schedule_id)
            running = await tx.scalar("SELECT id FROM schedule_executions WHERE schedule_id = ? AND "
                                      "status = 'running' LIMIT 1", (schedule_id,))
            if running:
                raise Conflict("schedule is running", f"schedule {row['name']!r} has a running execution "
                                                      f"({running}); disable it and delete it once that ends",
                               execution_id=running)
            groups = await tx.scalar("SELECT COUNT(*) FROM vm_machine_groups WHERE schedule_id = ?", (schedule_id,))
            await tx.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,))
            await refresh_next_scheduled(tx)
            await self.audit.record(actor, "schedule.delete", f"schedule:{schedule_id}", tx=tx, name=row["name"],
                                    groups_unassigned=groups)
        log.info("schedule %r deleted (%d group(s) unassigned)", row["name"], groups, extra={"resource": schedule_id})
        self.on_change()

    # -- helpers -------------------------------------------------------------------------------------

    async def _check_target(self, schedule_id: str, values: Mapping[str, Any]) -> None:
        launcher = self.launchers.get(values["action"])
        if launcher is None:
            raise Invalid("invalid schedule", f"action: {values['action']!r} cannot be scheduled by this omad",
                          field="action")
        await launcher.check(target_of({**values, "id": schedule_id}))

    async def _cancel_pending(self, tx: Tx, schedule_id: str, actor: str) -> None:
        """A disabled schedule starts nothing more: VMs of its running executions still waiting are skipped."""
        await tx.execute(
            "UPDATE schedule_execution_vms SET status = 'skipped', retry_at = NULL, reason = ?, completed_at = ? "
            "WHERE status IN ('pending', 'retry_wait') AND execution_id IN "
            "(SELECT id FROM schedule_executions WHERE schedule_id = ? AND status = 'running')",
            (f"cancelled: the schedule was disabled by {actor}", iso(self.clock.now()), schedule_id))

    @staticmethod
    async def _row(db: Database | Tx, schedule_id: str) -> dict[str, Any]:
        row = await db.fetchone("SELECT * FROM schedules WHERE id = ?", (schedule_id,))
        if row is None:
            raise NotFound("schedule not found", f"schedule {schedule_id} does not exist")
        return row

    @staticmethod
    async def _name_free(tx: Tx, name: str) -> None:
        if await tx.scalar("SELECT 1 FROM schedules WHERE name = ?", (name,)):
            raise Conflict("schedule exists", f"a schedule named {name!r} already exists")


def _norm(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value
