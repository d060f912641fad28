"""restore-mounter's entry point: config → logging → mounts → bind → reconcile → READY → serve → drain."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common import agent, daemon, schema

DAEMON = "restore-mounter"


@dataclasses.dataclass
class Config(agent.AgentConfig):
    """restore-mounter's options."""

    mount_root: str = schema.spec("/var/lib/oma/restore", description="where restore mounts are made")
    idle_timeout_seconds: int = schema.spec(3600, min=1, description="a mount idle this long is removed")
    max_mounts: int = schema.spec(8, min=1, max=64, description="mounts at once (each holds an attach slot)")


async def amain() -> int:
    cfg, exit_now = agent.load(Config, DAEMON, "read-only restore mounts and the file access inside them")
    if exit_now:
        return 0
    cfg.state_path(DAEMON)

    async def report() -> dict[str, Any]:
        return {"active_mounts": 0, "max_mounts": cfg.max_mounts}

    return await agent.serve(DAEMON, cfg, [], report=report)


def main() -> None:
    daemon.run(amain)
