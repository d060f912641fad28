"""Replication end to end: the real daemons (omad, nbd-pool, volume-agent), the CloudStack simulator (volumes
attached here are real loop devices) and the VMA simulator writing with real NBD clients into nbd-pool's exports
of those devices."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from oma_common.rpc import AgentClient
from tests.sim.cloudstack import CloudStackSim
from tests.sim.vma import MiB, Inventory, SimState, VMASim
from tests.sim.vma import faults as F

from ..rig import Api, Stack
from .backup.conftest import free_range, release_everything
from .conftest import PASSWORD, USER, VCENTER, manual, vma_config

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

VM = "app 01"
SIZES = [32 * MiB, 16 * MiB]
IDLE = 3.0


def write_random(path: Path, offset: int, length: int, seed: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(length))


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

    @property
    def state(self) -> SimState:
        return self.sim.state

    def source_vm(self) -> dict[str, Any]:
        return next(v for v in self.state.inventory.discovery()["vms"] if v["name"] == VM)

    async def start(self, **extra: Any) -> tuple[int, dict[str, Any]]:
        return await self.api.post("/replications", {"source_vm": self.source_vm(), "ossea_config_id": 1,
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
        for disk, src, size in zip(job["disks"], self.sources, SIZES):
            link = self.cs.devices.link(disk["volume_id"])
            assert digest(link, size) == digest(src, size), disk["disk_id"]


@pytest.fixture
async def rig(cloudstack_sim: CloudStackSim, stack_config: Stack, tmp_path: Path) -> AsyncIterator[Rig]:
    inv = Inventory(host=VCENTER, datacenter="DC1", username=USER, password=PASSWORD)
    inv.add_vm(VM, disks=list(SIZES), nics=1)
    state = SimState(inv, workdir=tmp_path / "vmasim", callback_retry_seconds=60)
    sources = []
    for index, size in enumerate(SIZES):
        path = tmp_path / f"disk{index}.raw"
        with open(path, "wb") as f:
            f.truncate(size)
        write_random(path, MiB, size // 2, seed=index)
        state.set_source(VM, index, path)
        sources.append(path)
    cs = cloudstack_sim
    ports = free_range(16)
    stack = stack_config
    async with VMASim(state=state) as sim:
        stack.add_config("omad", "50-vma.toml", vma_config(sim.url, timeout=5))
        stack.add_config("omad", "60-replication.toml", "[replication]\npoll_interval_seconds = 0.1\n"
                                                        f"idle_timeout_seconds = {IDLE}\n")
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
            status, body = await api.post("/vmware-credentials", {
                "credential_name": "sim", "vcenter_host": VCENTER, "username": USER, "password": PASSWORD,
                "datacenter": "DC1", "is_default": True})
            assert status in (200, 201), body
            status, body = await api.post("/discovery/add-vms", {**manual(), "vm_names": [VM]})
            assert status == 200 and body["vms_added"] == 1, body
            yield Rig(stack, sim, cs, api, sources)
        finally:
            await api.close()
            await release_everything(stack)
            stack.stop()


async def test_initial_then_incremental_writes_only_changed_blocks(rig: Rig) -> None:
    first = await rig.sync()
    assert first["replication_type"] == "initial"
    rig.assert_volumes_hold_sources(first)
    await rig.assert_released()
    assert [d["disk_id"] for d in first["disks"]] == ["disk-2000", "disk-2001"]
    assert all(d["change_id"] for d in first["disks"])
    ctx = (await rig.context())["context"]
    assert ctx["current_status"] == "ready_for_failover" and ctx["current_job_id"] is None
    assert (ctx["total_jobs_run"], ctx["successful_jobs"], ctx["failed_jobs"]) == (1, 1, 0)
    assert ctx["last_successful_job_id"] == first["job_id"] and ctx["first_job_at"] and ctx["last_job_at"]
    assert ctx["last_operation_summary"]["status"] == "completed"
    vm_path = rig.source_vm()["path"]
    status, cid = await rig.api.get("/replications/changeid", params={"vm_path": vm_path, "disk_id": "disk-2000"})
    assert status == 200 and cid["change_id"] == first["disks"][0]["change_id"]

    # 5 % of disk 0 changes: the next sync is an incremental that writes those blocks only.
    changed = SIZES[0] // 20 // (64 * 1024) * (64 * 1024)
    write_random(rig.sources[0], 4 * MiB, changed, seed=99)
    second = await rig.sync()
    assert second["replication_type"] == "incremental"
    rig.assert_volumes_hold_sources(second)
    vma = rig.state.job(second["job_id"])
    assert [d.sync_type for d in vma.disks] == ["incremental", "incremental"]
    assert [d.blocks_written for d in vma.disks] == [changed // (64 * 1024), 0]
    assert [d["previous_change_id"] for d in second["disks"]] == [d["change_id"] for d in first["disks"]]
    assert len(second["cbt_history"]) == 2 and all(c["sync_success"] for c in second["cbt_history"])
    detail = await rig.context()
    assert detail["context"]["successful_jobs"] == 2 and detail["context"]["total_jobs_run"] == 2
    assert len(detail["cbt_history"]) == 4
    assert [d["disk_change_id"] for d in detail["disks"]] == [d["change_id"] for d in second["disks"]]
    status, recent = await rig.api.get(f"/vm-contexts/{detail['context']['context_id']}/recent-jobs")
    assert status == 200 and [j["job_type"] for j in recent["jobs"]] == ["replication", "replication"]
    # The volumes were created once and reused.
    assert [d["volume_id"] for d in second["disks"]] == [d["volume_id"] for d in first["disks"]]


async def test_a_recreated_volume_and_a_mismatched_base_copy_in_full(rig: Rig) -> None:
    first = await rig.sync()
    # A reported previous_change_id that is not the one offered: that disk copies in full next time.
    status, started = await rig.start()
    assert status == 201
    job_id = started["job_id"]
    await rig.wait(job_id)
    third_base = rig.stack.sql("SELECT disk_change_id FROM vm_disks ORDER BY disk_id")
    assert all(v for (v,) in third_base)
    # Simulate a VMA that continued from something else: poke the reported base of disk-2001 of a new sync.
    rig.state.faults.add_job(F.JobFault(F.HANG, kind="replication"))
    status, started = await rig.start()
    assert status == 201, started
    hung = started["job_id"]
    await rig.state.wait_job(hung, statuses=("Finalizing",))
    status, body = await rig.api.post(f"/replications/{hung}/changeid",
                                      {"disk_id": "disk-2001", "change_id": "52 aa/9", "previous_change_id": "bogus"})
    assert status == 200 and "in full" in body["message"]
    status, body = await rig.api.post(f"/replications/{hung}/changeid",
                                      {"disk_id": "disk-2000", "change_id": "52 bb/9",
                                       "previous_change_id": rig.stack.sql(
                                           "SELECT disk_change_id FROM vm_disks WHERE disk_id = 'disk-2000'")[0][0]})
    assert status == 200
    rig.state.job(hung).status = "Succeeded"  # the VMA's word is what omad follows
    done = await rig.wait(hung)
    assert done["status"] == "completed"
    vm_path = rig.source_vm()["path"]
    _, c1 = await rig.api.get("/replications/changeid", params={"vm_path": vm_path, "disk_id": "disk-2001"})
    _, c0 = await rig.api.get("/replications/changeid", params={"vm_path": vm_path, "disk_id": "disk-2000"})
    assert c1["change_id"] == "" and c0["change_id"] == "52 bb/9"

    # A volume deleted behind our back is created anew and its disk starts over.
    vol0 = first["disks"][0]["volume_id"]
    agent = AgentClient("volume-agent", rig.stack.run_dir / "volume-agent.sock", timeout=60)
    try:
        await agent.call("POST", f"/volumes/{vol0}/detach")
        await agent.call("DELETE", f"/volumes/{vol0}")
    finally:
        await agent.close()
    again = await rig.sync()
    assert again["disks"][0]["volume_id"] != vol0
    vma = rig.state.job(again["job_id"])
    assert [d.sync_type for d in vma.disks] == ["full", "full"]
    rig.assert_volumes_hold_sources(again)


async def test_one_active_job_per_vm_and_progress_proxy(rig: Rig) -> None:
    rig.state.faults.add_job(F.JobFault(F.HANG, kind="replication"))
    status, started = await rig.start()
    assert status == 201, started
    job_id = started["job_id"]
    status, again = await rig.start()
    assert status == 409, again
    await rig.state.wait_job(job_id, statuses=("Finalizing",))
    status, body = await rig.api.get(f"/progress/{job_id}")
    assert status == 200 and body["status"] == "Finalizing" and body["job_id"] == job_id
    assert (await rig.api.get("/progress/job-unknown"))[0] == 404
    status, merged = await rig.api.get(f"/replications/{job_id}/progress")
    assert status == 200 and merged["status"] == "replicating"
    # Cancelled: exports stop, ports are freed, the context counts a failed job.
    status, body = await rig.api.delete(f"/replications/{job_id}")
    assert status == 200 and body["status"] == "cancelled"
    await rig.assert_released()
    ctx = (await rig.context())["context"]
    assert ctx["failed_jobs"] == 1 and ctx["current_job_id"] is None
    await rig.sim.close()
    status, body = await rig.api.get(f"/progress/{job_id}")
    assert status == 503, body


async def test_vma_failing_or_going_silent_fails_the_job_and_releases_everything(rig: Rig) -> None:
    rig.state.faults.add_job(F.JobFault(F.FAIL, kind="replication", after_bytes=2 * MiB))
    status, started = await rig.start()
    assert status == 201
    failed = await rig.wait(started["job_id"])
    assert failed["status"] == "failed" and "injected failure" in failed["error_message"]
    await rig.assert_released()
    rig.state.faults.add_job(F.JobFault(F.DISCONNECT, kind="replication", after_bytes=2 * MiB))
    status, started = await rig.start()
    assert status == 201
    silent = await rig.wait(started["job_id"], timeout=60)
    assert silent["status"] == "failed" and "silent" in silent["error_message"]
    await rig.assert_released()
    ctx = (await rig.context())["context"]
    assert (ctx["failed_jobs"], ctx["current_status"]) == (2, "failed")
    done = await rig.sync()
    assert done["replication_type"] == "initial"
    rig.assert_volumes_hold_sources(done)


async def test_omad_killed_mid_sync_readopts_and_completes(rig: Rig) -> None:
    """omad dies (kill -9) right after the start: the exports belong to nbd-pool, the VMA keeps writing and
    retries its change-id calls; the next omad adopts the running job and completes it."""
    status, started = await rig.start()
    assert status == 201
    job_id = started["job_id"]
    rig.stack.daemons["omad"].stop(sig=signal.SIGKILL)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(rig.stack.start, "omad")  # the same port: the VMA's tunnel lands there
    done = await rig.wait(job_id)
    assert done["status"] == "completed", (done, rig.log_tail())
    assert rig.state.job(job_id).status == "Succeeded"
    rig.assert_volumes_hold_sources(done)
    await rig.assert_released()
    assert "adopting" in rig.log_tail(lines=400)
