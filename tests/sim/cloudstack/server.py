"""The HTTP side: `/client/api` (GET query or POST form), signatures checked, answers in `<command>response`
envelopes with CloudStack's status codes; `/admin/*` (unsigned, for tests) sets faults and dumps state."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from . import signature
from .commands import Commands, Faults
from .devices import DeviceHost
from .state import BAD_SIGNATURE, PARAM_ERROR, UNAUTHORIZED, CloudStackError, Inventory

log = logging.getLogger("cloudstack_sim")

API_PATH = "/client/api"
DEFAULT_KEY = "sim-api-key"
DEFAULT_SECRET = "sim-secret-key"
DEFAULT_APPLIANCE_MAC = "02:00:0a:01:00:0a"


def _reply(command: str, body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(text=json.dumps({f"{command.lower()}response": body}), status=status,
                        content_type="application/json", charset="UTF-8")


class CloudStackSim:
    """A CloudStack management server on host:port (port 0 picks a free one); `endpoint` is what a client is
    configured with. `devices` is where attached volumes of the appliance VM appear; `data_dir` holds the
    volumes' and snapshots' data. `inv` and `faults` are the test's to read and change."""

    def __init__(self, data_dir: Path, device_dir: Path, *, api_key: str = DEFAULT_KEY,
                 secret_key: str = DEFAULT_SECRET, appliance_mac: str = DEFAULT_APPLIANCE_MAC,
                 host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None) -> None:
        self.api_key = api_key
        self.secret_key = secret_key
        self.inv = Inventory.seed(api_key=api_key, secret_key=secret_key, appliance_mac=appliance_mac)
        self.devices = DeviceHost(data_dir, device_dir)
        self.faults = faults or Faults()
        self.commands = Commands(self.inv, self.devices, self.faults)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self.threaded: ThreadedSim | None = None  # set when it runs on its own thread

    # -- life cycle ------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}{API_PATH}"

    @property
    def appliance_vm_id(self) -> str:
        return self.inv.appliance_vm_id

    async def start(self) -> CloudStackSim:
        app = web.Application()
        app.router.add_route("GET", API_PATH, self._api)
        app.router.add_route("POST", API_PATH, self._api)
        app.router.add_route("POST", "/admin/faults", self._set_faults)
        app.router.add_route("GET", "/admin/state", self._state)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("CloudStack simulator at %s (appliance VM %s)", self.endpoint, self.appliance_vm_id)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.commands.stop()
        await self.devices.cleanup()

    async def __aenter__(self) -> CloudStackSim:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the API ---------------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        params = {k: v for k, v in request.query.items()}
        if request.method == "POST":
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        command = params.get("command", "")
        if not command:
            return _reply("error", CloudStackError(PARAM_ERROR, "no command specified").body(), PARAM_ERROR)
        lowered = {k.lower(): v for k, v in params.items()}
        account = self.inv.account_by_key(lowered.get("apikey", ""))
        if account is None or not signature.verify(params, account.secret_key):
            log.info("refused %s: bad api key, signature or expiry", command)
            return _reply(command, CloudStackError(UNAUTHORIZED, BAD_SIGNATURE).body(), UNAUTHORIZED)
        try:
            body = await self.commands.dispatch(command, lowered)
        except CloudStackError as e:
            return _reply(command, e.body(), e.code)
        return _reply(command, body)

    async def _set_faults(self, request: web.Request) -> web.Response:
        self.faults.update(await request.json())
        return web.json_response(dataclasses.asdict(self.faults))

    async def _state(self, request: web.Request) -> web.Response:
        inv = self.inv
        return web.json_response({
            "appliance_vm_id": inv.appliance_vm_id,
            "volumes": [inv.volume_view(v) for v in inv.volumes.values()],
            "snapshots": [inv.snapshot_view(s) for s in inv.snapshots.values()],
            "devices": dict(self.devices.loops), "calls": self.commands.calls})

    # -- for tests -------------------------------------------------------------------------------------

    def volume(self, volume_id: str) -> dict[str, Any] | None:
        vol = self.inv.volumes.get(volume_id)
        return None if vol is None else self.inv.volume_view(vol)

    def attached_here(self) -> list[str]:
        return [v.id for v in self.inv.volumes_of(self.appliance_vm_id) if v.type == "DATADISK"]


class ThreadedSim:
    """The simulator on its own event loop in a thread: it keeps answering while a test blocks its own loop
    (starting daemons synchronously, waiting on a subprocess)."""

    def __init__(self, sim: CloudStackSim) -> None:
        self.sim = sim
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cloudstack-sim", daemon=True)

    def start(self) -> CloudStackSim:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.start(), self.loop).result(30)
        return self.sim

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the simulator's loop (e.g. to change state consistently)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.sim.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()


@contextlib.contextmanager
def running(data_dir: Path, device_dir: Path, **kwargs: Any) -> Iterator[CloudStackSim]:
    """`with running(tmp / "cs", tmp / "by-id") as sim:` — a threaded simulator, stopped (loop devices
    released) afterwards."""
    threaded = ThreadedSim(CloudStackSim(data_dir, device_dir, **kwargs))
    sim = threaded.start()
    sim.threaded = threaded
    try:
        yield sim
    finally:
        threaded.stop()
