"""nbd-pool's socket API as calls: ports and qemu-nbd exports (read-only attachments are
restore-mounter's business).

The shapes are nbd-pool's contract, declared once in oma_common.contracts.nbd_pool (nbd-pool's handlers use
the same classes; its OpenAPI document is at GET /openapi.json on its socket). Requests are built from the
contract's dataclasses and every answer is parsed into them (a misfit is nbd-pool failing: Unavailable);
409 exhausted carries `available` / `available_slots`, 404 answers renewing a job without leases.
`GET /roots` says where images may be exported from and which drop-in changes that.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote

from oma_common.contracts.nbd_pool import (
    Allocated,
    AllocateIn,
    Export,
    ExportIn,
    ExportList,
    PortStatus,
    Released,
    ReleaseIn,
    Renewed,
    RenewIn,
    RootsView,
    Stopped,
    StopIn,
)
from oma_common.errors import Unavailable
from oma_common.rpc import AgentClient


class NbdPool:
    def __init__(self, client: AgentClient) -> None:
        self.client = client

    async def allocate(self, job_id: str, count: int, export_names: list[str] | None = None,
                       lease_seconds: int | None = None) -> Allocated:
        body = AllocateIn(job_id, count, export_names, lease_seconds)
        return await self.client.typed(Allocated, "POST", "/ports/allocate", body=body)

    async def allocate_named(self, job_id: str, export_names: list[str], lease_seconds: int) -> dict[str, int]:
        """One port per export name, leased to the job: {export name: port}."""
        out = await self.allocate(job_id, len(export_names), export_names, lease_seconds=lease_seconds)
        ports = {a.export_name: a.port for a in out.allocated_ports if a.export_name is not None}
        if set(ports) != set(export_names):
            raise Unavailable("nbd-pool answered unexpectedly", f"ports were allocated for {sorted(ports)}")
        return ports

    async def release(self, job_id: str | None = None, ports: list[int] | None = None) -> Released:
        return await self.client.typed(Released, "POST", "/ports/release", body=ReleaseIn(job_id, ports))

    async def renew(self, job_id: str, lease_seconds: int | None = None) -> Renewed:
        return await self.client.typed(Renewed, "POST", "/ports/renew", body=RenewIn(job_id, lease_seconds))

    async def status(self) -> PortStatus:
        return await self.client.typed(PortStatus, "GET", "/ports/status")

    async def start_export(self, *, export_name: str, port: int, path: str, read_only: bool = False,
                           shared_connections: int = 10, fmt: Literal["qcow2", "raw"] | None = None,
                           job_id: str | None = None) -> Export:
        body = ExportIn(export_name, port, path, fmt, read_only, shared_connections, job_id)
        return await self.client.typed(Export, "POST", "/exports", body=body, timeout=60)

    async def stop_export(self, *, pid: int | None = None, export_name: str | None = None) -> Stopped:
        body = StopIn(pid, None) if pid is not None else StopIn(None, export_name)
        return await self.client.typed(Stopped, "POST", "/exports/stop", body=body, timeout=60)

    async def exports(self) -> list[Export]:
        return (await self.client.typed(ExportList, "GET", "/exports")).processes

    async def release_job(self, job_id: str) -> Released:
        """Stop every export of the job and free its ports (cleanup after success or failure)."""
        return await self.client.typed(Released, "POST", f"/jobs/{quote(job_id, safe='')}/release", timeout=60)

    async def roots(self) -> RootsView:
        """Where images may be exported from, and the drop-in an operator changes that in."""
        return await self.client.typed(RootsView, "GET", "/roots")
