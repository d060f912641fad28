"""The replication rig: the real daemons (omad, nbd-pool, volume-agent), the CloudStack simulator (volumes attached
here are real loop devices) and the VMA simulator writing with real NBD clients into nbd-pool's exports of those
devices (also used by bench/replication_e2e)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import random
import socket
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from oma_common.rpc import AgentClient
from tests.sim.cloudstack import CloudStackSim
from tests.sim.vma import MiB, Inventory, SimState, VMASim

from ..rig import Api, Stack
from .backup.conftest import add_vms, free_range, release_everything
from .conftest import PASSWORD, USER, VCENTER, vma_config

VM = "app 01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digest(path: Path | str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 4 * MiB))
            assert chunk, f"{path} is shorter than {size}"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class Rig:
    stack: Stack
    sim: VMASim
    cs: CloudStackSim
    api: Api
    sources: list[Path]
    sizes: list[int]

    @property
    def state(self) -> SimState:
        return self.sim.state

    def write(self, index: int, offset: int, length: int, seed: int) -> None:
        """A guest write of `length` pseudo-random bytes into disk `index`, which VMware's CBT notes."""
        self.state.write_source(VM, index, offset, random.Random(seed).randbytes(length))

    def source_vm(self, name: str = VM) -> dict[str, Any]:
        return next(v for v in self.state.inventory.discovery()["vms"] if v["name"] == name)

    async def start(self, *, vm: str = VM, **extra: Any) -> tuple[int, dict[str, Any]]:
        return await self.api.post("/replications", {"source_vm": self.source_vm(vm), "ossea_config_id": 1,
                                                      "vcenter_host": VCENTER, **extra})

    async def wait(self, job_id: str, statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
                   timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.api.get(f"/replications/{job_id}")
            if status == 200 and body["status"] in statuses:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{job_id}: {status} {body}\n--- omad ---\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    async def sync(self, **extra: Any) -> dict[str, Any]:
        status, started = await self.start(**extra)
        assert status == 201, started
        done = await self.wait(started["job_id"])
        assert done["status"] == "completed", (done, self.log_tail())
        return done

    def log_tail(self, daemon: str = "omad", lines: int = 60) -> str:
        path = self.stack.state / "logs" / f"{daemon}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    async def context(self) -> dict[str, Any]:
        status, body = await self.api.get(f"/vm-contexts/{VM}")
        assert status == 200, body
        return body

    async def nbd_state(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        client = AgentClient("nbd-pool", self.stack.run_dir / "nbd-pool.sock", timeout=30)
        try:
            return (await client.call("GET", "/exports"))["processes"], await client.call("GET", "/ports/status")
        finally:
            await client.close()

    async def assert_released(self) -> None:
        exports, ports = await self.nbd_state()
        assert exports == [] and ports["allocated"] == 0, (exports, ports)

    def assert_volumes_hold_sources(self, job: dict[str, Any]) -> None:
        for disk, src, size in zip(job["disks"], self.sources, self.sizes):
            link = self.cs.devices.link(disk["volume_id"])
            assert digest(link, size) == digest(src, size), disk["disk_id"]


@contextlib.asynccontextmanager
async def open_rig(stack: Stack, cs: CloudStackSim, tmp: Path, sources: list[Path], *, idle_timeout: float = 3.0,
                   poll_interval: float | None = 0.1, others: Mapping[str, list[Path]] | None = None,
                   **sim_options: Any) -> AsyncIterator[Rig]:
    """A VM named VM whose disks are the raw files `sources` (and the `others`, name → their disks' files), the
    simulators and the daemons, logged in, the VMs added; everything stopped and released afterwards.
    `poll_interval` None leaves omad's installed default (how often it asks the VMA about a running job)."""
    inv = Inventory(host=VCENTER, datacenter="DC1", username=USER, password=PASSWORD)
    sizes = [p.stat().st_size for p in sources]
    vms = {VM: sources, **(others or {})}
    for name, paths in vms.items():
        inv.add_vm(name, disks=[p.stat().st_size for p in paths], nics=1)
    state = SimState(inv, workdir=tmp / "vmasim", **{"callback_retry_seconds": 60, **sim_options})
    for name, paths in vms.items():
        for index, path in enumerate(paths):
            state.set_source(name, index, path)
    ports = free_range(16)
    async with VMASim(state=state) as sim:
        stack.add_config("omad", "50-vma.toml", vma_config(sim.url, timeout=5))
        polled = "" if poll_interval is None else f"poll_interval_seconds = {poll_interval}\n"
        stack.add_config("omad", "60-replication.toml", f"[replication]\n{polled}"
                                                        f"idle_timeout_seconds = {idle_timeout}\n")
        # A fixed port: the VMA calls back where it was told to, across an omad restart.
        stack.add_config("omad", "61-port.toml", f"[api]\nport = {free_port()}\n")
        stack.add_config("nbd-pool", "60-pool.toml", f'export_roots = ["{cs.devices.device_dir}"]\n'
                                                     f"port_min = {ports[0]}\nport_max = {ports[-1]}\n")
        stack.add_config("volume-agent", "50-cloudstack.toml", f"""
device_dir = "{cs.devices.device_dir}"
device_timeout_seconds = 10
[cloudstack]
endpoint = "{cs.endpoint}"
api_key = "{cs.api_key}"
secret_key = "{cs.secret_key}"
appliance_vm_id = "{cs.appliance_vm_id}"
poll_interval_seconds = 0.05
job_timeout_seconds = 30
""")
        stack.start()
        api = Api(stack.url)
        try:
            await api.login("admin", stack.admin_password)
            await add_vms(api, list(vms))
            yield Rig(stack, sim, cs, api, sources, sizes)
        finally:
            await api.close()
            await release_everything(stack)
            stack.stop()
