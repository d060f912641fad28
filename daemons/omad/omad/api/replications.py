"""/replications: start (or only register) a VM's replication, follow, change and remove it; the VMA's change
ids; and /progress/{job_id}, the VMA's own progress passed through."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from oma_common.errors import CALLS_OUT, Conflict, Exhausted, Invalid, NotFound, Unavailable
from oma_common.schema import name_spec, spec
from oma_common.web import Auth, Call, route

from ..inventory.vmspec import VmSpec
from ..replication.changeids import ChangeIds
from ..replication.replications import Replications, StartRequest

# A job id is any segment but "changeid", whatever the route order.
_ID = "{job_id:(?!changeid$)[^/]+}"
_JOB_ID = name_spec(min_length=1, max_length=128)
_STATUS = Literal["replicating", "completed", "failed", "cancelled"]


@dataclasses.dataclass
class ReplicationIn:
    """CONTRACTS.md "Replication": the VM as the VMA discovered it and the CloudStack config to use."""

    source_vm: VmSpec
    ossea_config_id: int = spec(min=1, max=2**31, description="the CloudStack config (required, non-zero)")
    replication_type: Literal["initial", "incremental"] | None = spec(
        None, description="detected when absent: incremental once every disk has a stored change id")
    vcenter_host: str | None = name_spec(None, max_length=255)
    datacenter: str | None = name_spec(None, max_length=255)
    start_replication: bool = spec(True, description="false: only create the VM's context")
    schedule_execution_id: str | None = name_spec(None, max_length=128)
    vm_group_id: str | None = name_spec(None, max_length=128)
    scheduled_by: str | None = name_spec(None, max_length=255)
    target_network: str = name_spec("", max_length=255)


@dataclasses.dataclass
class ReplicationQuery:
    vm_context_id: str | None = name_spec(None, max_length=256)
    status: _STATUS | None = None
    limit: int = spec(100, min=1, max=10000)
    offset: int = spec(0, min=0, max=1_000_000_000)


@dataclasses.dataclass
class ReplicationUpdate:
    """What can change on a replication: the network a failover of it uses."""

    target_network: str | None = name_spec(None, max_length=255)


@dataclasses.dataclass
class ChangeIdQuery:
    vm_path: str = spec(min_length=1, max_length=4096)
    disk_id: str = spec("disk-2000", pattern=r"disk-\d{1,9}", max_length=16)


@dataclasses.dataclass
class ChangeIdIn:
    change_id: str = spec(min_length=1, max_length=1024)
    disk_id: str = spec("disk-2000", pattern=r"disk-\d{1,9}", max_length=16)
    previous_change_id: str | None = spec(None, max_length=1024)


class ReplicationsApi:
    def __init__(self, replications: Replications, change_ids: ChangeIds) -> None:
        self.replications = replications
        self.change_ids = change_ids

    @route("POST", "/replications", status=201, body=ReplicationIn,
           errors=(NotFound, Conflict, Invalid, Exhausted, *CALLS_OUT), tags=("replications",))
    async def start(self, call: Call) -> dict[str, Any]:
        """Start a sync of every disk of a VM into CloudStack volumes (409 while one runs), or with
        start_replication=false only create its context (409 if it exists)."""
        b: ReplicationIn = call.body
        req = StartRequest(b.source_vm, b.ossea_config_id, b.replication_type, b.vcenter_host, b.datacenter,
                           b.start_replication, b.schedule_execution_id, b.vm_group_id, b.scheduled_by,
                           b.target_network)
        return await self.replications.start(req, actor=call.actor)

    @route("GET", "/replications", query=ReplicationQuery, tags=("replications",))
    async def list(self, call: Call) -> dict[str, Any]:
        """Replications, newest first, filtered and paged."""
        q: ReplicationQuery = call.query
        return await self.replications.find(vm_context_id=q.vm_context_id, status=q.status, limit=q.limit,
                                             offset=q.offset)

    @route("GET", "/replications/changeid", query=ChangeIdQuery, auth=Auth.MACHINE, tags=("replications",))
    async def change_id(self, call: Call) -> dict[str, Any]:
        """The change id the next sync of this disk continues from; always 200, "" when none (copy in full)."""
        q: ChangeIdQuery = call.query
        return await self.change_ids.current(q.vm_path, q.disk_id)

    @route("POST", f"/replications/{_ID}/changeid", body=ChangeIdIn, errors=(NotFound, Conflict),
           auth=Auth.MACHINE, tags=("replications",))
    async def store_change_id(self, call: Call) -> dict[str, Any]:
        """The VMA reports the change id one disk reached in this sync (offered once the sync completes)."""
        b: ChangeIdIn = call.body
        return await self.change_ids.store(call.params["job_id"], b.disk_id, b.change_id, b.previous_change_id)

    @route("GET", f"/replications/{_ID}", errors=(NotFound,), tags=("replications",))
    async def get(self, call: Call) -> dict[str, Any]:
        """One replication: its record merged with the VMA's latest progress."""
        return await self.replications.get(call.params["job_id"])

    @route("GET", f"/replications/{_ID}/progress", errors=(NotFound,), tags=("replications",))
    async def progress(self, call: Call) -> dict[str, Any]:
        """A replication's progress: its record and the VMA's latest body as last polled."""
        return await self.replications.progress(call.params["job_id"])

    @route("PUT", f"/replications/{_ID}", body=ReplicationUpdate, errors=(NotFound,), tags=("replications",))
    async def update(self, call: Call) -> dict[str, Any]:
        """Change what may change on a replication (its target network)."""
        b: ReplicationUpdate = call.body
        return await self.replications.update(call.params["job_id"], target_network=b.target_network,
                                              actor=call.actor)

    @route("DELETE", f"/replications/{_ID}", errors=(NotFound, Conflict, *CALLS_OUT), tags=("replications",))
    async def delete(self, call: Call) -> dict[str, Any]:
        """Cancel a running replication (exports stop, volumes stay) or remove a finished one's record."""
        return await self.replications.delete(call.params["job_id"], actor=call.actor)

    @route("GET", "/progress/{job_id}", errors=(NotFound, Unavailable), tags=("replications",))
    async def vma_progress(self, call: Call) -> dict[str, Any]:
        """The VMA's progress of a job, unchanged (503 when the VMA is down, 404 when it does not know it)."""
        return await self.replications.vma_progress(call.params["job_id"])
