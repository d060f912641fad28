"""Schedules: cron in an IANA time zone, what each run does and within which limits, and their executions."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound

from ..audit import Audit
from ..store import groups as group_store
from ..store import schedules as store
from ..store.base import Reader
from ..store.db import Database
from ..store.schedules import Action, Execution, Schedule, VmKey
from . import cron
from .clock import Clock, iso, parse_iso
from .launcher import JobLauncher, Target

log = logging.getLogger(__name__)

UPCOMING = 5  # next run times shown with one schedule
_UPDATABLE = ("name", "description", "cron_expression", "timezone", "enabled", "skip_if_running",
              "max_concurrent_jobs", "retry_attempts", "retry_delay_minutes", "action", "backup_type",
              "replication_type", "repository_id", "policy_id")


def target_of(s: Schedule) -> Target:
    return Target(s.id, s.name, s.action, s.backup_type, s.repository_id, s.policy_id, s.replication_type)


def action_of(fields: Mapping[str, Any]) -> str:
    """The action asked for; when none is, the contract's schedule (a replication_type, no repository or policy)
    replicates, anything else backs up."""
    if fields.get("action"):
        return str(fields["action"])
    if fields.get("replication_type") and not _text_id(fields.get("repository_id")) and \
            not _text_id(fields.get("policy_id")):
        return Action.REPLICATION
    return Action.BACKUP


def with_replication_type(s: Schedule) -> Schedule:
    """A replication schedule without a replication_type detects it per VM (auto)."""
    if s.action == Action.REPLICATION and s.replication_type is None:
        return dataclasses.replace(s, replication_type="auto")
    return s


# Scheduler.disabling: holds the scheduler's decisions around a transaction and yields `halt(schedule, reason)`,
# which returns the VMs whose starts are in flight for that schedule.
Halt = Callable[[str, str], Sequence[VmKey]]
Disabling = Callable[[], contextlib.AbstractAsyncContextManager[Halt]]


@contextlib.asynccontextmanager
async def no_scheduler() -> AsyncIterator[Halt]:
    """No scheduler runs: no start is in flight."""
    yield lambda schedule_id, reason: ()


def execution_dict(e: Execution) -> dict[str, Any]:
    out = dataclasses.asdict(e)
    out["execution_id"] = e.id
    return out


async def load_execution(db: Reader, execution_id: int) -> dict[str, Any]:
    return execution_dict(await store.get_execution(db, execution_id))


def _text_id(value: Any) -> str | None:
    """Repository and policy ids arrive as numbers or strings; "" clears them."""
    if value is None or value == "":
        return None
    return str(value)


class Schedules:
    def __init__(self, db: Database, audit: Audit, clock: Clock, launchers: Mapping[str, JobLauncher],
                 on_change: Callable[[], None] = lambda: None, disabling: Disabling = no_scheduler) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.launchers = launchers
        self.on_change = on_change  # wakes the scheduler: its next due time may have moved
        self.disabling = disabling  # a disable and the scheduler's decisions do not interleave

    # -- reading -------------------------------------------------------------------------------------

    async def list(self) -> list[dict[str, Any]]:
        return await self._decorate(await store.list_all(self.db))

    async def get(self, schedule_id: str) -> dict[str, Any]:
        s = await store.get(self.db, schedule_id)
        out = (await self._decorate([s]))[0]
        upcoming: builtins.list[str] = []
        if s.enabled and s.next_run_at:
            expr, tz = cron.parse(s.cron_expression), cron.zone(s.timezone)
            t = parse_iso(s.next_run_at)
            upcoming.append(iso(t))
            while len(upcoming) < UPCOMING and (t := expr.next_after(t, tz)) is not None:  # type: ignore[assignment]
                upcoming.append(iso(t))
        out["upcoming_runs"] = upcoming
        return out

    async def _decorate(self, schedules: builtins.list[Schedule]) -> builtins.list[dict[str, Any]]:
        """The groups using each schedule, how many VMs it protects, and its latest execution."""
        groups = await group_store.of_schedules(self.db)
        vms = await group_store.vm_counts_per_schedule(self.db)
        last = await store.latest_executions(self.db)
        out = []
        for s in schedules:
            item = dataclasses.asdict(s)
            item["groups"] = [dataclasses.asdict(g) for g in groups.get(s.id, [])]
            item["group_count"] = len(item["groups"])
            item["vm_count"] = vms.get(s.id, 0)
            item["last_execution"] = execution_dict(last[s.id]) if s.id in last else None
            out.append(item)
        return out

    async def executions(self, schedule_id: str, *, limit: int, offset: int, status: str | None
                         ) -> dict[str, Any]:
        await store.get(self.db, schedule_id)
        page, total = await store.executions_page(self.db, schedule_id, limit=limit, offset=offset, status=status)
        items = [execution_dict(e) for e in page]
        return {"schedule_id": schedule_id, "executions": items, "count": len(items), "total": total,
                "limit": limit, "offset": offset}

    async def execution(self, schedule_id: str, execution_id: int) -> dict[str, Any]:
        """One execution with its VMs (status, attempts, reason) and every job it created."""
        out = await load_execution(self.db, execution_id)
        if out["schedule_id"] != schedule_id:
            raise NotFound("execution not found", f"schedule {schedule_id} has no execution {execution_id}")
        out["vms"] = [dataclasses.asdict(v) for v in await store.execution_vms(self.db, execution_id)]
        out["jobs"] = [dataclasses.asdict(j) for j in await store.execution_jobs(self.db, execution_id)]
        return out

    # -- writing -------------------------------------------------------------------------------------

    async def create(self, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        expr, tz = cron.parse(fields["cron_expression"]), cron.zone(fields["timezone"])
        now = self.clock.now()
        next_run = expr.next_after(now, tz) if fields["enabled"] else None
        s = Schedule(
            id=str(uuid.uuid4()), name=fields["name"], description=fields["description"], cron_expression=expr.text,
            timezone=fields["timezone"], enabled=bool(fields["enabled"]),
            skip_if_running=bool(fields["skip_if_running"]), max_concurrent_jobs=fields["max_concurrent_jobs"],
            retry_attempts=fields["retry_attempts"], retry_delay_minutes=fields["retry_delay_minutes"],
            action=action_of(fields), backup_type=fields["backup_type"],
            replication_type=fields.get("replication_type"), repository_id=_text_id(fields.get("repository_id")),
            policy_id=_text_id(fields.get("policy_id")), next_run_at=iso(next_run) if next_run else None,
            last_run_at=None, created_by=actor, created_at=iso(now), updated_at=iso(now))
        s = with_replication_type(s)
        await self._check_target(s)
        async with self.db.transaction() as tx:
            await store.name_is_free(tx, s.name)
            await store.insert(tx, s)
            await self.audit.record(actor, "schedule.create", f"schedule:{s.id}", tx=tx, name=s.name,
                                    cron_expression=s.cron_expression, timezone=s.timezone, schedule_action=s.action)
        log.info("schedule %r created: %r in %s, next run %s", s.name, s.cron_expression, s.timezone,
                 s.next_run_at or "-", extra={"resource": s.id})
        self.on_change()
        return await self.get(s.id)

    async def update(self, schedule_id: str, fields: dict[str, Any], *, actor: str,
                     audit_action: str = "schedule.update") -> dict[str, Any]:
        """Change the given fields; a new expression, time zone or enabling recomputes the next run. Disabling
        skips the VMs of its running executions waiting to start; those whose start is in progress are left for
        the scheduler to record (the call does not wait for them)."""
        disabling = self.disabling() if "enabled" in fields and not fields["enabled"] else no_scheduler()
        async with disabling as halt, self.db.transaction() as tx:
            old = await store.get(tx, schedule_id)
            changes = {k: v for k, v in fields.items() if k in _UPDATABLE}
            for key in ("repository_id", "policy_id"):
                if key in fields:
                    changes[key] = _text_id(fields[key])
            for key in ("enabled", "skip_if_running"):
                if key in changes:
                    changes[key] = bool(changes[key])
            new = with_replication_type(dataclasses.replace(old, **changes))
            expr, tz = cron.parse(new.cron_expression), cron.zone(new.timezone)
            new = dataclasses.replace(new, cron_expression=expr.text)
            await self._check_target(new)
            if new.name != old.name:
                await store.name_is_free(tx, new.name)
            now = self.clock.now()
            if (new.cron_expression, new.timezone, new.enabled) != (old.cron_expression, old.timezone, old.enabled):
                at = expr.next_after(now, tz) if new.enabled else None
                new = dataclasses.replace(new, next_run_at=iso(at) if at else None)
            new = dataclasses.replace(new, updated_at=iso(now))
            await store.update(tx, new)
            if old.enabled and not new.enabled:
                reason = f"cancelled: the schedule was disabled by {actor}"
                await store.cancel_waiting(tx, schedule_id, reason=reason, at=iso(now), keep=halt(schedule_id, reason))
            await store.refresh_next_scheduled(tx)
            changed = sorted(k for k in _UPDATABLE if getattr(new, k) != getattr(old, k))
            await self.audit.record(actor, audit_action, f"schedule:{schedule_id}", tx=tx, changed=changed)
        log.info("schedule %r updated (%s), next run %s", new.name, ", ".join(changed) or "no change",
                 new.next_run_at or "-", extra={"resource": schedule_id})
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
            s = await store.get(tx, schedule_id)
            running = await store.running_execution(tx, schedule_id)
            if running:
                raise Conflict("schedule is running", f"schedule {s.name!r} has a running execution "
                                                      f"({running}); disable it and delete it once that ends",
                               execution_id=running)
            groups = await group_store.count_of_schedule(tx, schedule_id)
            await store.delete(tx, schedule_id)
            await store.refresh_next_scheduled(tx)
            await self.audit.record(actor, "schedule.delete", f"schedule:{schedule_id}", tx=tx, name=s.name,
                                    groups_unassigned=groups)
        log.info("schedule %r deleted (%d group(s) unassigned)", s.name, groups, extra={"resource": schedule_id})
        self.on_change()

    async def _check_target(self, s: Schedule) -> None:
        launcher = self.launchers.get(s.action)
        if launcher is None:
            raise Invalid("invalid schedule", f"action: {s.action!r} cannot be scheduled by this omad",
                          field="action")
        if s.action == Action.REPLICATION:
            for field, value in (("repository_id", s.repository_id), ("policy_id", s.policy_id)):
                if value is not None:
                    raise Invalid("invalid schedule", f"{field}: a replication schedule writes into CloudStack "
                                                      "volumes, not a backup repository (send \"\" to clear it)",
                                  field=field)
        await launcher.check(target_of(s))
