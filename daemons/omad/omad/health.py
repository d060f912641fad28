"""The appliance's health: the database and each agent; degraded when any part is not well."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from oma_common import __version__
from oma_common.web import now_rfc3339

from .clients.agents import Agents
from .store.db import Database

log = logging.getLogger(__name__)

# Told each report's components (name → the agent's own report): what an agent's health says about the
# resources omad records (restore-mounter's broken mounts) is news omad writes down.
Watcher = Callable[[Mapping[str, Mapping[str, Any]]], Awaitable[None]]


class Health:
    def __init__(self, db: Database, agents: Agents, watchers: Sequence[Watcher] = ()) -> None:
        self.db = db
        self.agents = agents
        self.watchers = tuple(watchers)

    async def report(self, *, detailed: bool) -> dict[str, Any]:
        db_ok = await self.db.ping()
        components: dict[str, Any] = {"database": {"status": "ok" if db_ok else "error"}}
        components.update(await self.agents.health())
        for watch in self.watchers:
            try:
                await watch(components)
            except Exception:  # the report is still due; what went wrong goes to the log
                log.exception("a health watcher failed")
        healthy = db_ok and all(c.get("status") == "ok" for c in components.values())
        if not detailed:
            components = {name: {"status": c.get("status", "unknown")} for name, c in components.items()}
        return {"service": "OMA API", "status": "healthy" if healthy else "degraded", "timestamp": now_rfc3339(),
                "version": __version__, "database": "connected" if db_ok else "error", "components": components}
