"""The appliance's health: the database and each agent; degraded when any part is not well."""

from __future__ import annotations

from typing import Any

from oma_common import __version__
from oma_common.web import now_rfc3339

from .clients.agents import Agents
from .store.db import Database


class Health:
    def __init__(self, db: Database, agents: Agents) -> None:
        self.db = db
        self.agents = agents

    async def report(self, *, detailed: bool) -> dict[str, Any]:
        db_ok = await self.db.ping()
        components: dict[str, Any] = {"database": {"status": "ok" if db_ok else "error"}}
        components.update(await self.agents.health())
        healthy = db_ok and all(c.get("status") == "ok" for c in components.values())
        if not detailed:
            components = {name: {"status": c.get("status", "unknown")} for name, c in components.items()}
        return {"service": "OMA API", "status": "healthy" if healthy else "degraded", "timestamp": now_rfc3339(),
                "version": __version__, "database": "connected" if db_ok else "error", "components": components}
