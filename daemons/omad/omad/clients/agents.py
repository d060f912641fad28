"""The three root agents, reached over their unix sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from oma_common.errors import OmaError
from oma_common.rpc import AgentClient

from ..config import Config

AGENT_NAMES = ("nbd-pool", "restore-mounter", "volume-agent")


class Agents:
    def __init__(self, cfg: Config) -> None:
        self.health_timeout = cfg.agents.health_timeout_seconds
        self.clients = {name: AgentClient(name, cfg.agent_socket(name), cfg.agents.timeout_seconds)
                        for name in AGENT_NAMES}

    @property
    def nbd_pool(self) -> AgentClient:
        return self.clients["nbd-pool"]

    @property
    def restore_mounter(self) -> AgentClient:
        return self.clients["restore-mounter"]

    @property
    def volume_agent(self) -> AgentClient:
        return self.clients["volume-agent"]

    async def health(self) -> dict[str, dict[str, Any]]:
        """Each agent's own health report, or why it could not be had."""

        async def one(client: AgentClient) -> dict[str, Any]:
            try:
                return await client.call("GET", "/health", timeout=self.health_timeout)  # type: ignore[no-any-return]
            except OmaError as e:
                return {"status": "unavailable", "error": e.message, "details": e.details}

        reports = await asyncio.gather(*(one(c) for c in self.clients.values()))
        return dict(zip(self.clients, reports))

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()
