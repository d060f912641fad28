"""restore-mounter's entry point: config → logging → mounts → bind → reconcile → READY → serve → drain."""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from oma_common import agent, daemon, schema
from oma_common.rpc import AgentClient

from .api import RestoreApi
from .attach import NbdPoolAttacher
from .confine import default_resolver
from .expiry import IdlePolicy, Sweeper, SystemClock
from .files import Browser
from .mounts import MountManager
from .reconcile import reconcile
from .state import MountsFile

DAEMON = "restore-mounter"


@dataclasses.dataclass
class Config(agent.AgentConfig):
    """restore-mounter's options."""

    mount_root: str = schema.spec("/var/lib/oma/restore", description="where restore mounts are made (made 0700)")
    idle_timeout_seconds: float = schema.spec(3600.0, min=0.05, description="a mount idle this long is removed")
    cleanup_interval_seconds: float = schema.spec(60.0, min=0.05, description="how often expired mounts are swept")
    max_mounts: int = schema.spec(8, min=1, max=64, description="mounts at once (each holds an attach slot)")
    stop_attach_grace_seconds: float = schema.spec(
        3.0, min=0.0, max=20.0, description="on stop, how long a mount being made waits for nbd-pool's answer to its "
                                           "attach (then undone at once); past it the attach is given up and the "
                                           "next start releases what nbd-pool made")
    nbd_pool_socket: str = schema.spec("", description="nbd-pool's socket; empty = <run_dir>/nbd-pool.sock")
    image_roots: list[str] = schema.spec(factory=list, description="if set, only images under these "
                                                                   "directories are mounted")
    fat_driver: Literal["auto", "kernel", "fusefat"] = schema.spec(
        "auto", description="FAT: the kernel's vfat where it exists (auto), or always fusefat")
    list_max_entries: int = schema.spec(10000, min=1, description="entries a recursive listing collects")
    list_max_depth: int = schema.spec(32, min=1, max=1024, description="levels a recursive listing descends")
    archive_workers: int = schema.spec(4, min=1, max=64, description="archives written at once (threads)")
    compress_level: int = schema.spec(6, min=0, max=9, description="deflate level of zip and tar.gz")


def make_attacher(cfg: Config) -> tuple[NbdPoolAttacher, AgentClient]:
    """Images are attached by nbd-pool, the one owner of qemu-nbd, qemu-storage-daemon and the devices."""
    path = Path(cfg.nbd_pool_socket) if cfg.nbd_pool_socket else Path(cfg.run_dir) / "nbd-pool.sock"
    client = AgentClient("nbd-pool", path, timeout=120)
    return NbdPoolAttacher(client), client


async def amain() -> int:
    cfg, exit_now = agent.load(Config, DAEMON, "read-only restore mounts and the file access inside them")
    if exit_now:
        return 0
    state_dir = cfg.state_path(DAEMON)
    mount_root = Path(cfg.mount_root)
    mount_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(mount_root, 0o700)  # ntfs-3g mounts allow_other: nobody else may even reach the mount points
    clock = SystemClock()
    policy = IdlePolicy(clock, cfg.idle_timeout_seconds)
    attacher, client = make_attacher(cfg)
    state = MountsFile(state_dir / "mounts.json")
    manager = MountManager(attacher=attacher, state=state, mount_root=mount_root, max_mounts=cfg.max_mounts,
                           policy=policy, clock=clock, resolver=default_resolver(), fat_driver=cfg.fat_driver,
                           image_roots=cfg.image_roots)
    sweeper = Sweeper(manager.sweep, cfg.cleanup_interval_seconds, clock)
    archives = ThreadPoolExecutor(cfg.archive_workers, thread_name_prefix="archive")
    api = RestoreApi(manager, Browser(cfg.list_max_entries, cfg.list_max_depth), sweeper, archives,
                     cfg.compress_level)

    async def start() -> str:
        summary = await reconcile(manager, state.load())
        await sweeper.start()
        return summary

    async def report() -> dict[str, Any]:
        await manager.verify()  # a dead attachment is health news now, not at the next sweep
        broken = manager.broken()
        out = {"active_mounts": manager.resources()["active_mounts"], "max_mounts": cfg.max_mounts,
               "attach_backend": attacher.name, "broken_mounts": broken}
        if broken:
            out["status"] = "degraded"
        return out

    async def drain() -> None:
        # A mount being made is undone now, and answered: its attach must not hold the stop (systemd's
        # TimeoutStopSec) for the nbd-pool client's timeout.
        await manager.stop(cfg.stop_attach_grace_seconds)

    async def close() -> None:
        # Mounts stay: they outlive a restart of the daemon and are re-adopted at the next start.
        await sweeper.stop()
        archives.shutdown(wait=True, cancel_futures=True)
        await client.close()

    return await agent.serve(DAEMON, cfg, [api], report=report, reconcile=start, drain=drain,
                             close=close)


def main() -> None:
    daemon.run(amain)
