"""/nbd: the NBD port pool and qemu-nbd exports, for administrators (OMA-API.md "NBD Port Management")."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common.contracts.nbd_pool import EXPORT_NAME, Allocated, PortStatus, Released, Stopped
from oma_common.errors import CALLS_OUT, Conflict, Exhausted, Forbidden, Invalid, NotFound
from oma_common.schema import name_spec, spec
from oma_common.web import Auth, Call, route

from ..nbd_admin import NbdAdmin


@dataclasses.dataclass
class AllocateIn:
    job_id: str = name_spec(min_length=1, max_length=128)
    export_name: str = spec(pattern=EXPORT_NAME, max_length=128,
                            description="single disk: the export name; several: its prefix")
    disk_count: int = spec(1, min=1, max=64)


@dataclasses.dataclass
class ReleaseIn:
    job_id: str | None = name_spec(None, max_length=128)
    ports: list[int] | None = None


@dataclasses.dataclass
class StartIn:
    export_name: str = spec(pattern=EXPORT_NAME, max_length=128)
    port: int = spec(min=1, max=65535)
    qcow2_path: str = spec(min_length=1, max_length=4096, description="image or block device to export")
    read_only: bool = False
    shared_connections: int = spec(10, min=5, max=100, description="clients at once; the VMA opens 2 per export")


@dataclasses.dataclass
class StopIn:
    pid: int | None = spec(None, min=1)
    export_name: str | None = spec(None, pattern=EXPORT_NAME, max_length=128)


def export_names(prefix: str, count: int) -> list[str]:
    """One disk keeps the name; several get the VMware disk key the VMA uses (2000 + index)."""
    return [prefix] if count == 1 else [f"{prefix}-disk-{2000 + i}" for i in range(count)]


class NbdApi:
    def __init__(self, nbd: NbdAdmin) -> None:
        self.nbd = nbd

    @route("POST", "/nbd/ports/allocate", errors=(Conflict, Exhausted, *CALLS_OUT),
           body=AllocateIn, auth=Auth.ADMIN, tags=("nbd",))
    async def allocate(self, call: Call) -> Allocated:
        """Allocate one port per disk for a job, all or none."""
        b: AllocateIn = call.body
        return await self.nbd.allocate(b.job_id, export_names(b.export_name, b.disk_count), actor=call.actor)

    @route("POST", "/nbd/ports/release", errors=(NotFound, Conflict, *CALLS_OUT),
           body=ReleaseIn, auth=Auth.ADMIN, tags=("nbd",))
    async def release(self, call: Call) -> Released:
        """Release a job's ports, or the listed ones."""
        b: ReleaseIn = call.body
        if b.job_id is None and not b.ports:
            raise Invalid("nothing to release", "send job_id, ports, or both")
        return await self.nbd.release(b.job_id, b.ports, actor=call.actor)

    @route("GET", "/nbd/ports/status", errors=CALLS_OUT, auth=Auth.ADMIN, tags=("nbd",))
    async def status(self, call: Call) -> PortStatus:
        """The pool: total, allocated, available, and every allocation."""
        return await self.nbd.status()

    @route("POST", "/nbd/qemu-nbd/start", errors=(NotFound, Conflict, Forbidden, *CALLS_OUT),
           body=StartIn, auth=Auth.ADMIN, tags=("nbd",))
    async def start(self, call: Call) -> dict[str, Any]:
        """Export an image on an allocated port; answers once the export completes an NBD handshake."""
        b: StartIn = call.body
        out = await self.nbd.start_export(export_name=b.export_name, port=b.port, path=b.qcow2_path,
                                          read_only=b.read_only, shared_connections=b.shared_connections,
                                          actor=call.actor)
        return {"pid": out.pid, "port": out.port, "export_name": out.export_name, "status": out.status}

    @route("POST", "/nbd/qemu-nbd/stop", errors=(NotFound, Conflict, *CALLS_OUT),
           body=StopIn, auth=Auth.ADMIN, tags=("nbd",))
    async def stop(self, call: Call) -> Stopped:
        """Stop an export by pid or export name."""
        b: StopIn = call.body
        if (b.pid is None) == (b.export_name is None):
            raise Invalid("say which export", "send exactly one of pid or export_name")
        return await self.nbd.stop_export(pid=b.pid, export_name=b.export_name, actor=call.actor)

    @route("GET", "/nbd/qemu-nbd/list", errors=CALLS_OUT, auth=Auth.ADMIN, tags=("nbd",))
    async def list(self, call: Call) -> dict[str, Any]:
        """Running exports with their clients and limits."""
        return {"processes": await self.nbd.exports()}
