"""nbd-pool's entry point: config → logging → the pool → bind → reconcile → READY → serve → drain."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common import agent, daemon, schema

DAEMON = "nbd-pool"


@dataclasses.dataclass
class Config(agent.AgentConfig):
    """nbd-pool's options."""

    port_min: int = schema.spec(10100, min=1, max=65535, description="first TCP port of the NBD pool")
    port_max: int = schema.spec(10200, min=1, max=65535, description="last TCP port of the NBD pool")
    bind_address: str = schema.spec("127.0.0.1", description="address qemu-nbd exports listen on "
                                                            "(the VMA arrives through its SSH tunnel)")


async def amain() -> int:
    cfg, exit_now = agent.load(Config, DAEMON, "NBD port pool, qemu-nbd exports and read-only image attach")
    if exit_now:
        return 0
    cfg.state_path(DAEMON)

    async def report() -> dict[str, Any]:
        return {"total_ports": cfg.port_max - cfg.port_min + 1}

    return await agent.serve(DAEMON, cfg, [], report=report)


def main() -> None:
    daemon.run(amain)
