"""GET /health (also under /api/v1): the database and every agent."""

from __future__ import annotations

from typing import Any

from oma_common.web import Auth, Call, route

from ..health import Health


class HealthApi:
    def __init__(self, health: Health) -> None:
        self.health = health

    @route("GET", "/health", auth=Auth.PUBLIC, tags=("health",))
    async def get(self, call: Call) -> dict[str, Any]:
        """The appliance's health: `degraded` when the database, the storage of omad's state or an agent is not
        well (`components.storage`: free bytes where omad keeps its database; degraded below
        `state_min_free_bytes`, or after a write was refused for lack of space, until space is back).

        Without a token each component says only its status; each agent's details (pids, paths, errors) are
        for a caller with a valid token."""
        return await self.health.report(detailed=call.principal is not None)
