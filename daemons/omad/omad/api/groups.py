"""/machine-groups: groups of VMs protected together by one schedule, their members, and a VM's groups."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound
from oma_common.schema import name_item, name_spec, spec, text_spec
from oma_common.web import Auth, Call, route

from ..schedule.groups import Groups


@dataclasses.dataclass
class GroupIn:
    """A new machine group."""

    name: str = name_spec(min_length=1, max_length=255)
    description: str = text_spec("", max_length=2000)
    schedule_id: str | None = name_spec(None, max_length=64, description="the schedule that protects the group")
    max_concurrent_vms: int = spec(10, min=1, max=100, description="VMs of this group in jobs at once")
    priority: int = spec(50, min=0, max=100, description="order among the schedule's groups: lower runs first")
    created_by: str | None = name_spec(None, max_length=255, description="ignored: the authenticated user is recorded")


@dataclasses.dataclass
class GroupUpdate:
    """Fields to change; schedule_id "" takes the group off its schedule."""

    name: str | None = name_spec(None, min_length=1, max_length=255)
    description: str | None = text_spec(None, max_length=2000)
    schedule_id: str | None = name_spec(None, max_length=64)
    max_concurrent_vms: int | None = spec(None, min=1, max=100)
    priority: int | None = spec(None, min=0, max=100)


@dataclasses.dataclass
class GroupOut:
    id: str
    name: str
    description: str
    schedule_id: str | None
    schedule_name: str | None
    max_concurrent_vms: int
    priority: int
    created_by: str
    created_at: str
    updated_at: str
    vm_count: int
    enabled_vm_count: int


@dataclasses.dataclass
class GroupList:
    groups: list[GroupOut]
    count: int


@dataclasses.dataclass
class MembersIn:
    """One VM (`vm_context_id`) or many (`vm_context_ids`) to add; members already in the group are updated."""

    vm_context_id: str | None = name_spec(None, min_length=1, max_length=255)
    vm_context_ids: list[str] | None = spec(None, max_length=10000, item=name_item(255))
    priority: int = spec(50, min=0, max=100, description="order within the group: lower runs first")
    enabled: bool = spec(True, description="false keeps the VM in the group but out of its runs")


@dataclasses.dataclass
class VmGroupsIn:
    """The groups a VM belongs to from now on: `group_id` (one, or null for none) or `group_ids`."""

    group_id: str | None = name_spec(None, max_length=64)
    group_ids: list[str] | None = spec(None, max_length=1000, item=name_item(64))
    priority: int = spec(50, min=0, max=100)
    enabled: bool = spec(True)


def _set(body: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(body).items() if v is not None}


class GroupsApi:
    def __init__(self, groups: Groups) -> None:
        self.groups = groups

    @route("GET", "/machine-groups", response=GroupList, tags=("machine-groups",))
    async def list(self, call: Call) -> dict[str, Any]:
        """Every machine group with its schedule and VM counts."""
        items = await self.groups.list()
        return {"groups": items, "count": len(items)}

    @route("POST", "/machine-groups", errors=(NotFound, Conflict),
           body=GroupIn, response=GroupOut, status=201, auth=Auth.ADMIN,
           tags=("machine-groups",))
    async def create(self, call: Call) -> dict[str, Any]:
        """Create a machine group, optionally on a schedule."""
        fields = dataclasses.asdict(call.body)
        fields.pop("created_by")
        return await self.groups.create(fields, actor=call.actor)

    @route("GET", "/machine-groups/{group_id}", errors=(NotFound,), response=GroupOut, tags=("machine-groups",))
    async def get(self, call: Call) -> dict[str, Any]:
        """One machine group."""
        return await self.groups.get(call.params["group_id"])

    @route("PUT", "/machine-groups/{group_id}", errors=(NotFound, Conflict),
           body=GroupUpdate, response=GroupOut, auth=Auth.ADMIN,
           tags=("machine-groups",))
    async def update(self, call: Call) -> dict[str, Any]:
        """Change a machine group."""
        return await self.groups.update(call.params["group_id"], _set(call.body), actor=call.actor)

    @route("DELETE", "/machine-groups/{group_id}", errors=(NotFound, Conflict),
           auth=Auth.ADMIN, tags=("machine-groups",))
    async def delete(self, call: Call) -> dict[str, Any]:
        """Delete a machine group; its VMs stay managed."""
        await self.groups.delete(call.params["group_id"], actor=call.actor)
        return {"success": True, "message": f"machine group {call.params['group_id']} deleted"}

    @route("GET", "/machine-groups/{group_id}/vms", errors=(NotFound,), tags=("machine-groups",))
    async def members(self, call: Call) -> dict[str, Any]:
        """The group's VMs in start order, with their next scheduled time and last scheduled job."""
        return await self.groups.members(call.params["group_id"])

    @route("POST", "/machine-groups/{group_id}/vms", errors=(NotFound, Conflict),
           body=MembersIn, auth=Auth.ADMIN, tags=("machine-groups",))
    async def add(self, call: Call) -> dict[str, Any]:
        """Add one VM or many to the group (a VM may be in several groups)."""
        b: MembersIn = call.body
        if (b.vm_context_id is None) == (b.vm_context_ids is None):
            raise Invalid("invalid body", "vm_context_id: send vm_context_id (one VM) or vm_context_ids (several), "
                                          "not both and not neither", field="vm_context_id")
        ids, field = ([b.vm_context_id], "vm_context_id") if b.vm_context_id is not None else \
            (b.vm_context_ids or [], "vm_context_ids")
        return await self.groups.add_vms(call.params["group_id"], ids, priority=b.priority, enabled=b.enabled,
                                         field=field, actor=call.actor)

    @route("DELETE", "/machine-groups/{group_id}/vms/{vm_context_id}", errors=(NotFound,),
           auth=Auth.ADMIN, tags=("machine-groups",))
    async def remove(self, call: Call) -> dict[str, Any]:
        """Take a VM out of the group (the VM stays managed)."""
        await self.groups.remove_vm(call.params["group_id"], call.params["vm_context_id"], actor=call.actor)
        return {"success": True, "message": f"VM context {call.params['vm_context_id']} removed from the group"}

    @route("PUT", "/vm-contexts/{context_id}/group", errors=(NotFound, Conflict),
           body=VmGroupsIn, auth=Auth.ADMIN, tags=("vm-contexts",))
    async def set_vm_groups(self, call: Call) -> dict[str, Any]:
        """Set the groups of one VM: exactly `group_id` (null: none) or exactly `group_ids`."""
        b: VmGroupsIn = call.body
        if b.group_id is not None and b.group_ids is not None:
            raise Invalid("invalid body", "group_id: send group_id or group_ids, not both", field="group_id")
        ids, field = (b.group_ids, "group_ids") if b.group_ids is not None else \
            ([b.group_id] if b.group_id else [], "group_id")
        return await self.groups.set_vm_groups(call.params["context_id"], ids, priority=b.priority,
                                               enabled=b.enabled, field=field, actor=call.actor)
