"""An administrator's direct hand on nbd-pool (OMA-API "NBD Port Management"): ports and exports, each audited."""

from __future__ import annotations

import contextlib

from oma_common.contracts.nbd_pool import Allocated, Export, PortStatus, Released, Stopped
from oma_common.errors import OmaError

from .audit import Audit
from .clients.nbdpool import NbdPool


class NbdAdmin:
    """What /api/v1/nbd does: the same calls omad's jobs make, but by a person, so each change is in the trail
    (an export serves an image or a block device to the network)."""

    def __init__(self, pool: NbdPool, audit: Audit) -> None:
        self.pool = pool
        self.audit = audit

    async def allocate(self, job_id: str, export_names: list[str], *, actor: str) -> Allocated:
        out = await self.pool.allocate(job_id, len(export_names), export_names)
        try:
            await self.audit.record(actor, "nbd.ports.allocate", f"nbd_job:{job_id}",
                                    ports={a.export_name: a.port for a in out.allocated_ports})
        except BaseException:  # refused (storage full, say): no unrecorded ports stay allocated
            with contextlib.suppress(OmaError):
                await self.pool.release(None, [a.port for a in out.allocated_ports])
            raise
        return out

    async def release(self, job_id: str | None, ports: list[int] | None, *, actor: str) -> Released:
        out = await self.pool.release(job_id, ports)
        target = f"nbd_job:{job_id}" if job_id is not None else "nbd_ports"
        await self.audit.record(actor, "nbd.ports.release", target, asked_ports=ports,
                                released_ports=out.released_ports, stopped_pids=out.stopped_pids)
        return out

    async def start_export(self, *, export_name: str, port: int, path: str, read_only: bool,
                           shared_connections: int, actor: str) -> Export:
        """A refused export (a path outside the export roots, a port not allocated) is in the trail too."""
        try:
            out = await self.pool.start_export(export_name=export_name, port=port, path=path, read_only=read_only,
                                               shared_connections=shared_connections)
        except OmaError as e:
            await self.audit.record(actor, "nbd.export.start", f"export:{export_name}", outcome="failed",
                                    port=port, path=path, read_only=read_only, error=str(e))
            raise
        try:
            await self.audit.record(actor, "nbd.export.start", f"export:{export_name}", port=port, path=path,
                                    read_only=read_only, pid=out.pid)
        except BaseException:  # refused (storage full, say): no unrecorded export serves the image
            with contextlib.suppress(OmaError):
                await self.pool.stop_export(export_name=export_name)
            raise
        return out

    async def stop_export(self, *, pid: int | None, export_name: str | None, actor: str) -> Stopped:
        out = await self.pool.stop_export(pid=pid, export_name=export_name)
        target = f"export:{export_name}" if export_name is not None else f"pid:{pid}"
        await self.audit.record(actor, "nbd.export.stop", target, stopped_pid=out.stopped_pid)
        return out

    async def status(self) -> PortStatus:
        return await self.pool.status()

    async def exports(self) -> list[Export]:
        return await self.pool.exports()
