"""nbd-pool's entry point: config → logging → the pool → bind → reconcile → READY → serve → drain."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Literal

from oma_common import agent, config, daemon, schema
from oma_common.errors import Invalid
from oma_common.periodic import Periodic
from oma_common.statefile import Damaged, StateFile

from .adapters import kernel_nbd
from .adapters.attach import AttachBackend
from .adapters.fuse_loop import FuseLoopBackend
from .adapters.kernel_nbd import KernelNbdBackend
from .adapters.ports import PortProbeError, port_is_free
from .adapters.qemu_nbd import ExportOptions
from .api import AttachmentsApi, ExportsApi, Gate, PortsApi, RootsApi
from .attachments import Attachments
from .exports import Exports, records_file
from .images import ImageRoots
from .jobs import Jobs
from .pool import Pool
from .reconcile import Reconciler
from .roots import Roots
from .vouched import DeviceGuard

DAEMON = "nbd-pool"
log = logging.getLogger("nbd_pool")


@dataclasses.dataclass
class QemuNbdFlags:
    """qemu-nbd's cache and I/O flags for exports (measurements in adapters/qemu_nbd.py)."""

    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] = schema.spec(
        "none", description="none (O_DIRECT) measured fastest; a file system without O_DIRECT gets writeback")
    aio: Literal["threads", "native", "io_uring"] = schema.spec(
        "io_uring", description="io_uring measured fastest; threads where the kernel disables io_uring")
    discard: Literal["ignore", "unmap"] = schema.spec("unmap", description="pass clients' trims to the image")
    detect_zeroes: Literal["off", "on", "unmap"] = schema.spec(
        "unmap", description="zeros written as data become unmapped clusters (needs discard = unmap)")


@dataclasses.dataclass
class Config(agent.AgentConfig):
    """nbd-pool's options."""

    port_min: int = schema.spec(10100, min=1, max=65535, description="first TCP port of the NBD pool")
    port_max: int = schema.spec(10200, min=1, max=65535, description="last TCP port of the NBD pool")
    bind_address: str = schema.spec("127.0.0.1", description="address qemu-nbd exports listen on "
                                                            "(the VMA arrives through its SSH tunnel)")
    lease_seconds: int = schema.spec(86400, min=1, description="default port lease: longer than a backup runs; "
                                                               "a lease whose export is in use is renewed anyway")
    max_lease_seconds: int = schema.spec(7 * 86400, min=1, description="the longest lease a job may ask for")
    idle_grace_seconds: int = schema.spec(900, min=0, description="an expired lease is reclaimed only after its "
                                                                  "export has had no client this long")
    export_roots: list[str] = schema.spec(
        factory=lambda: ["/var/lib/oma/repositories", "/dev/disk/by-id"],
        description="the only places images and devices are exported or attached from: the backup "
                    "repositories and the volume device directory")
    vouched_registry: str = schema.spec(
        "/var/lib/oma-agents/volume-agent/vouched.json",
        description="volume-agent's registry of the devices it attached here for CloudStack volumes: the only "
                    "block devices exported (root-owned; omad cannot write it)")
    work_root: str = schema.spec("", description="attachments' work directories; empty = <state_dir>/work")
    max_attachments: int = schema.spec(8, min=1, max=64, description="read-only attachments at once")
    attach_backend: Literal["auto", "kernel-nbd", "fuse-loop"] = schema.spec(
        "auto", description="auto: kernel-nbd where /dev/nbd0 exists, else fuse-loop")
    nbd_devices: list[str] = schema.spec(factory=lambda: [f"/dev/nbd{i}" for i in range(8)],
                                         description="the nbd devices kernel-nbd attaches to (ours alone)")
    reconcile_interval_seconds: float = schema.spec(60.0, min=0.1, description="periodic check of children, "
                                                                               "leftovers and leases")
    ready_timeout_seconds: float = schema.spec(10.0, min=0.1, description="an export or attachment must be "
                                                                          "serving within this")
    stop_timeout_seconds: float = schema.spec(10.0, min=0.1, description="SIGTERM → wait this → SIGKILL "
                                                                         "(qemu-nbd flushes on SIGTERM)")
    qemu_nbd: QemuNbdFlags = schema.spec(factory=QemuNbdFlags, description="qemu-nbd flags for exports")


def operator_dir() -> Path:
    """The last directory drop-ins are read from: where an operator overrides (e.g. /etc/oma/nbd-pool.d)."""
    args, _ = config.arg_parser(DAEMON, "").parse_known_args()
    return (args.config or config.default_dirs(DAEMON))[-1]


def choose_backend(cfg: Config) -> tuple[AttachBackend, dict[str, AttachBackend]]:
    backends: dict[str, AttachBackend] = {
        "fuse-loop": FuseLoopBackend(ready_timeout=cfg.ready_timeout_seconds, stop_timeout=cfg.stop_timeout_seconds),
        "kernel-nbd": KernelNbdBackend(devices=cfg.nbd_devices, ready_timeout=cfg.ready_timeout_seconds,
                                       stop_timeout=cfg.stop_timeout_seconds),
    }
    name = cfg.attach_backend
    if name == "auto":
        name = "kernel-nbd" if kernel_nbd.available() else "fuse-loop"
    return backends[name], backends


def check_config(cfg: Config) -> ExportOptions:
    if cfg.port_min > cfg.port_max:
        raise Invalid("invalid configuration", f"port_min {cfg.port_min} is above port_max {cfg.port_max}")
    if cfg.lease_seconds > cfg.max_lease_seconds:
        raise Invalid("invalid configuration", "lease_seconds is above max_lease_seconds")
    try:
        port_is_free(cfg.bind_address, cfg.port_min)
    except PortProbeError as exc:
        raise Invalid("invalid configuration", f"bind_address: {exc}") from exc
    f = cfg.qemu_nbd
    try:
        return ExportOptions(cache=f.cache, aio=f.aio, discard=f.discard, detect_zeroes=f.detect_zeroes)
    except ValueError as exc:
        raise Invalid("invalid configuration", f"qemu_nbd: {exc}") from exc


# An unreadable state document stops nbd-pool instead of being replaced: the exports it lists keep running and
# serving meanwhile, and an operator decides (moving it aside makes them orphans that reconciliation ends).
DAMAGED = Damaged.REFUSE


async def amain() -> int:
    cfg, exit_now = agent.load(Config, DAEMON, "NBD port pool, qemu-nbd exports and read-only image attach")
    if exit_now:
        return 0
    options = check_config(cfg)
    state = cfg.state_path(DAEMON)
    work_root = Path(cfg.work_root) if cfg.work_root else state / "work"
    clock = time.time

    roots = Roots(cfg.export_roots, DeviceGuard(Path(cfg.vouched_registry)))
    # Every image is opened by descriptor beneath its root; the roots' identities are taken now.
    images = ImageRoots(cfg.export_roots)
    pool = Pool(StateFile(state / "leases.json", "leases", damaged=DAMAGED), port_min=cfg.port_min, port_max=cfg.port_max,
                host=cfg.bind_address, lease_seconds=cfg.lease_seconds, max_lease_seconds=cfg.max_lease_seconds,
                clock=clock)
    exports = Exports(pool, roots, records_file(state / "exports.json", DAMAGED), bind_address=cfg.bind_address,
                      options=options, ready_timeout=cfg.ready_timeout_seconds, stop_timeout=cfg.stop_timeout_seconds,
                      clock=clock, images=images)
    backend, backends = choose_backend(cfg)
    attachments = Attachments(backend, roots, StateFile(state / "attachments.json", "attachments", damaged=DAMAGED),
                              work_root=work_root, max_attachments=cfg.max_attachments, clock=clock,
                              other_backends=backends, images=images)
    jobs = Jobs(pool, exports, idle_grace_seconds=cfg.idle_grace_seconds, clock=clock)
    reconciler = Reconciler(pool, exports, attachments, jobs, work_root=work_root,
                            nbd_devices=cfg.nbd_devices)
    # Before binding: an unreadable state file stops us here, with the previous exports still running.
    pool.load()
    exports.load()
    attachments.load()
    log.info("export roots: %s; attach backend: %s; work root: %s", roots.describe(), backend.name, work_root)

    gate = Gate()
    periodic = Periodic("periodic reconciliation", reconciler.periodic, cfg.reconcile_interval_seconds, logger=log)

    async def reconcile() -> str:
        summary = await reconciler.startup()
        gate.open()
        await periodic.start()
        return summary

    async def close() -> None:
        await periodic.stop()
        n_exports = await exports.release_all()
        n_attachments = await attachments.forget_all()
        log.info("left %d exports and %d attachments in place for the next start", n_exports, n_attachments)

    async def report() -> dict[str, Any]:
        status = pool.status()
        return {"total_ports": status["total_ports"], "allocated": status["allocated"],
                "available": status["available"], "foreign_ports": status["foreign_ports"],
                "exports": len(exports), "attachments": len(attachments),
                "max_attachments": cfg.max_attachments, "backend": backend.name}

    apis = [PortsApi(pool, jobs, gate), ExportsApi(exports, jobs, gate), AttachmentsApi(attachments, gate),
            RootsApi(roots, operator_dir())]
    return await agent.serve(DAEMON, cfg, apis, report=report, reconcile=reconcile, close=close)


def main() -> None:
    daemon.run(amain)
