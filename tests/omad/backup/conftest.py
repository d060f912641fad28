"""The backup rig: the four real daemons, the VMA simulator writing into nbd-pool's real qemu-nbd exports, a
local repository, and checks that a backup left nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from oma_common.rpc import AgentClient
from tests.sim.vma import SCAN, MiB, Inventory, SimState, VirtualMachine, VMASim

from ...lib.diskimages import DiskImage, File, Pattern, Tree, gpt_two_ext4
from ...rig import Api, Stack, free_range
from ..conftest import PASSWORD, USER, VCENTER, manual, vma_config

IDLE_TIMEOUT = 3.0
TWO_DISK_VM = "db 01"
ROOT_TREE: Tree = {"etc/hostname": b"db01\n", "etc/motd": File(b"welcome\n", mode=0o644),
             "var/lib/app/data.bin": File(Pattern(3 * MiB, seed=7))}
DATA_TREE: Tree = {"db/table1": File(Pattern(2 * MiB, seed=11)), "db/README": b"backup me\n"}


def write_random(path: Path, offset: int, length: int, seed: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(length))


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120)


@dataclasses.dataclass
class Rig:
    stack: Stack
    sim: VMASim
    api: Api
    repo_id: str
    repo_dir: Path
    images: dict[str, DiskImage]  # the 2-disk VM's disk 0 (GPT, two ext4)

    @property
    def state(self) -> SimState:
        return self.sim.state

    def vm(self, name: str) -> VirtualMachine:
        return self.state.vm(name)

    def source(self, name: str, index: int) -> Path:
        return self.state.source_path(name, index)

    async def start(self, vm: str, backup_type: str = "full", **extra: Any) -> tuple[int, dict[str, Any]]:
        return await self.api.post("/backups", {"vm_name": vm, "repository_id": self.repo_id,
                                                "backup_type": backup_type, **extra})

    async def wait(self, backup_id: str, statuses: tuple[str, ...] = ("completed", "failed"),
                   timeout: float = 60) -> dict[str, Any]:
        """Poll omad until the backup reaches one of `statuses` (the daemon is another process)."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.api.get(f"/backups/{backup_id}")
            assert status == 200, body
            if body["status"] in statuses:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{backup_id} is {body['status']} after {timeout}s\n--- omad ---\n"
                                     f"{self.log_tail()}")
            await asyncio.sleep(0.1)

    async def backup(self, vm: str, backup_type: str = "full") -> dict[str, Any]:
        status, started = await self.start(vm, backup_type)
        assert status == 200, started
        done = await self.wait(started["backup_id"])
        assert done["status"] == "completed", done
        return done

    def pool(self) -> AgentClient:
        return AgentClient("nbd-pool", self.stack.run_dir / "nbd-pool.sock", timeout=30)

    async def nbd_state(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        client = self.pool()
        try:
            return (await client.call("GET", "/exports"))["processes"], await client.call("GET", "/ports/status")
        finally:
            await client.close()

    def log_tail(self, daemon: str = "omad", lines: int = 60) -> str:
        path = self.stack.state / "logs" / f"{daemon}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    async def assert_nothing_left(self, backup_id: str) -> None:
        """No qemu-nbd, no leased port, no image file of the backup, no row left half-way."""
        try:
            await self._nothing_left(backup_id)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- omad ---\n{self.log_tail()}\n--- nbd-pool ---\n"
                                 f"{self.log_tail('nbd-pool', 30)}") from None

    async def _nothing_left(self, backup_id: str) -> None:
        exports, ports = await self.nbd_state()
        assert exports == [] and ports["allocated"] == 0, (exports, ports)
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            assert not (proc.info["name"] == "qemu-nbd" and str(self.repo_dir) in cmdline), cmdline
        assert not list(self.repo_dir.rglob(f"{backup_id}*")), list(self.repo_dir.rglob("*"))
        assert self.stack.sql("SELECT COUNT(*) FROM backup_jobs WHERE status IN ('pending', 'running')") == [(0,)]
        rows = self.stack.sql("SELECT status, error_message FROM backup_jobs WHERE backup_id = ?", (backup_id,))
        assert rows and rows[0][0] == "failed" and rows[0][1], rows
        assert {s for (s,) in self.stack.sql("SELECT status FROM backup_disks WHERE backup_id = ?",
                                             (backup_id,))} == {"failed"}
        job = self.stack.sql("SELECT status, error_message FROM jobs WHERE id = ?", (backup_id,))
        assert job == [("failed", rows[0][1])]


def build_inventory(tmp: Path) -> tuple[Inventory, dict[str, DiskImage], dict[str, list[Path]]]:
    inv = Inventory(host=VCENTER, datacenter="DC1", username=USER, password=PASSWORD)
    disk0 = gpt_two_ext4(tmp / "db01-disk0.raw", ROOT_TREE, DATA_TREE, size=128 * MiB)
    disk1 = tmp / "db01-disk1.raw"
    with open(disk1, "wb") as f:
        f.truncate(48 * MiB)
    write_random(disk1, 0, 4 * MiB, seed=1)
    write_random(disk1, 20 * MiB, 2 * MiB, seed=2)
    sources = {TWO_DISK_VM: [disk0.path, disk1]}
    inv.add_vm(TWO_DISK_VM, disks=[disk0.size, 48 * MiB], folder="Production")
    for n in range(3):
        name = f"web {n}"
        path = tmp / f"web{n}.raw"
        with open(path, "wb") as f:
            f.truncate(24 * MiB)
        write_random(path, MiB * n, 6 * MiB, seed=100 + n)
        inv.add_vm(name, disks=[24 * MiB])
        sources[name] = [path]
    return inv, {TWO_DISK_VM: disk0}, sources


@pytest.fixture
async def rig(stack_config: Stack, tmp_path: Path) -> AsyncIterator[Rig]:
    inv, images, sources = build_inventory(tmp_path)
    async with open_rig(stack_config, tmp_path, inv, sources, images) as r:
        yield r


@contextlib.asynccontextmanager
async def open_rig(stack: Stack, tmp: Path, inv: Inventory, sources: dict[str, list[Path]],
                   images: dict[str, DiskImage], **sim_options: Any) -> AsyncIterator[Rig]:
    """Start the simulator and the four daemons of `stack`, log in, add the VMs of `sources` and a local
    repository; stop everything afterwards (also used by bench/restore)."""
    # SCAN: the tests change the sources directly (ext4 edits among them) without telling the simulator.
    state = SimState(inv, workdir=tmp / "vmasim", **{"telemetry_interval": 0.2, "outbound_timeout": 30,
                                                     "change_tracking": SCAN, **sim_options})
    for name, paths in sources.items():
        for index, path in enumerate(paths):
            state.set_source(name, index, path)
    repo_dir = stack.state / "backups"
    repo_dir.mkdir()
    more_repos = stack.state / "repos"  # further repositories (copy destinations, immutable ones)
    more_repos.mkdir()
    ports = free_range(24)
    async with VMASim(state=state) as sim:
        stack.add_config("omad", "50-vma.toml", vma_config(sim.url, timeout=20))
        stack.add_config("omad", "60-backup.toml",
                         f"[backup]\nidle_timeout_seconds = {IDLE_TIMEOUT}\nwatchdog_interval_seconds = 0.25\n"
                         "repository_min_free_bytes = 67108864\n")  # small test file systems
        stack.add_config("nbd-pool", "60-pool.toml",
                         f'export_roots = ["{repo_dir}", "{more_repos}"]\nport_min = {ports[0]}\nport_max = {ports[-1]}\n')
        stack.add_config("volume-agent", "60-immutable.toml", f'immutable_roots = ["{more_repos}"]\n')
        stack.start()
        sim.state.oma_url = stack.url
        api = Api(stack.url)
        try:
            await api.login("admin", stack.admin_password)
            await add_vms(api, list(sources))
            status, repo = await api.post("/repositories", {"name": "local", "type": "local",
                                                            "config": {"disk_path": str(repo_dir)}})
            assert status == 201, repo
            yield Rig(stack, sim, api, repo["id"], repo_dir, images)
        finally:
            await api.close()
            await release_everything(stack)
            stack.stop()
            kill_strays(repo_dir)


async def add_vms(api: Api, names: list[str]) -> None:
    """Save the simulated vCenter's login as the default credential and add these VMs to management."""
    status, body = await api.post("/vmware-credentials", {
        "credential_name": "sim", "vcenter_host": VCENTER, "username": USER, "password": PASSWORD,
        "datacenter": "DC1", "is_default": True})
    assert status in (200, 201), body
    status, body = await api.post("/discovery/add-vms", {**manual(), "vm_names": names})
    assert status == 200 and body["vms_added"] == len(names), body


async def release_everything(stack: Stack) -> None:
    """nbd-pool leaves its exports running when it stops (a backup survives an nbd-pool restart), and
    restore-mounter its mounts: a test or bench that ends early must release both first."""
    mounter = AgentClient("restore-mounter", stack.run_dir / "restore-mounter.sock", timeout=60)
    try:
        for m in (await mounter.call("GET", "/mounts")).get("mounts", []):
            await mounter.call("DELETE", f"/mounts/{m['mount_id']}", params={"force": "true"})
    except Exception:  # noqa: BLE001 - best effort, like the release below
        pass
    finally:
        await mounter.close()
    client = AgentClient("nbd-pool", stack.run_dir / "nbd-pool.sock", timeout=30)
    try:
        for lease in (await client.call("GET", "/ports/status")).get("allocations", []):
            await client.call("POST", f"/jobs/{lease['job_id']}/release")
    except Exception:  # noqa: BLE001 - best effort; kill_strays() is the safety net
        pass
    finally:
        await client.close()


def kill_strays(repo_dir: Path) -> None:
    """Kill (by pid) any qemu-nbd still serving an image of this test's repository: named on its command line,
    or (as nbd-pool starts it, with the image's descriptor) open in it."""
    where = str(repo_dir)
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] != "qemu-nbd":
            continue
        try:
            serving = where in " ".join(proc.info["cmdline"] or []) or any(
                f.path.startswith(where) for f in proc.open_files())
            if serving:
                proc.kill()
        except psutil.NoSuchProcess:
            pass
