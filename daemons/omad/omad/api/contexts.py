"""/vm-contexts (the GUI's VM table, one VM's details, its recent jobs), the ungrouped VMs, and /vms."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web
from aiohttp.helpers import ETAG_ANY, ETag

from oma_common.errors import Invalid, NotFound
from oma_common.filestream import send_framed
from oma_common.schema import name_spec, spec
from oma_common.web import Call, now_rfc3339, route

from ..inventory.contexts import Contexts
from ..inventory.vms import Vms

# aiohttp matches a route against the raw (still percent-encoded) path, one segment per {param}, then
# decodes the value: a VM name with "/" arrives whole when the client sends it as %2F (as it must).
# "ungrouped" is excluded so that the spec's alias below wins whatever the registration order.
_VM_NAME = "{vm_name:(?!ungrouped$)[^/]+}"


@dataclasses.dataclass
class Page:
    limit: int | None = spec(None, min=1, max=100000, description="at most this many items (default: all)")
    offset: int = spec(0, min=0, max=1_000_000_000)


@dataclasses.dataclass
class VmsQuery:
    limit: int = spec(1000, min=1, max=100000)
    offset: int = spec(0, min=0, max=1_000_000_000)
    vcenter_host: str | None = name_spec(None, max_length=255)


@dataclasses.dataclass
class RecentQuery:
    limit: int = spec(20, min=1, max=500)


@dataclasses.dataclass
class VcenterRef:
    host: str = name_spec(min_length=1, max_length=255)
    datacenter: str = name_spec("", max_length=255)


@dataclasses.dataclass
class InventoryIn:
    """The VMA's view of one vCenter, in the shape of its discovery answer."""

    vcenter: VcenterRef
    vms: list[Any] = spec(max_length=100000, description="VM objects as the VMA's discovery returns them")


@dataclasses.dataclass
class VmContextItem:
    """A context row as the GUI reads it, with its groups."""

    context_id: str
    vm_name: str
    vmware_vm_id: str
    current_status: str
    groups: list[dict[str, Any]]
    group_count: int


@dataclasses.dataclass
class VmContextList:
    vm_contexts: list[VmContextItem]
    count: int
    total: int


class ContextsApi:
    def __init__(self, contexts: Contexts) -> None:
        self.contexts = contexts

    @route("GET", "/vm-contexts", query=Page, response=VmContextList, tags=("vm-contexts",),
           responses={304: "not modified: the list is still the one tagged by `If-None-Match`"},
           description="Each answer carries an `ETag`; a request with it in `If-None-Match` is answered 304 "
                       "while the list (or its page) has not changed.")
    async def list(self, call: Call) -> web.StreamResponse:
        """Every VM context with its groups (`groups`, `group_count`); `limit`/`offset` page it by VM name."""
        q: Page = call.query
        request = call.request
        async with self.contexts.listing(q.limit, q.offset) as page:
            # The list changes under the GUI all the time: it must ask every time (no-cache), cheaply (304).
            headers = {"ETag": f'"{page.version}"', "Cache-Control": "no-cache"}
            if _matches(request.if_none_match, page.version):
                return web.Response(status=304, headers=headers)
            # The items arrive as JSON (rendered by SQLite, kept between changes): wrap them, never re-encode
            # them. The whole list (10 MB) comes as a file, sent by sendfile(2): no copy of it passes through us.
            head = b'{"vm_contexts": '
            tail = (f', "count": {page.count}, "total": {page.total}, '
                    f'"limit": {"null" if q.limit is None else q.limit}, "offset": {q.offset}}}').encode()
            if page.array is not None:
                return web.Response(body=b"".join((head, page.array, tail)), content_type="application/json",
                                    headers=headers)
            assert page.fd is not None
            return await send_framed(request, {**headers, "Content-Type": "application/json"}, head, page.fd,
                                     page.size, tail, "the VM list")

    @route("GET", "/vm-contexts/ungrouped", tags=("vm-contexts",))
    @route("GET", "/discovery/ungrouped-vms", tags=("discovery",))
    async def ungrouped(self, call: Call) -> dict[str, Any]:
        """Managed VMs that are in no machine group."""
        vms = await self.contexts.ungrouped()
        return {"vms": vms, "count": len(vms), "retrieved_at": now_rfc3339()}

    @route("GET", f"/vm-contexts/{_VM_NAME}", errors=(NotFound,), tags=("vm-contexts",))
    async def get(self, call: Call) -> dict[str, Any]:
        """One VM's context by VM name (URL-encode it): current job, job history, disks, NICs, CBT history."""
        return await self.contexts.detail(call.params["vm_name"])

    @route("GET", "/vm-contexts/{context_id}/recent-jobs", errors=(NotFound,), query=RecentQuery, tags=("vm-contexts",))
    async def recent_jobs(self, call: Call) -> dict[str, Any]:
        """The context's latest jobs of every type, newest first."""
        return await self.contexts.recent_jobs(call.params["context_id"], call.query.limit)


def _matches(if_none_match: tuple[ETag, ...] | None, version: str) -> bool:
    """Whether `If-None-Match` names this version (weakly compared, RFC 9110 §13.1.2) or any ("*")."""
    return any(tag.value in (ETAG_ANY, version) for tag in if_none_match or ())


class VmsApi:
    def __init__(self, vms: Vms) -> None:
        self.vms = vms

    @route("GET", "/vms", query=VmsQuery, tags=("vms",))
    async def list(self, call: Call) -> dict[str, Any]:
        """Every VM seen in vCenter (by discovery or the VMA's push), managed or not."""
        q: VmsQuery = call.query
        return await self.vms.list(vcenter_host=q.vcenter_host, limit=q.limit, offset=q.offset)

    @route("POST", "/vms/inventory", body=InventoryIn, tags=("vms",))
    async def receive(self, call: Call) -> dict[str, Any]:
        """The VMA pushes its inventory of one vCenter."""
        b: InventoryIn = call.body
        return await self.vms.receive(b.vcenter.host, b.vcenter.datacenter, b.vms)

    @route("GET", "/vms/{vm_id:(?!inventory$)[^/]+}", errors=(NotFound,), tags=("vms",),
           params={"vm_id": "[^/]{1,128}"})
    async def get(self, call: Call) -> dict[str, Any]:
        """One VM by its VMware instance UUID."""
        vm_id = call.params["vm_id"]
        if len(vm_id) > 128:
            raise Invalid("invalid VM id", "a VMware instance UUID has at most 128 characters")
        return await self.vms.get(vm_id)

