"""Running the simulator on a TCP port: `async with VMASim(...) as sim` in tests, or from the CLI."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Optional, Union

from aiohttp import web

from .app import make_app
from .inventory import Inventory
from .state import SimState


class VMASim:
    """A simulated VMA listening on host:port (port 0 picks a free one).

    `url` is the base the OMA's VMA client is configured with (production: http://127.0.0.1:9081);
    `api_url` is `url + "/api/v1"`. `state` is the SimState to drive from the test."""

    def __init__(
        self,
        inventory: Optional[Inventory] = None,
        *,
        state: Optional[SimState] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        oma_url: Optional[str] = None,
        workdir: Union[str, Path, None] = None,
    ) -> None:
        self._own_state = state is None
        if state is None:
            state = SimState(inventory, workdir=workdir, oma_url=oma_url)
        elif inventory is not None or oma_url is not None or workdir is not None:
            raise ValueError("pass either a state or the parts of one, not both")
        self.state = state
        self._host = host
        self._port = port
        self._runner: Optional[web.AppRunner] = None
        self.port: Optional[int] = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the simulator is not running")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + "/api/v1"

    async def start(self) -> "VMASim":
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        # access_log=None: the tests read state.requests instead.
        self._runner = web.AppRunner(make_app(self.state), access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        return self

    async def close(self) -> None:
        """Stop serving: injected delays and hanging jobs end, running jobs are cancelled
        (their NBD clients killed), the OMA client closes. A state built here has its temporary
        workdir removed; a state passed in is left as it is (start() may serve it again)."""
        self.state.closing.set()
        if self.state.inflight:
            # Handlers whose client already left (a timed-out delay) are not awaited by every
            # aiohttp's shutdown; let them finish so none is destroyed pending.
            await asyncio.wait(set(self.state.inflight), timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.port = None
        if self._own_state:
            self.state.remove_workdir()

    async def __aenter__(self) -> "VMASim":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
