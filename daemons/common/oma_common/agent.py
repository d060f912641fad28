"""What the three root agents share: their base config, their unix-socket app, and their life cycle."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from . import __version__, config, logs, rpc, schema
from .daemon import SocketConfig, StopSignal
from .notify import Notifier
from .openapi import AgentDocs
from .web import Auth, BoundRoute, Call, collect, error_middleware, mount, route

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AgentConfig:
    """Options every agent has."""

    log_level: str = schema.spec("INFO", description="DEBUG, INFO, WARNING or ERROR")
    run_dir: str = schema.spec("/run/oma", description="runtime directory (sockets)")
    state_dir: str = schema.spec("", description="persistent state; empty = /var/lib/oma/<daemon>")
    socket: SocketConfig = schema.spec(factory=SocketConfig, description="the agent's unix socket")

    def state_path(self, daemon: str) -> Path:
        p = Path(self.state_dir) if self.state_dir else Path("/var/lib/oma") / daemon
        p.mkdir(parents=True, exist_ok=True)
        return p


class HealthApi:
    """GET /health for an agent: alive, and whatever state the agent reports."""

    def __init__(self, daemon: str, report: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.daemon = daemon
        self.report = report
        self.started = time.monotonic()

    @route("GET", "/health", auth=Auth.PEER)
    async def health(self, call: Call) -> dict[str, Any]:
        """The agent's state."""
        return {"daemon": self.daemon, "status": "ok", "version": __version__, "pid": os.getpid(),
                "uptime_seconds": round(time.monotonic() - self.started, 1), **await self.report()}


def make_app(routes: list[BoundRoute], allowed_users: list[str | int]) -> web.Application:
    uids = rpc.resolve_uids(allowed_users)
    app = web.Application(middlewares=[error_middleware, rpc.peer_check_middleware(uids)],
                          client_max_size=4 * 1024 * 1024)
    mount(app, routes)
    return app


async def serve(daemon: str, cfg: AgentConfig, apis: list[Any], *,
                report: Callable[[], Awaitable[dict[str, Any]]],
                reconcile: Callable[[], Awaitable[str]] | None = None,
                drain: Callable[[], Awaitable[None]] | None = None,
                close: Callable[[], Awaitable[None]] | None = None) -> int:
    """Bind → reconcile → READY → wait for a stop signal → drain → close. Returns the exit code.

    `drain` runs first on the way out, while the socket still serves: it ends work in flight that must not be
    waited out (its requests still get their answers, before the server stops and waits for the rest)."""
    notifier = Notifier()
    stop = StopSignal()
    docs = AgentDocs(daemon, f"{daemon}'s API on its unix socket, for omad (oma_common.contracts.*)")
    routes = collect(HealthApi(daemon, report), docs, *apis)
    docs.build(routes)
    app = make_app(routes, cfg.socket.allowed_users)
    server = rpc.UnixServer(app, cfg.socket.socket_path(cfg.run_dir, daemon), mode=cfg.socket.mode,
                            group=cfg.socket.group)
    try:
        await server.start()
    except rpc.AlreadyRunning as e:
        log.error("%s; refusing to start a second instance", e)
        return 1
    try:
        summary = await reconcile() if reconcile else ""
        notifier.ready(summary or "serving")
        await stop.wait()
        notifier.stopping()
    finally:
        try:
            if drain:
                await drain()
        finally:
            await server.stop()
            if close:
                await close()
            log.info("stopped")
    return 0


C = TypeVar("C", bound=AgentConfig)


def load(cls: type[C], daemon: str, description: str) -> tuple[C, bool]:
    """Parse the common arguments and the config; returns (the typed config, exit_now)."""
    args = config.arg_parser(daemon, description).parse_args()
    cfg: C = config.load_from_args(cls, daemon, args)
    if args.show_config:
        print(config.dump(cfg))
        return cfg, True
    logs.setup(daemon, args.log_level or cfg.log_level)
    return cfg, False
