"""Fault injection: per-endpoint misbehaviour (delay, 5xx, malformed JSON, dropped connection) and
per-job misbehaviour (fail mid-transfer, never complete, disconnect, refuse to start)."""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
from typing import Optional

from aiohttp import web

API_PREFIX = "/api/v1/"

# Endpoint modes.
DELAY = "delay"          # sleep `seconds`, then answer normally (a long delay is a client timeout)
ERROR = "error"          # answer `status` with a plain-text `body`
MALFORMED = "malformed"  # answer 200 with a truncated JSON body
DROP = "drop"            # close the connection without any answer
ENDPOINT_MODES = (DELAY, ERROR, MALFORMED, DROP)

# Job modes.
FAIL = "fail"              # write `after_bytes`, then report failure by telemetry (error set); never complete
HANG = "hang"              # write everything, then never complete (no complete / change-id call)
DISCONNECT = "disconnect"  # write `after_bytes`, then go silent: no telemetry, no completion, progress frozen
REFUSE = "refuse"          # answer the start call with status "failed" and run nothing
HOLD = "hold"              # write `after_disks` disks, then wait (telemetry going on) until `release` is set
JOB_MODES = (FAIL, HANG, DISCONNECT, REFUSE, HOLD)

MALFORMED_BODY = '{"vcenter": {"host": "vcenter.sim.local", "datacenter": "DC1"}, "vms": [{"id": "42'


def _full_path(path: str) -> str:
    return path if path.startswith("/") else API_PREFIX + path


@dataclasses.dataclass
class EndpointFault:
    """Misbehave on requests whose path matches `path` (an fnmatch pattern; a path without a
    leading "/" is under /api/v1/, e.g. "discover" or "vm/*/power-off")."""

    path: str
    mode: str
    method: Optional[str] = None  # None: any method
    seconds: float = 0.0  # DELAY
    status: int = 500  # ERROR
    body: str = "Internal Server Error: injected fault"  # ERROR (plain text) / MALFORMED (raw)
    times: Optional[int] = None  # how many requests it hits; None: every one
    hits: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ENDPOINT_MODES:
            raise ValueError(f"unknown endpoint fault mode {self.mode!r}")
        self.path = _full_path(self.path)

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return fnmatch.fnmatchcase(path, self.path)


@dataclasses.dataclass
class JobFault:
    """Misbehave in a backup or replication job; matches on any of kind / job_id / vm_name given."""

    mode: str
    after_bytes: int = 1024 * 1024  # FAIL, DISCONNECT: data bytes written before stopping
    message: str = "injected failure: NBD write failed (connection reset by peer)"
    kind: Optional[str] = None  # "backup" | "replication" | None: either
    job_id: Optional[str] = None
    vm_name: Optional[str] = None
    times: Optional[int] = 1  # None: every matching job
    hits: int = 0
    after_disks: int = 1  # HOLD: disks written before the pause
    release: Optional[asyncio.Event] = None  # HOLD: set it to let the job go on
    held: Optional[asyncio.Event] = None  # HOLD: set by the job once it waits

    def __post_init__(self) -> None:
        if self.mode not in JOB_MODES:
            raise ValueError(f"unknown job fault mode {self.mode!r}")

    def matches(self, kind: str, job_id: str, vm_name: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (
            (self.kind is None or self.kind == kind)
            and (self.job_id is None or self.job_id == job_id)
            and (self.vm_name is None or self.vm_name == vm_name)
        )


class Faults:
    """The faults armed on one simulator; tests add them, the app consumes them."""

    def __init__(self) -> None:
        self.endpoint_faults: list[EndpointFault] = []
        self.job_faults: list[JobFault] = []

    # -- endpoints --------------------------------------------------------------------------------

    def add_endpoint(self, fault: EndpointFault) -> EndpointFault:
        self.endpoint_faults.append(fault)
        return fault

    def delay(self, path: str, seconds: float, *, method: Optional[str] = None, times: Optional[int] = None) -> EndpointFault:
        return self.add_endpoint(EndpointFault(path, DELAY, method=method, seconds=seconds, times=times))

    def error(self, path: str, status: int = 500, body: str = "Internal Server Error: injected fault", *,
              method: Optional[str] = None, times: Optional[int] = None) -> EndpointFault:
        return self.add_endpoint(EndpointFault(path, ERROR, method=method, status=status, body=body, times=times))

    def malformed(self, path: str, *, body: str = MALFORMED_BODY, method: Optional[str] = None,
                  times: Optional[int] = None) -> EndpointFault:
        return self.add_endpoint(EndpointFault(path, MALFORMED, method=method, body=body, times=times))

    def drop(self, path: str, *, method: Optional[str] = None, times: Optional[int] = None) -> EndpointFault:
        return self.add_endpoint(EndpointFault(path, DROP, method=method, times=times))

    def take_endpoint(self, method: str, path: str) -> Optional[EndpointFault]:
        """The first armed fault for this request, counted as hit."""
        for fault in self.endpoint_faults:
            if fault.matches(method, path):
                fault.hits += 1
                return fault
        return None

    # -- jobs -------------------------------------------------------------------------------------

    def add_job(self, fault: JobFault) -> JobFault:
        self.job_faults.append(fault)
        return fault

    def fail_job(self, *, after_bytes: int = 1024 * 1024, message: Optional[str] = None, **match: object) -> JobFault:
        fault = JobFault(FAIL, after_bytes=after_bytes, **match)  # type: ignore[arg-type]
        if message is not None:
            fault.message = message
        return self.add_job(fault)

    def hang_job(self, **match: object) -> JobFault:
        return self.add_job(JobFault(HANG, **match))  # type: ignore[arg-type]

    def disconnect_job(self, *, after_bytes: int = 1024 * 1024, **match: object) -> JobFault:
        return self.add_job(JobFault(DISCONNECT, after_bytes=after_bytes, **match))  # type: ignore[arg-type]

    def refuse_job(self, message: str = "failed to create VM snapshot: another task is in progress",
                   **match: object) -> JobFault:
        return self.add_job(JobFault(REFUSE, message=message, **match))  # type: ignore[arg-type]

    def hold_job(self, *, after_disks: int = 1, **match: object) -> JobFault:
        """Write `after_disks` disks, then pause (still sending telemetry) until `fault.release` is set."""
        return self.add_job(JobFault(HOLD, after_disks=after_disks, release=asyncio.Event(),  # type: ignore[arg-type]
                                     held=asyncio.Event(), **match))

    def take_job(self, kind: str, job_id: str, vm_name: str) -> Optional[JobFault]:
        for fault in self.job_faults:
            if fault.matches(kind, job_id, vm_name):
                fault.hits += 1
                return fault
        return None

    def clear(self) -> None:
        self.endpoint_faults.clear()
        self.job_faults.clear()


async def apply_endpoint_fault(fault: EndpointFault, request: web.Request, closing: asyncio.Event) -> Optional[web.StreamResponse]:
    """Carry out an endpoint fault. None means "now answer normally" (after a delay)."""
    if fault.mode == DELAY:
        # Sleep, but end early when the simulator shuts down so its cleanup never waits on us.
        try:
            await asyncio.wait_for(closing.wait(), timeout=fault.seconds)
        except asyncio.TimeoutError:
            pass
        return None
    if fault.mode == ERROR:
        return web.Response(status=fault.status, text=fault.body, content_type="text/plain")
    if fault.mode == MALFORMED:
        return web.Response(status=200, text=fault.body, content_type="application/json")
    # DROP: abort the socket (RST, no answer). The response returned below is never sent: aiohttp
    # finds the transport closing and treats it as a client gone away (no error logged).
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.Response(status=500, text="dropped", content_type="text/plain")
