"""volume-agent's entry point: config → logging → volumes → bind → reconcile → READY → serve → drain."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from oma_common import agent, daemon, schema
from oma_common.statefile import Damaged, StateFile

from .adapters.cloudstack import CloudStack, Settings
from .adapters.devdir import DeviceDir
from .api import ImmutabilityApi, RepositoriesApi, VolumesApi
from .immutability import Immutability
from .reconcile import Reconciler
from .repositories import RepositoryMounts
from .volumes import Volumes, registry_file

DAEMON = "volume-agent"


@dataclasses.dataclass
class CloudStackConfig:
    """volume-agent's own CloudStack credentials (keep the drop-in that holds them root-owned, mode 0600)."""

    endpoint: str = schema.spec("", description="the management server's API URL, e.g. "
                                                "https://cloud.example/client/api; empty = CloudStack not configured "
                                                "(volume calls answer 503)")
    api_key: str = schema.spec("", description="the API key of the account the volumes belong to")
    secret_key: str = schema.spec("", description="its secret key (never printed by --show-config)")
    verify_tls: bool = schema.spec(True, description="check the management server's TLS certificate")
    appliance_vm_id: str = schema.spec("", description="this appliance's CloudStack VM id; empty = the VM that has "
                                                       "a NIC with one of this machine's MAC addresses")
    zone_id: str = schema.spec("", description="zone of new volumes; empty = the appliance VM's zone")
    disk_offering_id: str = schema.spec("", description="disk offering of new volumes (custom size); empty = the "
                                                        "first custom offering CloudStack lists")
    request_timeout_seconds: float = schema.spec(30.0, min=1, description="time limit of one API call")
    job_timeout_seconds: float = schema.spec(600.0, min=1, description="time limit of one async job "
                                                                       "(queryAsyncJobResult polled until then)")
    poll_interval_seconds: float = schema.spec(1.0, min=0.01, description="between two queryAsyncJobResult calls")


@dataclasses.dataclass
class Config(agent.AgentConfig):
    """volume-agent's options."""

    device_dir: str = schema.spec("/dev/disk/by-id", description="where attached volumes appear "
                                                                "(virtio-<serial> links)")
    device_timeout_seconds: float = schema.spec(120.0, min=0.1, description="an attached volume's device must "
                                                                            "appear within this")
    reconcile_device_grace_seconds: float = schema.spec(15.0, min=0, description="start-up: how long to wait for "
                                                                                 "the device of a volume CloudStack "
                                                                                 "says is attached here")
    vouched_registry: str = schema.spec("", description="the devices attached here for CloudStack volumes, which "
                                                        "nbd-pool reads (its vouched_registry); empty = "
                                                        "<state_dir>/vouched.json")
    cloudstack: CloudStackConfig = schema.spec(factory=CloudStackConfig, description="the CloudStack connection")
    repository_mount_root: str = schema.spec("/srv/oma/repositories",
                                             description="backup repositories on NFS/CIFS are mounted only "
                                                         "below this directory (root-owned, not writable by omad)")
    mount_timeout_seconds: float = schema.spec(60.0, min=1, description="time limit of one mount or umount")
    immutable_roots: list[str] = schema.spec(factory=list, description="local repository directories whose files "
                                                                       "may be made immutable (chattr +i); the "
                                                                       "share mount root always may")


def cloudstack_client(c: CloudStackConfig) -> CloudStack | None:
    if not (c.endpoint and c.api_key and c.secret_key):
        return None
    return CloudStack(Settings(c.endpoint, c.api_key, c.secret_key, verify_tls=c.verify_tls,
                               request_timeout=c.request_timeout_seconds, job_timeout=c.job_timeout_seconds,
                               poll_interval=c.poll_interval_seconds))


async def amain() -> int:
    cfg, exit_now = agent.load(Config, DAEMON, "CloudStack volume life cycle and the volume-to-device map")
    if exit_now:
        return 0
    state = cfg.state_path(DAEMON)
    mounts = RepositoryMounts(Path(cfg.repository_mount_root), timeout=cfg.mount_timeout_seconds)
    immutability = Immutability([Path(cfg.repository_mount_root), *map(Path, cfg.immutable_roots)],
                                timeout=cfg.mount_timeout_seconds)
    cs = cfg.cloudstack
    volumes = Volumes(cloudstack_client(cs), DeviceDir(Path(cfg.device_dir)), StateFile(state / "volumes.json", "volumes", damaged=Damaged.REFUSE),
                      registry_file(Path(cfg.vouched_registry) if cfg.vouched_registry else state / "vouched.json"),
                      appliance_vm_id=cs.appliance_vm_id, zone_id=cs.zone_id, disk_offering_id=cs.disk_offering_id,
                      device_timeout=cfg.device_timeout_seconds)
    volumes.load()  # before binding: an unreadable state file stops us here
    reconciler = Reconciler(volumes, device_grace=cfg.reconcile_device_grace_seconds)

    async def report() -> dict[str, Any]:
        return {"device_dir": cfg.device_dir, "repository_mount_root": cfg.repository_mount_root,
                "immutable_roots": [str(r) for r in immutability.roots],
                "cloudstack_configured": volumes.cloud_client is not None,
                "appliance_vm_id": volumes.appliance_vm_id or None, "volumes": len(volumes.records),
                "attached_here": len(volumes.vouched().devices)}

    apis = [RepositoriesApi(mounts), ImmutabilityApi(immutability), VolumesApi(volumes)]
    return await agent.serve(DAEMON, cfg, apis, report=report, reconcile=reconciler.startup)


def main() -> None:
    daemon.run(amain)
