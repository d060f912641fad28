"""volume-agent's entry point: config → logging → volumes → bind → reconcile → READY → serve → drain."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common import agent, daemon, schema

DAEMON = "volume-agent"


@dataclasses.dataclass
class Config(agent.AgentConfig):
    """volume-agent's options."""

    device_dir: str = schema.spec("/dev/disk/by-id", description="where attached volumes appear "
                                                                "(virtio-<serial> links)")


async def amain() -> int:
    cfg, exit_now = agent.load(Config, DAEMON, "CloudStack volume life cycle and the volume-to-device map")
    if exit_now:
        return 0
    cfg.state_path(DAEMON)

    async def report() -> dict[str, Any]:
        return {"device_dir": cfg.device_dir}

    return await agent.serve(DAEMON, cfg, [], report=report)


def main() -> None:
    daemon.run(amain)
