"""/discovery: find a vCenter's VMs through the VMA, see which are managed, and add them."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common.errors import CALLS_OUT, Conflict, NotFound
from oma_common.schema import name_item, name_spec, spec
from oma_common.web import Call, route

from ..inventory.discovery import Discovery, Target

_NAME = spec(min_length=1, max_length=1024)


@dataclasses.dataclass
class DiscoverIn:
    """A saved credential (credential_id) or a manual entry; neither = the default credential."""

    credential_id: int | None = spec(None, min=1)
    vcenter: str | None = name_spec(None, max_length=255)
    username: str | None = name_spec(None, max_length=255)
    password: str | None = spec(None, max_length=1024)
    datacenter: str | None = name_spec(None, max_length=255)
    filter: str | None = name_spec(None, max_length=1024, description="only VMs whose name contains this")
    selected_vms: list[str] | None = spec(None, max_length=10000, item=name_item(1024),
                                       description="names to add with create_context; absent = every new VM found")
    create_context: bool = spec(False, description="also add the VMs to management")


@dataclasses.dataclass
class AddVmsIn:
    """VMs to add to management, by name."""

    vm_names: list[str] = spec(min_length=1, max_length=10000, item=name_item(1024))
    credential_id: int | None = spec(None, min=1)
    vcenter: str | None = name_spec(None, max_length=255)
    username: str | None = name_spec(None, max_length=255)
    password: str | None = spec(None, max_length=1024)
    datacenter: str | None = name_spec(None, max_length=255)
    added_by: str | None = name_spec(None, max_length=255)


@dataclasses.dataclass
class BulkAddIn:
    """The legacy bulk add: a manual vCenter login and the names to add."""

    vcenter: str = name_spec(min_length=1, max_length=255)
    username: str = name_spec(min_length=1, max_length=255)
    password: str = spec(min_length=1, max_length=1024)
    datacenter: str = name_spec(min_length=1, max_length=255)
    selected_vms: list[str] = spec(min_length=1, max_length=10000, item=name_item(1024))
    filter: str | None = name_spec(None, max_length=1024)


@dataclasses.dataclass
class PreviewIn:
    """A vCenter to look at (manual entry, or credential_id); nothing is written."""

    vcenter: str | None = name_spec(None, max_length=255)
    username: str | None = name_spec(None, max_length=255)
    password: str | None = spec(None, max_length=1024)
    datacenter: str | None = name_spec(None, max_length=255)
    filter: str | None = name_spec(None, max_length=1024)
    credential_id: int | None = spec(None, min=1)


def _target(b: Any) -> Target:
    return Target(b.credential_id, b.vcenter, b.username, b.password, b.datacenter)


class DiscoveryApi:
    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    @route("POST", "/discovery/discover-vms", errors=(NotFound, Conflict, *CALLS_OUT), body=DiscoverIn, tags=("discovery",))
    async def discover_vms(self, call: Call) -> dict[str, Any]:
        """Discover a vCenter's VMs through the VMA; managed ones are marked `existing` and refreshed."""
        b: DiscoverIn = call.body
        return await self.discovery.discover(_target(b), filter=b.filter, create_context=b.create_context,
                                             selected=b.selected_vms, actor=call.actor)

    @route("POST", "/discovery/add-vms", errors=(NotFound, Conflict, *CALLS_OUT), body=AddVmsIn, tags=("discovery",))
    async def add_vms(self, call: Call) -> dict[str, Any]:
        """Add VMs to management by name, with a result per VM."""
        b: AddVmsIn = call.body
        # The trail's actor is who called; the client's own label rides along as a detail.
        return await self.discovery.add(_target(b), b.vm_names, actor=call.actor, added_by=b.added_by)

    @route("POST", "/discovery/bulk-add", errors=(NotFound, *CALLS_OUT), body=BulkAddIn, tags=("discovery",))
    async def bulk_add(self, call: Call) -> dict[str, Any]:
        """Legacy: add VMs with a manual vCenter login (prefer add-vms)."""
        b: BulkAddIn = call.body
        target = Target(None, b.vcenter, b.username, b.password, b.datacenter)
        return await self.discovery.bulk_add(target, filter=b.filter, selected=b.selected_vms, actor=call.actor)

    @route("POST", "/discovery/preview", errors=(NotFound, Conflict, *CALLS_OUT), body=PreviewIn, tags=("discovery",))
    async def preview(self, call: Call) -> dict[str, Any]:
        """What a discovery would find and which VMs are new; writes nothing."""
        b: PreviewIn = call.body
        return await self.discovery.preview(_target(b), filter=b.filter)
