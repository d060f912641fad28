"""nbd-pool's socket API (the other side of omad's clients/nbdpool.py): ports, exports, jobs, attachments.

Handlers validate with a schema, call one domain function and return a dict. Until start-up reconciliation
is done a request waits for it (the socket is bound first, so that a second instance is refused early).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from oma_common.contracts.nbd_pool import (
    Allocated,
    AllocateIn,
    AttachIn,
    Attachment,
    AttachmentList,
    Export,
    ExportIn,
    ExportList,
    RootsView,
    PortStatus,
    Released,
    ReleaseIn,
    Renewed,
    RenewIn,
    StopIn,
    Stopped,
    Success,
)
from oma_common.errors import Conflict, Exhausted, NotFound, TimedOut, Unavailable
from oma_common.web import Auth, Call, route

from .attachments import Attachments
from .exports import Exports, StartRequest
from .jobs import Jobs, lease_view
from .pool import Pool
from .roots import Roots

Handler = Callable[[Any, Call], Awaitable[Any]]


class Gate:
    """Opened once start-up reconciliation is done; requests before that wait for it."""

    def __init__(self, timeout: float = 120.0) -> None:
        self.event = asyncio.Event()
        self.timeout = timeout

    def open(self) -> None:
        self.event.set()

    async def wait(self) -> None:
        if self.event.is_set():  # the usual case: no timer and no task (wait_for makes both) for every call
            return
        try:
            await asyncio.wait_for(self.event.wait(), self.timeout)
        except asyncio.TimeoutError:
            raise Unavailable("nbd-pool is starting", "start-up reconciliation is still running; retry") from None


#: What every gated route may answer besides its own errors: 503 while start-up reconciliation runs.
GATED = (Unavailable,)


def gated(fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def wrapper(self: Any, call: Call) -> Any:
        await self.gate.wait()
        return await fn(self, call)

    return wrapper


# --- handlers ----------------------------------------------------------------------------------------------

class PortsApi:
    def __init__(self, pool: Pool, jobs: Jobs, gate: Gate) -> None:
        self.pool = pool
        self.jobs = jobs
        self.gate = gate

    @route("POST", "/ports/allocate", errors=(Exhausted, Conflict, *GATED), body=AllocateIn, response=Allocated, auth=Auth.PEER)
    @gated
    async def allocate(self, call: Call) -> dict[str, Any]:
        """Lease ports to a job, all or none (409 exhausted when the pool cannot)."""
        b: AllocateIn = call.body
        return await self.jobs.allocate(b.job_id, b.count, b.export_names, b.lease_seconds)

    @route("POST", "/ports/release", errors=(NotFound, *GATED), body=ReleaseIn, response=Released, auth=Auth.PEER)
    @gated
    async def release(self, call: Call) -> dict[str, Any]:
        """Free a job's ports or the listed ones; exports running on them are stopped first."""
        b: ReleaseIn = call.body
        return await self.jobs.release(b.job_id, b.ports)

    @route("POST", "/ports/renew", errors=(NotFound, *GATED), body=RenewIn, response=Renewed, auth=Auth.PEER)
    @gated
    async def renew(self, call: Call) -> dict[str, Any]:
        """Extend every lease of a job."""
        b: RenewIn = call.body
        return await self.jobs.renew(b.job_id, b.lease_seconds)

    @route("GET", "/ports/status", errors=GATED, response=PortStatus, auth=Auth.PEER)
    @gated
    async def status(self, call: Call) -> dict[str, Any]:
        """Total, allocated, available, every lease, and the ports other processes hold."""
        out = self.pool.status()
        out["allocations"] = [lease_view(lease) for lease in self.pool.leases()]
        return out


class ExportsApi:
    def __init__(self, exports: Exports, jobs: Jobs, gate: Gate) -> None:
        self.exports = exports
        self.jobs = jobs
        self.gate = gate

    @route("POST", "/exports", errors=(NotFound, Conflict, TimedOut, *GATED),
           body=ExportIn, response=Export, auth=Auth.PEER)
    @gated
    async def start(self, call: Call) -> dict[str, Any]:
        """Export an image or device on a leased port; answers once the export completes an NBD handshake."""
        b: ExportIn = call.body
        return await self.exports.start(StartRequest(b.export_name, b.port, b.path, b.format, b.read_only,
                                                     b.shared_connections, b.job_id))

    @route("POST", "/exports/stop", errors=(NotFound, *GATED), body=StopIn, response=Stopped, auth=Auth.PEER)
    @gated
    async def stop(self, call: Call) -> dict[str, Any]:
        """Stop an export by pid or name; its port stays leased."""
        b: StopIn = call.body
        return {"success": True, "stopped_pid": await self.exports.stop(pid=b.pid, name=b.export_name)}

    @route("GET", "/exports", errors=GATED, response=ExportList, auth=Auth.PEER)
    @gated
    async def list_exports(self, call: Call) -> dict[str, Any]:
        """Running exports with their clients and limits."""
        return {"processes": await self.exports.listing()}

    @route("POST", "/jobs/{job_id}/release", errors=(NotFound, *GATED), response=Released, auth=Auth.PEER)
    @gated
    async def release_job(self, call: Call) -> dict[str, Any]:
        """Stop every export of the job and free its ports."""
        return await self.jobs.release_job(call.params["job_id"])


class RootsApi:
    """The export roots, for omad to refuse a repository no backup could be written into."""

    def __init__(self, roots: Roots, drop_in_dir: Path) -> None:
        self.roots = roots
        self.drop_in_dir = drop_in_dir

    @route("GET", "/roots", response=RootsView, auth=Auth.PEER)
    async def list_roots(self, call: Call) -> RootsView:
        """The configured export roots (and each resolved), and the drop-in directory that changes them."""
        return RootsView([str(r) for r in self.roots.configured], [str(r) for r in self.roots.resolved],
                     str(self.drop_in_dir / "*.toml"), "export_roots")


class AttachmentsApi:
    def __init__(self, attachments: Attachments, gate: Gate) -> None:
        self.attachments = attachments
        self.gate = gate

    @route("POST", "/attachments", errors=(NotFound, Conflict, Exhausted, TimedOut, Unavailable),
           body=AttachIn, response=Attachment, status=201, auth=Auth.PEER)
    @gated
    async def attach(self, call: Call) -> dict[str, Any]:
        """Attach an image read-only as a block device with its partitions (409 exhausted when full)."""
        b: AttachIn = call.body
        return await self.attachments.attach(b.image, b.owner, b.format)

    @route("DELETE", "/attachments/{attachment_id}", errors=(NotFound, Conflict, *GATED), response=Success, auth=Auth.PEER)
    @gated
    async def detach(self, call: Call) -> dict[str, Any]:
        """Detach (409 while a partition is still mounted)."""
        await self.attachments.detach(call.params["attachment_id"])
        return {"success": True}

    @route("GET", "/attachments", errors=GATED, response=AttachmentList, auth=Auth.PEER)
    @gated
    async def list_attachments(self, call: Call) -> dict[str, Any]:
        """Attachments, slots and the backend in use."""
        return self.attachments.listing()
