"""volume-agent's entry point: config → logging → volumes → bind → reconcile → READY → serve → drain."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from oma_common import agent, daemon, schema

from .api import ImmutabilityApi, RepositoriesApi
from .immutability import Immutability
from .repositories import RepositoryMounts

DAEMON = "volume-agent"


@dataclasses.dataclass
class Config(agent.AgentConfig):
    """volume-agent's options."""

    repository_mount_root: str = schema.spec("/srv/oma/repositories",
                                             description="backup repositories on NFS/CIFS are mounted only "
                                                         "below this directory (root-owned, not writable by omad)")
    mount_timeout_seconds: float = schema.spec(60.0, min=1, description="time limit of one mount or umount")
    immutable_roots: list[str] = schema.spec(factory=list, description="local repository directories whose files "
                                                                       "may be made immutable (chattr +i); the "
                                                                       "share mount root always may")


async def amain() -> int:
    cfg, exit_now = agent.load(Config, DAEMON, "CloudStack volume life cycle and the volume-to-device map")
    if exit_now:
        return 0
    cfg.state_path(DAEMON)
    mounts = RepositoryMounts(Path(cfg.repository_mount_root), timeout=cfg.mount_timeout_seconds)

    immutability = Immutability([Path(cfg.repository_mount_root), *map(Path, cfg.immutable_roots)],
                                timeout=cfg.mount_timeout_seconds)

    async def report() -> dict[str, Any]:
        return {"repository_mount_root": cfg.repository_mount_root,
                "immutable_roots": [str(r) for r in immutability.roots]}

    return await agent.serve(DAEMON, cfg, [RepositoriesApi(mounts), ImmutabilityApi(immutability)], report=report)


def main() -> None:
    daemon.run(amain)
