"""/backups: start a VM-level backup, list, read, delete; chains; and the VMA's completion and change ids."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from oma_common.errors import CALLS_OUT, Conflict, Exhausted, NotFound
from oma_common.schema import name_spec, spec
from oma_common.web import Auth, Call, route

from ..backup.backups import Backups, StartRequest
from ..backup.chains import Chains
from ..backup.completion import Completion

# A backup id is any segment but the two fixed names below it, whatever the route order; VM names in
# /backups/{vm_name}/chain arrive percent-encoded when they hold "/" (aiohttp matches the raw path).
_ID = "{backup_id:(?!chain$|changeid$)[^/]+}"
_STATUS = Literal["pending", "running", "completed", "failed"]


@dataclasses.dataclass
class BackupIn:
    """Back up every disk of a VM at once (no disk_id: backups are VM-level)."""

    vm_name: str = name_spec(min_length=1, max_length=1024)
    repository_id: str = name_spec(min_length=1, max_length=128)
    backup_type: Literal["full", "incremental"] = "full"
    policy_id: str | None = name_spec(None, max_length=128)
    tags: dict[str, Any] = spec(factory=dict)


@dataclasses.dataclass
class BackupQuery:
    vm_name: str | None = name_spec(None, max_length=1024)
    vm_context_id: str | None = name_spec(None, max_length=256)
    repository_id: str | None = name_spec(None, max_length=128)
    backup_type: Literal["full", "incremental"] | None = None
    status: _STATUS | None = None
    limit: int = spec(100, min=1, max=10000)
    offset: int = spec(0, min=0, max=1_000_000_000)


@dataclasses.dataclass
class ChainQuery:
    vm_name: str | None = name_spec(None, max_length=1024)
    vm_context_id: str | None = name_spec(None, max_length=256)
    repository_id: str | None = name_spec(None, max_length=128, description="only this repository's chains")


@dataclasses.dataclass
class CompleteIn:
    """One disk of a backup is written (the VMA's backup client, once per disk)."""

    change_id: str = name_spec(min_length=1, max_length=1024)
    disk_id: int = spec(0, min=0, max=1000, description="the disk's index (0, 1, ...)")
    bytes_transferred: int = spec(0, min=0)


@dataclasses.dataclass
class ChangeIdQuery:
    vm_name: str = name_spec(min_length=1, max_length=1024)
    disk_id: int = spec(0, min=0, max=1000, description="the disk's index (0, 1, ...)")


class BackupsApi:
    def __init__(self, backups: Backups, completion: Completion, chains: Chains) -> None:
        self.backups = backups
        self.completion = completion
        self.chains = chains

    @route("POST", "/backups", errors=(NotFound, Conflict, Exhausted, *CALLS_OUT), body=BackupIn, tags=("backups",))
    async def start(self, call: Call) -> dict[str, Any]:
        """Start a full or incremental backup of every disk of a VM (409 while one runs)."""
        b: BackupIn = call.body
        req = StartRequest(b.vm_name, b.repository_id, b.backup_type, b.policy_id, b.tags)
        return await self.backups.start(req, actor=call.actor)

    @route("GET", "/backups", query=BackupQuery, tags=("backups",))
    async def list(self, call: Call) -> dict[str, Any]:
        """Backups, newest first, filtered and paged."""
        q: BackupQuery = call.query
        return await self.backups.find(vm_name=q.vm_name, vm_context_id=q.vm_context_id,
                                       repository_id=q.repository_id, backup_type=q.backup_type, status=q.status,
                                       limit=q.limit, offset=q.offset)

    @route("GET", "/backups/chain", errors=(NotFound,), query=ChainQuery, tags=("backups",))
    async def chain(self, call: Call) -> dict[str, Any]:
        """A VM's backup chains (full + incrementals) with sizes; the newest at the top level."""
        q: ChainQuery = call.query
        return await self.chains.for_vm(vm_name=q.vm_name, vm_context_id=q.vm_context_id,
                                        repository_id=q.repository_id)

    @route("GET", "/backups/{vm_name}/chain", errors=(NotFound,), tags=("backups",))
    async def chain_by_name(self, call: Call) -> dict[str, Any]:
        """The same as /backups/chain?vm_name= (the path the GUI calls)."""
        return await self.chains.for_vm(vm_name=call.params["vm_name"])

    @route("GET", "/backups/changeid", errors=(NotFound,), query=ChangeIdQuery, auth=Auth.MACHINE, tags=("backups",))
    async def change_id(self, call: Call) -> dict[str, Any]:
        """The change id an incremental of this disk continues from (404 when none: the VMA copies in full)."""
        q: ChangeIdQuery = call.query
        return await self.completion.change_id(q.vm_name, q.disk_id)

    @route("GET", f"/backups/{_ID}", errors=(NotFound,), tags=("backups",))
    async def get(self, call: Call) -> dict[str, Any]:
        """One backup with its disks and each image's current size (qemu-img info)."""
        return await self.backups.get(call.params["backup_id"])

    @route("POST", f"/backups/{_ID}/complete", errors=(NotFound, Conflict, *CALLS_OUT),
           body=CompleteIn, auth=Auth.MACHINE, tags=("backups",))
    async def complete(self, call: Call) -> dict[str, Any]:
        """The VMA finished one disk; the backup completes with its last disk."""
        b: CompleteIn = call.body
        return await self.completion.complete_disk(call.params["backup_id"], b.disk_id, b.change_id,
                                                   b.bytes_transferred)

    @route("DELETE", f"/backups/{_ID}", errors=(NotFound, Conflict, *CALLS_OUT), tags=("backups",))
    async def delete(self, call: Call) -> dict[str, Any]:
        """Delete a backup's images and records (409 while it runs or later backups are built on it)."""
        return await self.backups.delete(call.params["backup_id"], actor=call.actor)
