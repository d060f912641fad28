"""The VMA's HTTP API (`/api/v1`) as an aiohttp application over a SimState."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from .faults import apply_endpoint_fault
from .jobs import FAILED
from .oma import OmaClient
from .state import RecordedRequest, SimState, now_rfc3339
from .workflows import AlreadyRunning, BadRequest, JobManager, LoginFailed, Refused

log = logging.getLogger(__name__)

VERSION = "vmasim-1.0"

# The real VMA (Go) writes UTF-8 as is, not \u escapes.
_dumps = functools.partial(json.dumps, ensure_ascii=False)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PlainError(Exception):
    """Answer `status` with a plain-text body, as the real VMA does for every error."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


def _make_middlewares(state: SimState) -> list[Any]:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()  # cached by aiohttp: handlers can still read the body
        text = raw.decode("utf-8", errors="replace")
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        state.requests.append(RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=dict(request.headers),
            body=text,
            json=parsed,
            at=time.time(),
        ))
        task = asyncio.current_task()
        if task is None:
            return await handler(request)
        state.inflight.add(task)
        try:
            return await handler(request)
        finally:
            state.inflight.discard(task)

    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        fault = state.faults.take_endpoint(request.method, request.path)
        if fault is not None:
            log.info("fault %s on %s %s", fault.mode, request.method, request.path)
            response = await apply_endpoint_fault(fault, request, state.closing)
            if response is not None:
                return response
        return await handler(request)

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except PlainError as e:
            return _plain(e.status, e.text)
        except web.HTTPException as e:
            # aiohttp's own 404/405 for unknown routes: plain text like everything else.
            if e.status >= 400:
                return _plain(e.status, e.reason)
            raise
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.path)
            return _plain(500, "internal server error")

    return [record, inject, errors]


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as e:
        raise PlainError(400, f"invalid JSON body: {e}") from e
    if not isinstance(body, dict):
        raise PlainError(400, "request body must be a JSON object")
    return body


class Handlers:
    def __init__(self, state: SimState, jobs: JobManager) -> None:
        self.state = state
        self.jobs = jobs

    def _login(self, host: Any, username: Any, password: Any) -> None:
        problem = self.state.inventory.check_host(host)
        if problem:
            raise PlainError(500, problem)
        problem = self.state.inventory.check_credentials(username, password)
        if problem:
            raise PlainError(self.state.auth_failure_status, problem)

    async def health(self, request: web.Request) -> web.Response:
        running = sum(1 for j in self.state.jobs.values() if j.status not in ("Succeeded", FAILED))
        return _json({
            "status": "healthy",
            "service": "VMA API",
            "version": VERSION,
            "timestamp": now_rfc3339(),
            "active_jobs": running,
        })

    async def discover(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        self._login(body.get("vcenter"), body.get("username"), body.get("password"))
        dc = body.get("datacenter")
        if dc and dc != self.state.inventory.datacenter:
            raise PlainError(500, f"failed to find datacenter {dc!r}: datacenter '{dc}' not found")
        name_filter = body.get("filter")
        if name_filter is not None and not isinstance(name_filter, str):
            raise PlainError(400, "filter must be a string")
        return _json(self.state.inventory.discovery(name_filter))

    def _vm_by_uuid(self, request: web.Request) -> Any:
        vm_uuid = request.match_info["vm_uuid"]
        for vm in self.state.inventory.vms:
            if vm.id == vm_uuid:
                return vm
        raise PlainError(500, f"failed to find VM {vm_uuid}: vm '{vm_uuid}' not found")

    async def power_state(self, request: web.Request) -> web.Response:
        vm = self._vm_by_uuid(request)
        return _json({"vm_id": vm.id, "power_state": vm.power_state})

    async def _power(self, request: web.Request, target: str) -> web.Response:
        body = await _json_body(request)
        self._login(body.get("vcenter"), body.get("username"), body.get("password"))
        vm = self._vm_by_uuid(request)
        if body.get("vm_id") and body["vm_id"] != vm.id:
            raise PlainError(400, f"vm_id {body['vm_id']!r} does not match the URL's {vm.id!r}")
        previous = vm.power_state
        vm.power_state = target
        verb = "on" if target == "poweredOn" else "off"
        message = f"VM already powered {verb}" if previous == target else f"VM powered {verb}"
        return _json({
            "success": True,
            "vm_id": vm.id,
            "previous_state": previous,
            "new_state": target,
            "message": message,
            "force": bool(body.get("force", False)),
            "timestamp": now_rfc3339(),
        })

    async def power_off(self, request: web.Request) -> web.Response:
        return await self._power(request, "poweredOff")

    async def power_on(self, request: web.Request) -> web.Response:
        return await self._power(request, "poweredOn")

    async def backup_start(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            job = self.jobs.start_backup(body)
        except BadRequest as e:
            raise PlainError(400, str(e)) from e
        except AlreadyRunning as e:
            raise PlainError(409, str(e)) from e
        except Refused as e:
            status = self.state.auth_failure_status if isinstance(e, LoginFailed) else 500
            raise PlainError(status, str(e)) from e
        if job.status == FAILED:
            return _json({"job_id": job.job_id, "status": "failed", "message": job.last_error,
                                      "started_at": job.started_at})
        return _json({"job_id": job.job_id, "status": "started",
                                  "message": f"{job.sync_type} backup of {job.vm_name} started ({len(job.disks)} disks)",
                                  "started_at": job.started_at}, status=202)

    async def replicate(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            job = self.jobs.start_replication(body)
        except BadRequest as e:
            raise PlainError(400, str(e)) from e
        except AlreadyRunning as e:
            raise PlainError(409, str(e)) from e
        except Refused as e:
            status = self.state.auth_failure_status if isinstance(e, LoginFailed) else 500
            raise PlainError(status, str(e)) from e
        return _json({"job_id": job.job_id, "status": "failed" if job.status == FAILED else "started",
                                  "vm_count": len(body["vm_paths"]), "started_at": job.started_at})

    async def progress(self, request: web.Request) -> web.Response:
        job = self.state.jobs.get(request.match_info["job_id"])
        if job is None:
            raise PlainError(404, f"job {request.match_info['job_id']} not found")
        return _json(job.progress_body())


def make_app(state: SimState) -> web.Application:
    """The simulated VMA; run it with any aiohttp runner (VMASim does)."""
    jobs = JobManager(state)
    h = Handlers(state, jobs)
    app = web.Application(middlewares=_make_middlewares(state))
    app.add_routes([
        web.get("/api/v1/health", h.health),
        web.post("/api/v1/discover", h.discover),
        web.get("/api/v1/vm/{vm_uuid}/power-state", h.power_state),
        web.post("/api/v1/vm/{vm_uuid}/power-off", h.power_off),
        web.post("/api/v1/vm/{vm_uuid}/power-on", h.power_on),
        web.post("/api/v1/backup/start", h.backup_start),
        web.post("/api/v1/replicate", h.replicate),
        web.get("/api/v1/progress/{job_id}", h.progress),
    ])

    session_holder: list[aiohttp.ClientSession] = []

    async def on_startup(app: web.Application) -> None:
        state.closing = asyncio.Event()  # fresh: an Event is bound to the loop that first waits on it
        session = aiohttp.ClientSession()
        session_holder.append(session)
        jobs.oma = OmaClient(state, session)

    async def on_shutdown(app: web.Application) -> None:
        state.closing.set()  # ends injected delays and never-completing jobs
        await jobs.shutdown()

    async def on_cleanup(app: web.Application) -> None:
        for session in session_holder:
            await session.close()
        session_holder.clear()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
