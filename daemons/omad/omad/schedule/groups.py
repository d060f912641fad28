"""Machine groups: VMs protected together by one schedule, within a concurrency limit; a VM may be in several."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound

from ..audit import Audit
from ..store.db import Database, Tx, utcnow
from .schedules import refresh_next_scheduled

log = logging.getLogger(__name__)

_GROUP_SQL = (
    "SELECT g.*, s.name AS schedule_name, "
    "(SELECT COUNT(*) FROM vm_group_memberships m WHERE m.group_id = g.id) AS vm_count, "
    "(SELECT COUNT(*) FROM vm_group_memberships m WHERE m.group_id = g.id AND m.enabled = 1) AS enabled_vm_count "
    "FROM vm_machine_groups g LEFT JOIN schedules s ON s.id = g.schedule_id"
)
_MEMBER_SQL = (
    "SELECT m.vm_context_id, c.vm_name, m.priority, m.enabled, m.added_by, m.added_at, c.current_status, "
    "c.power_state, c.scheduler_enabled, c.next_scheduled_at, c.last_scheduled_job_id "
    "FROM vm_group_memberships m JOIN vm_replication_contexts c ON c.context_id = m.vm_context_id "
    "WHERE m.group_id = ? ORDER BY m.priority, c.vm_name"
)
_UPDATABLE = ("name", "description", "schedule_id", "max_concurrent_vms", "priority")


def _member(row: dict[str, Any]) -> dict[str, Any]:
    row["enabled"] = bool(row["enabled"])
    row["scheduler_enabled"] = bool(row["scheduler_enabled"])
    return row


class Groups:
    def __init__(self, db: Database, audit: Audit, on_change: Callable[[], None] = lambda: None) -> None:
        self.db = db
        self.audit = audit
        self.on_change = on_change  # wakes the scheduler

    # -- groups --------------------------------------------------------------------------------------

    async def list(self) -> list[dict[str, Any]]:
        return await self.db.fetchall(f"{_GROUP_SQL} ORDER BY g.priority, g.name")

    async def get(self, group_id: str) -> dict[str, Any]:
        return await self._row(self.db, group_id)

    async def create(self, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        group_id = str(uuid.uuid4())
        schedule_id = fields.get("schedule_id") or None
        now = utcnow()
        async with self.db.transaction() as tx:
            await self._name_free(tx, fields["name"])
            await self._schedule_exists(tx, schedule_id)
            await tx.execute(
                "INSERT INTO vm_machine_groups (id, name, description, schedule_id, max_concurrent_vms, priority, "
                "created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (group_id, fields["name"], fields["description"], schedule_id, fields["max_concurrent_vms"],
                 fields["priority"], actor, now, now))
            await self.audit.record(actor, "machine_group.create", f"machine_group:{group_id}", tx=tx,
                                    name=fields["name"], schedule_id=schedule_id)
        log.info("machine group %r created", fields["name"], extra={"resource": group_id})
        return await self.get(group_id)

    async def update(self, group_id: str, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        """Change the given fields; schedule_id "" takes the group off its schedule."""
        async with self.db.transaction() as tx:
            row = await self._row(tx, group_id)
            new = {k: row[k] for k in _UPDATABLE}
            new.update({k: v for k, v in fields.items() if k in _UPDATABLE})
            if "schedule_id" in fields:
                new["schedule_id"] = fields["schedule_id"] or None
            if new["name"] != row["name"]:
                await self._name_free(tx, new["name"])
            await self._schedule_exists(tx, new["schedule_id"])
            await tx.execute(
                "UPDATE vm_machine_groups SET name = ?, description = ?, schedule_id = ?, max_concurrent_vms = ?, "
                "priority = ?, updated_at = ? WHERE id = ?",
                (new["name"], new["description"], new["schedule_id"], new["max_concurrent_vms"], new["priority"],
                 utcnow(), group_id))
            if new["schedule_id"] != row["schedule_id"]:
                await refresh_next_scheduled(tx)
            changed = sorted(k for k in _UPDATABLE if new[k] != row[k])
            await self.audit.record(actor, "machine_group.update", f"machine_group:{group_id}", tx=tx,
                                    changed=changed)
        self.on_change()
        return await self.get(group_id)

    async def delete(self, group_id: str, *, actor: str) -> None:
        """Delete a group; its VMs stay managed (only their membership goes)."""
        async with self.db.transaction() as tx:
            row = await self._row(tx, group_id)
            await tx.execute("DELETE FROM vm_machine_groups WHERE id = ?", (group_id,))  # memberships cascade
            await refresh_next_scheduled(tx)
            await self.audit.record(actor, "machine_group.delete", f"machine_group:{group_id}", tx=tx,
                                    name=row["name"], vms=row["vm_count"])
        log.info("machine group %r deleted; its %d VM(s) stay managed", row["name"], row["vm_count"],
                 extra={"resource": group_id})
        self.on_change()

    # -- membership ----------------------------------------------------------------------------------

    async def members(self, group_id: str) -> dict[str, Any]:
        group = await self._row(self.db, group_id)
        vms = [_member(r) for r in await self.db.fetchall(_MEMBER_SQL, (group_id,))]
        return {"group_id": group_id, "group_name": group["name"], "vms": vms, "count": len(vms)}

    async def add_vms(self, group_id: str, context_ids: list[str], *, priority: int, enabled: bool, field: str,
                      actor: str) -> dict[str, Any]:
        """Add VMs to a group, or update their priority and switch when they are members already."""
        ids = list(dict.fromkeys(context_ids))  # once each, in the order given
        async with self.db.transaction() as tx:
            await self._row(tx, group_id)
            await self._contexts_exist(tx, context_ids, field)
            members = {r["vm_context_id"] for r in await tx.fetchall(
                "SELECT vm_context_id FROM vm_group_memberships WHERE group_id = ? AND vm_context_id IN "
                "(SELECT value FROM json_each(?))", (group_id, json.dumps(ids)))}
            now = utcnow()
            await tx.executemany(
                "INSERT INTO vm_group_memberships (group_id, vm_context_id, priority, enabled, added_by, added_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (group_id, vm_context_id) DO UPDATE SET "
                "priority = excluded.priority, enabled = excluded.enabled",
                [(group_id, cid, priority, int(enabled), actor, now) for cid in ids])
            await refresh_next_scheduled(tx)
            added = [c for c in ids if c not in members]
            updated = [c for c in ids if c in members]
            await self.audit.record(actor, "machine_group.add_vms", f"machine_group:{group_id}", tx=tx,
                                    added=added, updated=updated, priority=priority, enabled=enabled)
        log.info("machine group: %d VM(s) added, %d updated", len(added), len(updated), extra={"resource": group_id})
        self.on_change()
        return {"group_id": group_id, "added": added, "updated": updated, "count": len(ids)}

    async def remove_vm(self, group_id: str, context_id: str, *, actor: str) -> None:
        async with self.db.transaction() as tx:
            group = await self._row(tx, group_id)
            gone = await tx.execute("DELETE FROM vm_group_memberships WHERE group_id = ? AND vm_context_id = ?",
                                    (group_id, context_id))
            if not gone:
                raise NotFound("VM not in group", f"VM context {context_id!r} is not a member of machine group "
                                                  f"{group['name']!r}")
            await refresh_next_scheduled(tx)
            await self.audit.record(actor, "machine_group.remove_vm", f"machine_group:{group_id}", tx=tx,
                                    vm_context_id=context_id)
        self.on_change()

    async def set_vm_groups(self, context_id: str, group_ids: list[str], *, priority: int, enabled: bool,
                            field: str, actor: str) -> dict[str, Any]:
        """Make a VM a member of exactly these groups (none: of no group); kept memberships keep their settings
        unless given anew."""
        ids = list(dict.fromkeys(group_ids))
        async with self.db.transaction() as tx:
            if not await tx.scalar("SELECT 1 FROM vm_replication_contexts WHERE context_id = ?", (context_id,)):
                raise NotFound("VM context not found", f"VM context {context_id!r} does not exist")
            known = {r["id"] for r in await tx.fetchall(
                "SELECT id FROM vm_machine_groups WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))}
            missing = [i for i, g in enumerate(ids) if g not in known]
            if missing:
                where = field if field == "group_id" else f"{field}[{missing[0]}]"
                raise Invalid("unknown machine group", f"{where}: machine group {ids[missing[0]]!r} does not exist",
                              field=field)
            await tx.execute("DELETE FROM vm_group_memberships WHERE vm_context_id = ? AND group_id NOT IN "
                             "(SELECT value FROM json_each(?))", (context_id, json.dumps(ids)))
            now = utcnow()
            await tx.executemany(
                "INSERT INTO vm_group_memberships (group_id, vm_context_id, priority, enabled, added_by, added_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (group_id, vm_context_id) DO UPDATE SET "
                "priority = excluded.priority, enabled = excluded.enabled",
                [(g, context_id, priority, int(enabled), actor, now) for g in ids])
            await refresh_next_scheduled(tx)
            await self.audit.record(actor, "vm_context.set_groups", f"vm_context:{context_id}", tx=tx, groups=ids)
        self.on_change()
        groups = await self.db.fetchall(
            "SELECT g.id AS group_id, g.name AS group_name, m.priority, m.enabled FROM vm_group_memberships m "
            "JOIN vm_machine_groups g ON g.id = m.group_id WHERE m.vm_context_id = ? ORDER BY g.priority, g.name",
            (context_id,))
        for g in groups:
            g["enabled"] = bool(g["enabled"])
        return {"context_id": context_id, "groups": groups, "group_count": len(groups)}

    # -- helpers -------------------------------------------------------------------------------------

    @staticmethod
    async def _row(db: Database | Tx, group_id: str) -> dict[str, Any]:
        row = await db.fetchone(f"{_GROUP_SQL} WHERE g.id = ?", (group_id,))
        if row is None:
            raise NotFound("machine group not found", f"machine group {group_id} does not exist")
        return row

    @staticmethod
    async def _name_free(tx: Tx, name: str) -> None:
        if await tx.scalar("SELECT 1 FROM vm_machine_groups WHERE name = ?", (name,)):
            raise Conflict("machine group exists", f"a machine group named {name!r} already exists")

    @staticmethod
    async def _schedule_exists(tx: Tx, schedule_id: str | None) -> None:
        if schedule_id is not None and not await tx.scalar("SELECT 1 FROM schedules WHERE id = ?", (schedule_id,)):
            raise Invalid("unknown schedule", f"schedule_id: schedule {schedule_id!r} does not exist",
                          field="schedule_id")

    @staticmethod
    async def _contexts_exist(tx: Tx, ids: list[str], field: str) -> None:
        known = {r["context_id"] for r in await tx.fetchall(
            "SELECT context_id FROM vm_replication_contexts WHERE context_id IN (SELECT value FROM json_each(?))",
            (json.dumps(ids),))}
        for i, cid in enumerate(ids):
            if cid not in known:
                where = field if field == "vm_context_id" else f"{field}[{i}]"
                raise Invalid("unknown VM context", f"{where}: VM context {cid!r} does not exist", field=field)
