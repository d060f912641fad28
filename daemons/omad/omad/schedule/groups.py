"""Machine groups: VMs protected together by one schedule, within a concurrency limit; a VM may be in several."""

from __future__ import annotations

import dataclasses
import builtins
import logging
import uuid
from collections.abc import Callable
from typing import Any

from oma_common.errors import Invalid, NotFound

from ..audit import Audit
from ..store import groups as store
from ..store import schedules as schedule_store
from ..store.base import Reader
from ..store.db import Database, utcnow
from ..store.groups import NewGroup

log = logging.getLogger(__name__)

_UPDATABLE = ("name", "description", "schedule_id", "max_concurrent_vms", "priority")


class Groups:
    def __init__(self, db: Database, audit: Audit, on_change: Callable[[], None] = lambda: None) -> None:
        self.db = db
        self.audit = audit
        self.on_change = on_change  # wakes the scheduler

    # -- groups --------------------------------------------------------------------------------------

    async def list(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(g) for g in await store.list_all(self.db)]

    async def get(self, group_id: str) -> dict[str, Any]:
        return dataclasses.asdict(await store.get(self.db, group_id))

    async def create(self, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        group = NewGroup(str(uuid.uuid4()), fields["name"], fields["description"], fields.get("schedule_id") or None,
                         fields["max_concurrent_vms"], fields["priority"])
        async with self.db.transaction() as tx:
            await store.name_is_free(tx, group.name)
            await self._schedule_exists(tx, group.schedule_id)
            await store.insert(tx, group, actor=actor, now=utcnow())
            await self.audit.record(actor, "machine_group.create", f"machine_group:{group.id}", tx=tx,
                                    name=group.name, schedule_id=group.schedule_id)
        log.info("machine group %r created", group.name, extra={"resource": group.id})
        return await self.get(group.id)

    async def update(self, group_id: str, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        """Change the given fields; schedule_id "" takes the group off its schedule."""
        async with self.db.transaction() as tx:
            old = await store.get(tx, group_id)
            values = {k: getattr(old, k) for k in _UPDATABLE}
            values.update({k: v for k, v in fields.items() if k in _UPDATABLE})
            if "schedule_id" in fields:
                values["schedule_id"] = fields["schedule_id"] or None
            new = NewGroup(group_id, **values)
            if new.name != old.name:
                await store.name_is_free(tx, new.name)
            await self._schedule_exists(tx, new.schedule_id)
            await store.update(tx, new, now=utcnow())
            if new.schedule_id != old.schedule_id:
                await schedule_store.refresh_next_scheduled(tx)
            changed = sorted(k for k in _UPDATABLE if getattr(new, k) != getattr(old, k))
            await self.audit.record(actor, "machine_group.update", f"machine_group:{group_id}", tx=tx,
                                    changed=changed)
        self.on_change()
        return await self.get(group_id)

    async def delete(self, group_id: str, *, actor: str) -> None:
        """Delete a group; its VMs stay managed (only their membership goes)."""
        async with self.db.transaction() as tx:
            group = await store.get(tx, group_id)
            await store.delete(tx, group_id)
            await schedule_store.refresh_next_scheduled(tx)
            await self.audit.record(actor, "machine_group.delete", f"machine_group:{group_id}", tx=tx,
                                    name=group.name, vms=group.vm_count)
        log.info("machine group %r deleted; its %d VM(s) stay managed", group.name, group.vm_count,
                 extra={"resource": group_id})
        self.on_change()

    # -- membership ----------------------------------------------------------------------------------

    async def members(self, group_id: str) -> dict[str, Any]:
        group = await store.get(self.db, group_id)
        vms = [dataclasses.asdict(m) for m in await store.members(self.db, group_id)]
        return {"group_id": group_id, "group_name": group.name, "vms": vms, "count": len(vms)}

    async def add_vms(self, group_id: str, context_ids: builtins.list[str], *, priority: int, enabled: bool,
                      field: str, actor: str) -> dict[str, Any]:
        """Add VMs to a group, or update their priority and switch when they are members already."""
        ids = list(dict.fromkeys(context_ids))  # once each, in the order given
        async with self.db.transaction() as tx:
            await store.get(tx, group_id)
            await self._contexts_exist(tx, context_ids, field)
            members = await store.member_ids(tx, group_id, ids)
            await store.add_members(tx, group_id, ids, priority=priority, enabled=enabled, actor=actor, now=utcnow())
            await schedule_store.refresh_next_scheduled(tx)
            added = [c for c in ids if c not in members]
            updated = [c for c in ids if c in members]
            await self.audit.record(actor, "machine_group.add_vms", f"machine_group:{group_id}", tx=tx,
                                    added=added, updated=updated, priority=priority, enabled=enabled)
        log.info("machine group: %d VM(s) added, %d updated", len(added), len(updated), extra={"resource": group_id})
        self.on_change()
        return {"group_id": group_id, "added": added, "updated": updated, "count": len(ids)}

    async def remove_vm(self, group_id: str, context_id: str, *, actor: str) -> None:
        async with self.db.transaction() as tx:
            group = await store.get(tx, group_id)
            if not await store.remove_member(tx, group_id, context_id):
                raise NotFound("VM not in group", f"VM context {context_id!r} is not a member of machine group "
                                                  f"{group.name!r}")
            await schedule_store.refresh_next_scheduled(tx)
            await self.audit.record(actor, "machine_group.remove_vm", f"machine_group:{group_id}", tx=tx,
                                    vm_context_id=context_id)
        self.on_change()

    async def set_vm_groups(self, context_id: str, group_ids: builtins.list[str], *, priority: int,
                            enabled: bool, field: str, actor: str) -> dict[str, Any]:
        """Make a VM a member of exactly these groups (none: of no group); kept memberships keep their settings
        unless given anew."""
        ids = list(dict.fromkeys(group_ids))
        async with self.db.transaction() as tx:
            if not await store.context_exists(tx, context_id):
                raise NotFound("VM context not found", f"VM context {context_id!r} does not exist")
            known = await store.known(tx, ids)
            missing = [i for i, g in enumerate(ids) if g not in known]
            if missing:
                where = field if field == "group_id" else f"{field}[{missing[0]}]"
                raise Invalid("unknown machine group", f"{where}: machine group {ids[missing[0]]!r} does not exist",
                              field=field)
            await store.set_groups_of(tx, context_id, ids, priority=priority, enabled=enabled, actor=actor,
                                      now=utcnow())
            await schedule_store.refresh_next_scheduled(tx)
            await self.audit.record(actor, "vm_context.set_groups", f"vm_context:{context_id}", tx=tx, groups=ids)
        self.on_change()
        groups = [dataclasses.asdict(m) for m in await store.groups_of(self.db, context_id)]
        return {"context_id": context_id, "groups": groups, "group_count": len(groups)}

    # -- helpers -------------------------------------------------------------------------------------

    @staticmethod
    async def _schedule_exists(db: Reader, schedule_id: str | None) -> None:
        if schedule_id is not None and not await schedule_store.exists(db, schedule_id):
            raise Invalid("unknown schedule", f"schedule_id: schedule {schedule_id!r} does not exist",
                          field="schedule_id")

    @staticmethod
    async def _contexts_exist(db: Reader, ids: builtins.list[str], field: str) -> None:
        known = await store.known_contexts(db, ids)
        for i, cid in enumerate(ids):
            if cid not in known:
                where = field if field == "vm_context_id" else f"{field}[{i}]"
                raise Invalid("unknown VM context", f"{where}: VM context {cid!r} does not exist", field=field)
