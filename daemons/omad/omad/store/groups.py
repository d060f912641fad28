"""The owner of `vm_machine_groups` and `vm_group_memberships`, and the reads of group members the scheduler makes
(joined with their VM contexts)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from .base import Reader, get_or_404, name_free, record
from .db import Writer


@dataclasses.dataclass(frozen=True)
class Group:
    """A machine group with its schedule's name and its member counts (the API's MachineGroup)."""

    id: str
    name: str
    description: str
    schedule_id: str | None
    max_concurrent_vms: int
    priority: int
    created_by: str
    created_at: str
    updated_at: str
    schedule_name: str | None
    vm_count: int
    enabled_vm_count: int


@dataclasses.dataclass(frozen=True)
class NewGroup:
    id: str
    name: str
    description: str
    schedule_id: str | None
    max_concurrent_vms: int
    priority: int


@dataclasses.dataclass(frozen=True)
class Member:
    """A VM of a group, with what the GUI shows of its context."""

    vm_context_id: str
    vm_name: str
    priority: int
    enabled: bool
    added_by: str
    added_at: str
    current_status: str
    power_state: str
    scheduler_enabled: bool
    next_scheduled_at: str | None
    last_scheduled_job_id: str | None


@dataclasses.dataclass(frozen=True)
class Membership:
    """One group of a VM."""

    group_id: str
    group_name: str
    priority: int
    enabled: bool


@dataclasses.dataclass(frozen=True)
class GroupRef:
    id: str
    name: str


_GROUP_SQL = (
    "SELECT g.*, s.name AS schedule_name, "
    "(SELECT COUNT(*) FROM vm_group_memberships m WHERE m.group_id = g.id) AS vm_count, "
    "(SELECT COUNT(*) FROM vm_group_memberships m WHERE m.group_id = g.id AND m.enabled = 1) AS enabled_vm_count "
    "FROM vm_machine_groups g LEFT JOIN schedules s ON s.id = g.schedule_id"
)
_UPSERT_MEMBER = (
    "INSERT INTO vm_group_memberships (group_id, vm_context_id, priority, enabled, added_by, added_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (group_id, vm_context_id) DO UPDATE SET "
    "priority = excluded.priority, enabled = excluded.enabled"
)


def _json(values: Sequence[str]) -> str:
    return json.dumps(list(values))


# -- groups --------------------------------------------------------------------------------------------

async def list_all(db: Reader) -> list[Group]:
    return [record(Group, r) for r in await db.fetchall(f"{_GROUP_SQL} ORDER BY g.priority, g.name")]


async def get(db: Reader, group_id: str) -> Group:
    return record(Group, await get_or_404(db, f"{_GROUP_SQL} WHERE g.id = ?", (group_id,), what="machine group",
                                          ident=group_id))


async def name_is_free(db: Reader, name: str) -> None:
    await name_free(db, "SELECT 1 FROM vm_machine_groups WHERE name = ?", (name,), what="machine group", name=name)


async def known(db: Reader, group_ids: Sequence[str]) -> set[str]:
    """Which of these group ids exist."""
    return {r["id"] for r in await db.fetchall(
        "SELECT id FROM vm_machine_groups WHERE id IN (SELECT value FROM json_each(?))", (_json(group_ids),))}


async def insert(tx: Writer, group: NewGroup, *, actor: str, now: str) -> None:
    await tx.execute(
        "INSERT INTO vm_machine_groups (id, name, description, schedule_id, max_concurrent_vms, priority, "
        "created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (group.id, group.name, group.description, group.schedule_id, group.max_concurrent_vms, group.priority,
         actor, now, now))


async def update(tx: Writer, group: NewGroup, *, now: str) -> None:
    await tx.execute(
        "UPDATE vm_machine_groups SET name = ?, description = ?, schedule_id = ?, max_concurrent_vms = ?, "
        "priority = ?, updated_at = ? WHERE id = ?",
        (group.name, group.description, group.schedule_id, group.max_concurrent_vms, group.priority, now,
         group.id))


async def delete(tx: Writer, group_id: str) -> None:
    await tx.execute("DELETE FROM vm_machine_groups WHERE id = ?", (group_id,))  # memberships cascade


async def of_schedules(db: Reader) -> dict[str, list[GroupRef]]:
    """Schedule id → its groups (by priority, then name)."""
    out: dict[str, list[GroupRef]] = {}
    for g in await db.fetchall("SELECT id, name, schedule_id FROM vm_machine_groups "
                               "WHERE schedule_id IS NOT NULL ORDER BY priority, name"):
        out.setdefault(g["schedule_id"], []).append(GroupRef(g["id"], g["name"]))
    return out


async def count_of_schedule(db: Reader, schedule_id: str) -> int:
    return int(await db.scalar("SELECT COUNT(*) FROM vm_machine_groups WHERE schedule_id = ?", (schedule_id,)))


async def vm_counts_per_schedule(db: Reader) -> dict[str, int]:
    """Schedule id → how many distinct VMs its groups hold as enabled members."""
    return {r["schedule_id"]: r["n"] for r in await db.fetchall(
        "SELECT g.schedule_id, COUNT(DISTINCT m.vm_context_id) AS n FROM vm_machine_groups g "
        "JOIN vm_group_memberships m ON m.group_id = g.id WHERE g.schedule_id IS NOT NULL AND m.enabled = 1 "
        "GROUP BY g.schedule_id")}


async def limits(db: Reader, group_ids: Sequence[str]) -> dict[str, int]:
    """Group id → max_concurrent_vms, for these groups."""
    return {r["id"]: r["max_concurrent_vms"] for r in await db.fetchall(
        "SELECT id, max_concurrent_vms FROM vm_machine_groups WHERE id IN (SELECT value FROM json_each(?))",
        (_json(sorted(set(group_ids))),))}


# -- memberships ---------------------------------------------------------------------------------------

async def members(db: Reader, group_id: str) -> list[Member]:
    rows = await db.fetchall(
        "SELECT m.vm_context_id, c.vm_name, m.priority, m.enabled, m.added_by, m.added_at, c.current_status, "
        "c.power_state, c.scheduler_enabled, c.next_scheduled_at, c.last_scheduled_job_id "
        "FROM vm_group_memberships m JOIN vm_replication_contexts c ON c.context_id = m.vm_context_id "
        "WHERE m.group_id = ? ORDER BY m.priority, c.vm_name", (group_id,))
    return [record(Member, {**r, "enabled": bool(r["enabled"]), "scheduler_enabled": bool(r["scheduler_enabled"])})
            for r in rows]


async def member_ids(db: Reader, group_id: str, context_ids: Sequence[str]) -> set[str]:
    """Which of these VM contexts are members of the group already."""
    return {r["vm_context_id"] for r in await db.fetchall(
        "SELECT vm_context_id FROM vm_group_memberships WHERE group_id = ? AND vm_context_id IN "
        "(SELECT value FROM json_each(?))", (group_id, _json(context_ids)))}


async def add_members(tx: Writer, group_id: str, context_ids: Sequence[str], *, priority: int, enabled: bool,
                      actor: str, now: str) -> None:
    """Add VMs to a group; members already there take the new priority and switch."""
    await tx.executemany(_UPSERT_MEMBER, [(group_id, cid, priority, int(enabled), actor, now) for cid in context_ids])


async def remove_member(tx: Writer, group_id: str, context_id: str) -> bool:
    """False when the VM was not a member."""
    return bool(await tx.execute("DELETE FROM vm_group_memberships WHERE group_id = ? AND vm_context_id = ?",
                                 (group_id, context_id)))


async def set_groups_of(tx: Writer, context_id: str, group_ids: Sequence[str], *, priority: int, enabled: bool,
                        actor: str, now: str) -> None:
    """Make the VM a member of exactly these groups (kept ones take the new priority and switch)."""
    await tx.execute("DELETE FROM vm_group_memberships WHERE vm_context_id = ? AND group_id NOT IN "
                     "(SELECT value FROM json_each(?))", (context_id, _json(group_ids)))
    await tx.executemany(_UPSERT_MEMBER, [(g, context_id, priority, int(enabled), actor, now) for g in group_ids])


async def groups_of(db: Reader, context_id: str) -> list[Membership]:
    rows = await db.fetchall(
        "SELECT g.id AS group_id, g.name AS group_name, m.priority, m.enabled FROM vm_group_memberships m "
        "JOIN vm_machine_groups g ON g.id = m.group_id WHERE m.vm_context_id = ? ORDER BY g.priority, g.name",
        (context_id,))
    return [record(Membership, {**r, "enabled": bool(r["enabled"])}) for r in rows]


# -- VM contexts, as groups and the scheduler see them ---------------------------------------------------

async def context_exists(db: Reader, context_id: str) -> bool:
    return bool(await db.scalar("SELECT 1 FROM vm_replication_contexts WHERE context_id = ?", (context_id,)))


async def known_contexts(db: Reader, context_ids: Sequence[str]) -> set[str]:
    """Which of these VM contexts exist."""
    return {r["context_id"] for r in await db.fetchall(
        "SELECT context_id FROM vm_replication_contexts WHERE context_id IN (SELECT value FROM json_each(?))",
        (_json(context_ids),))}


async def eligible(db: Reader, schedule_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """Schedule id → (context, group) of every VM the schedule protects, once each, in start order: groups by
    priority (lower first), then VMs by their priority in the group (lower first), then by name. A VM in two of
    the schedule's groups runs once, in the first. Every schedule asked for has an entry."""
    rows = await db.fetchall(
        "SELECT g.schedule_id, m.vm_context_id, m.group_id FROM vm_machine_groups g "
        "JOIN vm_group_memberships m ON m.group_id = g.id "
        "JOIN vm_replication_contexts c ON c.context_id = m.vm_context_id "
        "WHERE g.schedule_id IN (SELECT value FROM json_each(?)) AND m.enabled = 1 AND c.scheduler_enabled = 1 "
        "ORDER BY g.schedule_id, g.priority, g.name, g.id, m.priority, c.vm_name", (_json(schedule_ids),))
    seen: dict[str, dict[str, str]] = {s: {} for s in schedule_ids}
    for r in rows:
        seen[r["schedule_id"]].setdefault(r["vm_context_id"], r["group_id"])
    return {s: list(vms.items()) for s, vms in seen.items()}


async def protected(db: Reader, context_ids: Sequence[str]) -> set[tuple[str, str]]:
    """(context, schedule) for each of these VMs and each schedule that still protects it (an enabled member of
    one of its groups, with the scheduler not switched off for the VM)."""
    return {(r["vm_context_id"], r["schedule_id"]) for r in await db.fetchall(
        "SELECT DISTINCT m.vm_context_id, g.schedule_id FROM vm_group_memberships m "
        "JOIN vm_machine_groups g ON g.id = m.group_id "
        "JOIN vm_replication_contexts c ON c.context_id = m.vm_context_id "
        "WHERE m.enabled = 1 AND c.scheduler_enabled = 1 AND m.vm_context_id IN "
        "(SELECT value FROM json_each(?))", (_json(sorted(set(context_ids))),))}

