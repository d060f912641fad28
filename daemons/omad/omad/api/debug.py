"""/debug: health, failover jobs, the declared endpoints and recent log lines — administrators only."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from oma_common.errors import CALLS_OUT
from oma_common.schema import spec
from oma_common.web import Auth, Call, RouteSpec, route

from ..adapters import logread
from ..failover.service import Failovers
from ..health import Health

_TAGS = ("debug",)


@dataclasses.dataclass
class LogsQuery:
    limit: int = spec(100, min=1, max=10000, description="at most this many lines, the newest")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = spec(
        "INFO", description="lines at this level or above")


class DebugApi:
    def __init__(self, health: Health, failovers: Failovers, routes: Callable[[], list[RouteSpec]],
                 log_files: list[Path]) -> None:
        self.health = health
        self.failovers = failovers
        self.routes = routes
        self.log_files = log_files

    @route("GET", "/debug/health", auth=Auth.ADMIN, tags=_TAGS)
    async def get_health(self, call: Call) -> dict[str, Any]:
        """The detailed health report."""
        return await self.health.report(detailed=True)

    @route("GET", "/debug/failover-jobs", auth=Auth.ADMIN, tags=_TAGS)
    async def failover_jobs(self, call: Call) -> dict[str, Any]:
        """Failover jobs at work and the 50 latest, with their steps."""
        return await self.failovers.overview()

    @route("GET", "/debug/endpoints", auth=Auth.ADMIN, tags=_TAGS)
    async def endpoints(self, call: Call) -> dict[str, Any]:
        """Every declared route: method, path, who may call it."""
        routes = [{"method": r.method, "path": r.path, "auth": r.auth.value, "tags": list(r.tags)}
                  for r in self.routes()]
        return {"count": len(routes), "endpoints": routes}

    @route("GET", "/debug/logs", query=LogsQuery, auth=Auth.ADMIN, errors=CALLS_OUT, tags=_TAGS)
    async def logs(self, call: Call) -> dict[str, Any]:
        """The daemons' recent log lines: the configured log files, else the journal."""
        q: LogsQuery = call.query
        if self.log_files:
            lines, source = await logread.from_files(self.log_files, q.limit, q.level), "files"
        else:
            lines, source = await logread.from_journal(q.limit, q.level), "journal"
        return {"source": source, "level": q.level, "limit": q.limit, "count": len(lines), "lines": lines}
