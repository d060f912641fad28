"""The VMA simulator: discovery and power shapes, fault injection seen by a real client, and backup /
replication jobs writing real bytes into real qemu-nbd exports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from tests.sim.vma import MiB, Inventory, SimState, VMASim

from ..lib.qemu_nbd import qemu_nbd as bare_export

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

USER = "administrator@vsphere.local"
PASSWORD = "VMware1!"
VCENTER = "vcenter.sim.local"
ODD_NAMES = ["web 01", "db/primary – ünïcödé", "x" * 80 + " very long name"]

requires_qemu = pytest.mark.skipif(
    not all(shutil.which(p) for p in ("qemu-img", "qemu-io", "qemu-nbd")),
    reason="qemu-utils (qemu-img, qemu-io, qemu-nbd) is not installed",
)


def make_inventory() -> Inventory:
    inv = Inventory(host=VCENTER, datacenter="DC1", username=USER, password=PASSWORD)
    inv.add_vm(ODD_NAMES[0], disks=2, nics=2, folder="Production")
    inv.add_vm(ODD_NAMES[1], disks=[32 * MiB, 64 * MiB, 32 * MiB], nics=1, memory_mb=8192, num_cpu=4)
    inv.add_vm(ODD_NAMES[2], disks=1, nics=3, power_state="poweredOff")
    return inv


def creds(**extra: Any) -> dict[str, Any]:
    return {"vcenter": VCENTER, "username": USER, "password": PASSWORD, "datacenter": "DC1", **extra}


@pytest_asyncio.fixture
async def sim(tmp_path: Path) -> AsyncIterator[VMASim]:
    state = SimState(make_inventory(), workdir=tmp_path / "vmasim", telemetry_interval=0.05, outbound_timeout=5)
    async with VMASim(state=state) as s:
        yield s


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as c:
        yield c


# -- a tiny OMA receiving what the VMA's clients send back ------------------------------------------


class FakeOma:
    """Records telemetry and completions and serves/stores change ids like omad does."""

    def __init__(self) -> None:
        self.telemetry: list[dict[str, Any]] = []
        self.completes: list[tuple[str, dict[str, Any]]] = []
        self.backup_vm: dict[str, str] = {}  # backup id -> vm name (the test registers it)
        self.backup_change_ids: dict[tuple[str, int], str] = {}
        self.replication_vm: dict[str, str] = {}  # job id -> vm path
        self.replication_change_ids: dict[tuple[str, str], str] = {}
        self.url = ""
        self._runner: Optional[web.AppRunner] = None

    async def _telemetry(self, request: web.Request) -> web.Response:
        body = await request.json()
        body["_path"] = request.path
        self.telemetry.append(body)
        return web.json_response({"status": "ok"})

    async def _complete(self, request: web.Request) -> web.Response:
        backup_id = request.match_info["backup_id"]
        body = await request.json()
        self.completes.append((backup_id, body))
        if backup_id not in self.backup_vm:
            return web.json_response({"error": "Backup not found"}, status=404)
        self.backup_change_ids[(self.backup_vm[backup_id], body["disk_id"])] = body["change_id"]
        return web.json_response({"status": "completed", "backup_id": backup_id, "change_id": body["change_id"]})

    async def _backup_changeid(self, request: web.Request) -> web.Response:
        key = (request.query["vm_name"], int(request.query["disk_id"]))
        if key not in self.backup_change_ids:
            return web.json_response({"error": "not found"}, status=404)
        cid = self.backup_change_ids[key]
        return web.json_response({"vm_name": key[0], "disk_id": key[1], "change_id": cid, "backup_job_id": "x"})

    async def _replication_changeid_get(self, request: web.Request) -> web.Response:
        key = (request.query["vm_path"], request.query["disk_id"])
        return web.json_response({"vm_path": key[0], "disk_id": key[1],
                                  "change_id": self.replication_change_ids.get(key, ""), "message": ""})

    async def _replication_changeid_post(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        body = await request.json()
        if job_id not in self.replication_vm:
            return web.json_response({"error": "Job not found"}, status=404)
        self.replication_change_ids[(self.replication_vm[job_id], body["disk_id"])] = body["change_id"]
        return web.json_response({"job_id": job_id, "disk_id": body["disk_id"], "change_id": body["change_id"]})

    async def __aenter__(self) -> "FakeOma":
        app = web.Application()
        app.add_routes([
            web.post("/api/v1/telemetry/{job_type}/{job_id}", self._telemetry),
            web.post("/api/v1/backups/{backup_id}/complete", self._complete),
            web.get("/api/v1/backups/changeid", self._backup_changeid),
            web.get("/api/v1/replications/changeid", self._replication_changeid_get),
            web.post("/api/v1/replications/{job_id}/changeid", self._replication_changeid_post),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def telemetry_for(self, job_id: str) -> list[dict[str, Any]]:
        return [t for t in self.telemetry if t["job_id"] == job_id]


@pytest_asyncio.fixture
async def oma(sim: VMASim) -> AsyncIterator[FakeOma]:
    async with FakeOma() as fake:
        sim.state.oma_url = fake.url
        yield fake


# -- real qemu-nbd exports ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nbd_export(image: Path, fmt: str, name: str) -> AsyncIterator[str]:
    """qemu-nbd on a free port, as nbd-pool runs it; yields the nbd:// URL."""
    async with bare_export(image, fmt=fmt, name=name) as port:
        yield f"nbd://127.0.0.1:{port}/{name}"


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=30)


def assert_identical(image: Path, fmt: str, source: Path) -> None:
    r = qemu_img("compare", "-f", fmt, "-F", "raw", str(image), str(source))
    assert r.returncode == 0, r.stdout + r.stderr


def write_random(path: Path, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(length))


async def start_backup(client: aiohttp.ClientSession, sim: VMASim, job_id: str, vm_name: str,
                       targets: list[str], backup_type: str = "full") -> aiohttp.ClientResponse:
    vm = sim.state.vm(vm_name)
    body = {
        "job_id": job_id, "vm_name": vm_name, "vm_path": vm.path, "vcenter_host": VCENTER,
        "vcenter_user": USER, "vcenter_password": PASSWORD, "backup_type": backup_type,
        "nbd_targets": ",".join(f"{2000 + i}:{url}" for i, url in enumerate(targets)),
    }
    async with client.post(sim.api_url + "/backup/start", json=body) as resp:
        await resp.read()
        return resp


# -- discovery, power, health ------------------------------------------------------------------------


DISK_FIELDS = {"id", "label", "path", "vmdk_path", "size_gb", "capacity_bytes", "datastore",
               "provisioning_type", "unit_number"}
NIC_FIELDS = {"label", "network_name", "adapter_type", "mac_address", "connected", "type"}
VM_FIELDS = {"id", "name", "path", "datacenter", "power_state", "guest_os", "os_type", "memory_mb", "num_cpu",
             "cpus", "vmx_version", "display_name", "annotation", "folder_path", "vmware_tools_status",
             "vmware_tools_version", "disks", "networks"}


async def test_discovery_has_every_contract_field(sim: VMASim, client: aiohttp.ClientSession) -> None:
    async with client.post(sim.api_url + "/discover", json=creds()) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["vcenter"] == {"host": VCENTER, "datacenter": "DC1"}
    assert [vm["name"] for vm in body["vms"]] == ODD_NAMES
    for vm in body["vms"]:
        assert set(vm) == VM_FIELDS
        assert vm["cpus"] == vm["num_cpu"]
        for disk in vm["disks"]:
            assert set(disk) == DISK_FIELDS
        for nic in vm["networks"]:
            assert set(nic) == NIC_FIELDS
            assert nic["mac_address"].startswith("00:50:56:")
    db = body["vms"][1]
    assert [d["id"] for d in db["disks"]] == ["disk-2000", "disk-2001", "disk-2002"]
    assert [d["capacity_bytes"] for d in db["disks"]] == [32 * MiB, 64 * MiB, 32 * MiB]
    assert db["disks"][1]["vmdk_path"] == "[datastore1] db%2fprimary – ünïcödé/db%2fprimary – ünïcödé_1.vmdk"
    assert db["path"] == "/DC1/vm/db%2fprimary – ünïcödé"
    assert len(body["vms"][2]["networks"]) == 3 and body["vms"][2]["power_state"] == "poweredOff"
    assert len({n["mac_address"] for vm in body["vms"] for n in vm["networks"]}) == 6


async def test_discovery_filter_and_live_inventory_changes(sim: VMASim, client: aiohttp.ClientSession) -> None:
    async def names(**extra: Any) -> list[str]:
        async with client.post(sim.api_url + "/discover", json=creds(**extra)) as resp:
            return [vm["name"] for vm in (await resp.json())["vms"]]

    assert await names(filter="ünï") == [ODD_NAMES[1]]
    assert await names(filter="nothing-like-it") == []
    sim.state.add_disk(ODD_NAMES[0], 8 * MiB)
    sim.state.resize_disk(ODD_NAMES[0], 0, 128 * MiB)
    sim.state.add_vm("new vm", disks=1, nics=1)
    async with client.post(sim.api_url + "/discover", json=creds(filter="web")) as resp:
        web01 = (await resp.json())["vms"][0]
    assert [(d["id"], d["capacity_bytes"], d["unit_number"]) for d in web01["disks"]] == [
        ("disk-2000", 128 * MiB, 0), ("disk-2001", 64 * MiB, 1), ("disk-2002", 8 * MiB, 2)]
    assert "new vm" in await names()


async def test_wrong_credentials_are_plain_text_errors(sim: VMASim, client: aiohttp.ClientSession) -> None:
    async with client.post(sim.api_url + "/discover", json=creds(password="wrong")) as resp:
        assert resp.status == 500
        assert resp.content_type == "text/plain"
        assert "incorrect user name or password" in await resp.text()
    sim.state.auth_failure_status = 401
    async with client.post(sim.api_url + "/discover", json=creds(username="root")) as resp:
        assert resp.status == 401 and resp.content_type == "text/plain"
    async with client.post(sim.api_url + "/discover", json=creds(vcenter="other.example")) as resp:
        assert resp.status == 500 and "failed to connect" in await resp.text()


async def test_power_calls_and_health(sim: VMASim, client: aiohttp.ClientSession) -> None:
    vm = sim.state.vm(ODD_NAMES[0])
    async with client.get(sim.api_url + "/health") as resp:
        assert (await resp.json())["status"] == "healthy"
    async with client.get(f"{sim.api_url}/vm/{vm.id}/power-state") as resp:
        assert await resp.json() == {"vm_id": vm.id, "power_state": "poweredOn"}
    body = {"vm_id": vm.id, "vcenter": VCENTER, "username": USER, "password": PASSWORD}
    async with client.post(f"{sim.api_url}/vm/{vm.id}/power-off", json={**body, "force": True}) as resp:
        off = await resp.json()
    assert (off["success"], off["previous_state"], off["new_state"]) == (True, "poweredOn", "poweredOff")
    async with client.post(f"{sim.api_url}/vm/{vm.id}/power-off", json=body) as resp:
        assert (await resp.json())["previous_state"] == "poweredOff"
    async with client.post(f"{sim.api_url}/vm/{vm.id}/power-on", json=body) as resp:
        assert (await resp.json())["new_state"] == "poweredOn"
    async with client.post(f"{sim.api_url}/vm/{vm.id}/power-on", json={**body, "password": "x"}) as resp:
        assert resp.status == 500 and resp.content_type == "text/plain"
    async with client.get(f"{sim.api_url}/vm/no-such-uuid/power-state") as resp:
        assert resp.status == 500 and "not found" in await resp.text()
    async with client.get(f"{sim.api_url}/progress/job-unknown") as resp:
        assert resp.status == 404


async def test_every_request_is_recorded(sim: VMASim, client: aiohttp.ClientSession) -> None:
    async with client.post(sim.api_url + "/discover", json=creds(filter="web")) as resp:
        assert resp.status == 200
    async with client.get(sim.api_url + "/health"):
        pass
    (rec,) = sim.state.requests_to("discover", "POST")
    assert rec.json == creds(filter="web")
    assert [r.path for r in sim.state.requests] == ["/api/v1/discover", "/api/v1/health"]


# -- endpoint faults seen by a real client -----------------------------------------------------------


async def test_fault_delay_beyond_client_timeout(sim: VMASim) -> None:
    sim.state.faults.delay("discover", seconds=30, times=1)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as c:
        with pytest.raises(asyncio.TimeoutError):
            async with c.post(sim.api_url + "/discover", json=creds()) as resp:
                await resp.read()
        async with c.post(sim.api_url + "/discover", json=creds()) as resp:  # fault used up
            assert resp.status == 200


async def test_fault_short_delay_then_normal_answer(sim: VMASim, client: aiohttp.ClientSession) -> None:
    sim.state.faults.delay("health", seconds=0.2)
    t0 = time.monotonic()
    async with client.get(sim.api_url + "/health") as resp:
        assert resp.status == 200
    assert time.monotonic() - t0 >= 0.2


async def test_fault_5xx_plain_text(sim: VMASim, client: aiohttp.ClientSession) -> None:
    fault = sim.state.faults.error("vm/*/power-off", status=503, body="vCenter is unavailable")
    vm = sim.state.vm(ODD_NAMES[0])
    for _ in range(2):
        async with client.post(f"{sim.api_url}/vm/{vm.id}/power-off", json={}) as resp:
            assert resp.status == 503 and resp.content_type == "text/plain"
            assert await resp.text() == "vCenter is unavailable"
    assert fault.hits == 2 and vm.power_state == "poweredOn"


async def test_fault_malformed_json(sim: VMASim, client: aiohttp.ClientSession) -> None:
    sim.state.faults.malformed("discover")
    async with client.post(sim.api_url + "/discover", json=creds()) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        with pytest.raises(ValueError):
            await resp.json()


async def test_fault_dropped_connection(sim: VMASim, client: aiohttp.ClientSession) -> None:
    sim.state.faults.drop("discover", times=1)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        async with client.post(sim.api_url + "/discover", json=creds()) as resp:
            await resp.read()
    async with client.post(sim.api_url + "/discover", json=creds()) as resp:
        assert resp.status == 200
    assert len(sim.state.requests_to("discover")) == 2


# -- backups into real qemu-nbd exports --------------------------------------------------------------


@requires_qemu
async def test_backup_full_then_incremental_writes_exact_images(
        sim: VMASim, oma: FakeOma, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    vm = sim.state.add_vm("backup me", disks=[64 * MiB, 32 * MiB], nics=1)
    src0 = sim.state.source_path(vm, 0)
    src1 = sim.state.source_path(vm, 1)
    write_random(src0, 0, 4 * MiB)
    write_random(src0, 40 * MiB, 3 * MiB + 4096)
    write_random(src1, 10 * MiB, 2 * MiB)
    bases = [tmp_path / f"full-{i}.qcow2" for i in range(2)]
    for image, disk in zip(bases, vm.disks):
        assert qemu_img("create", "-f", "qcow2", str(image), str(disk.capacity_bytes)).returncode == 0

    oma.backup_vm["backup-full"] = vm.name
    async with nbd_export(bases[0], "qcow2", "full-0") as t0, nbd_export(bases[1], "qcow2", "full-1") as t1:
        resp = await start_backup(client, sim, "backup-full", vm.name, [t0, t1])
        assert resp.status == 202
        job = await sim.state.wait_job("backup-full", timeout=30)
        assert job.status == "Succeeded", job.last_error
    assert_identical(bases[0], "qcow2", src0)
    assert_identical(bases[1], "qcow2", src1)
    assert [(c[1]["disk_id"], c[1]["bytes_transferred"]) for c in oma.completes] == [
        (0, 7 * MiB + 4096), (1, 2 * MiB)]
    full_cids = [c[1]["change_id"] for c in oma.completes]
    assert all(cid.count(" ") == 14 and "/" in cid for cid in full_cids)
    phases = [t["current_phase"] for t in oma.telemetry_for("backup-full")]
    assert phases[0] == "preparing" and phases[-1] == "completed"
    assert oma.telemetry_for("backup-full")[-1]["progress_percent"] == 100.0

    # Change 1 MiB of disk 0 (unaligned), then an incremental into overlays of the fulls.
    sim.state.write_source(vm, 0, 20 * MiB + 512, os.urandom(MiB))
    tops = [tmp_path / f"inc-{i}.qcow2" for i in range(2)]
    for top, base in zip(tops, bases):
        assert qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top)).returncode == 0
    oma.backup_vm["backup-inc"] = vm.name
    async with nbd_export(tops[0], "qcow2", "inc-0") as t0, nbd_export(tops[1], "qcow2", "inc-1") as t1:
        resp = await start_backup(client, sim, "backup-inc", vm.name, [t0, t1], backup_type="incremental")
        assert resp.status == 202
        job = await sim.state.wait_job("backup-inc", timeout=30)
        assert job.status == "Succeeded", job.last_error
    assert job.sync_type == "incremental"
    assert_identical(tops[0], "qcow2", src0)
    assert_identical(tops[1], "qcow2", src1)
    inc = [c[1] for c in oma.completes if c[0] == "backup-inc"]
    # 1 MiB not aligned to 64 KiB touches 17 blocks.
    assert [c["bytes_transferred"] for c in inc] == [17 * 64 * 1024, 0]
    assert [c["change_id"].split("/")[0] for c in inc] == [c.split("/")[0] for c in full_cids]
    assert all(int(new["change_id"].split("/")[1]) > int(old.split("/")[1]) for new, old in zip(inc, full_cids))
    # The VMA asked the OMA for each disk's previous change id.
    assert len(sim.state.calls_to("/api/v1/backups/changeid", "GET")) == 2


@requires_qemu
async def test_backup_refuses_targets_that_do_not_match_disks(sim: VMASim, oma: FakeOma,
                                                              client: aiohttp.ClientSession) -> None:
    resp = await start_backup(client, sim, "b-1", ODD_NAMES[0], ["nbd://127.0.0.1:10100/only-one"])
    assert resp.status == 500 and resp.content_type == "text/plain"
    async with client.post(sim.api_url + "/backup/start", json={"job_id": "b-2", "vm_name": ODD_NAMES[0],
                                                                "nbd_targets": "garbage"}) as r:
        assert r.status == 400


@requires_qemu
async def test_replication_full_then_incremental(sim: VMASim, oma: FakeOma, client: aiohttp.ClientSession,
                                                 tmp_path: Path) -> None:
    vm = sim.state.add_vm("replicate me", disks=[32 * MiB], nics=1)
    src = sim.state.source_path(vm, 0)
    write_random(src, 1 * MiB, 5 * MiB)
    volume = tmp_path / "volume.raw"
    with open(volume, "wb") as f:  # a "CloudStack volume" with junk where the source has holes
        f.truncate(32 * MiB)
        f.seek(20 * MiB)
        f.write(b"\xff" * MiB)
    sim.state.oma_url = None  # take the request's oma_url, like the real engine

    async def replicate(job_id: str, url: str) -> dict[str, Any]:
        oma.replication_vm[job_id] = vm.path
        body = {**{k: v for k, v in creds().items() if k != "datacenter"}, "job_id": job_id, "vm_paths": [vm.path],
                "oma_url": oma.url, "nbd_targets": [{"device_path": url, "vmware_disk_key": "2000"}]}
        async with client.post(sim.api_url + "/replicate", json=body) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["status"] == "started" and answer["vm_count"] == 1
        job = await sim.state.wait_job(job_id, timeout=30)
        assert job.status == "Succeeded", job.last_error
        async with client.get(f"{sim.api_url}/progress/{job_id}") as resp:
            return dict(await resp.json())

    async with nbd_export(volume, "raw", "vol") as target:
        first = await replicate("job-1", target)
        assert_identical(volume, "raw", src)
        assert first["sync_type"] == "full" and first["status"] == "Succeeded"
        sim.state.write_source(vm, 0, 30 * MiB, os.urandom(256 * 1024))
        with open(src, "r+b") as g:  # and zero a block that had data, telling the simulator afterwards
            g.seek(1 * MiB)
            g.write(bytes(64 * 1024))
        sim.state.changed(vm, 0, (1 * MiB, 64 * 1024))
        second = await replicate("job-2", target)
        assert_identical(volume, "raw", src)
    assert second["sync_type"] == "incremental"
    assert second["bytes_transferred"] == 256 * 1024
    # The simulator counts 64 KiB blocks: the full sent every allocated one, the incremental only the changed.
    assert first["disk_progresses"][0]["blocks_written"] == 5 * MiB // (64 * 1024)
    assert second["disk_progresses"][0]["blocks_written"] == 4
    assert second["disk_progresses"][0]["zero_blocks_written"] == 1
    stored = [c for c in sim.state.calls_to("/changeid", "POST")]
    assert [c.json["disk_id"] for c in stored] == ["disk-2000", "disk-2000"]
    assert stored[1].json["previous_change_id"] == stored[0].json["change_id"]
    assert set(second) >= {"job_id", "status", "sync_type", "phase", "percentage", "current_operation",
                           "bytes_transferred", "total_bytes", "throughput", "timing", "disk_progresses",
                           "errors", "last_error"}


async def test_change_map_names_only_the_noted_areas(tmp_path: Path) -> None:
    """Like VMware's CBT: the areas changed since a change id come from the noted writes (block-aligned),
    a write after a snapshot belongs to the next one, an unknown base means a full copy, and a source
    written without a note drops every change id (a full copy, never a short one)."""
    from tests.sim.vma.cbt import DiskTracker, Extent

    src = tmp_path / "disk.raw"
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
    t = DiskTracker("vm/2000")
    first = t.snapshot(str(src), None)
    assert first.changed is None
    t.note(100, 10, str(src))
    t.note(3 * MiB, 128 * 1024 + 1, str(src))
    second = t.snapshot(str(src), first.change_id)
    assert second.changed == [Extent(0, 64 * 1024), Extent(3 * MiB, 3 * 64 * 1024)]
    t.note(5 * MiB, 1, str(src))  # after the second snapshot: only the third sees it
    third = t.snapshot(str(src), second.change_id)
    assert third.changed == [Extent(5 * MiB, 64 * 1024)]
    assert t.snapshot(str(src), first.change_id).changed == [
        Extent(0, 64 * 1024), Extent(3 * MiB, 3 * 64 * 1024), Extent(5 * MiB, 64 * 1024)]
    assert t.snapshot(str(src), "52 00/1").changed is None
    time.sleep(0.02)  # a later mtime, whatever the file system's timestamp granularity
    with open(src, "r+b") as f:  # behind the tracker's back
        f.write(b"x")
    assert t.snapshot(str(src), third.change_id).changed is None and t.resets == 1


@requires_qemu
async def test_replication_of_a_source_written_without_a_note_is_full(
        sim: VMASim, oma: FakeOma, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    vm = sim.state.add_vm("unnoted", disks=[16 * MiB], nics=1)
    src = sim.state.source_path(vm, 0)
    sim.state.write_source(vm, 0, 0, os.urandom(2 * MiB))
    volume = tmp_path / "volume.raw"
    with open(volume, "wb") as f:
        f.truncate(16 * MiB)
    sim.state.oma_url = None
    oma.replication_vm.update({"r-1": vm.path, "r-2": vm.path})
    async with nbd_export(volume, "raw", "vol") as target:
        for job_id in ("r-1", "r-2"):
            body = {**{k: v for k, v in creds().items() if k != "datacenter"}, "job_id": job_id,
                    "vm_paths": [vm.path], "oma_url": oma.url,
                    "nbd_targets": [{"device_path": target, "vmware_disk_key": "2000"}]}
            async with client.post(sim.api_url + "/replicate", json=body) as resp:
                assert resp.status == 200
            job = await sim.state.wait_job(job_id, timeout=30)
            assert job.status == "Succeeded", job.last_error
            if job_id == "r-1":
                await asyncio.sleep(0.02)  # a later mtime, whatever the file system's timestamp granularity
                write_random(src, 8 * MiB, MiB)  # no note: the next copy cannot trust the change map
    # r-2 asked to continue from r-1's change id, which no longer holds: it copied in full, exactly.
    assert [sim.state.job(j).sync_type for j in ("r-1", "r-2")] == ["full", "full"]
    assert [c.json.get("previous_change_id") for c in sim.state.calls_to("/changeid", "POST")] == [
        None, sim.state.job("r-1").disks[0].change_id]
    assert_identical(volume, "raw", src)


# -- job faults ------------------------------------------------------------------------------------


async def _backup_with_fault(sim: VMASim, oma: FakeOma, client: aiohttp.ClientSession, tmp_path: Path,
                             job_id: str, statuses: tuple[str, ...], settle: bool = False) -> Any:
    vm = sim.state.vm(ODD_NAMES[2])  # one 64 MiB disk
    src = sim.state.source_path(vm, 0)
    write_random(src, 0, 8 * MiB)
    image = tmp_path / f"{job_id}.qcow2"
    assert qemu_img("create", "-f", "qcow2", str(image), str(64 * MiB)).returncode == 0
    oma.backup_vm[job_id] = vm.name
    async with nbd_export(image, "qcow2", job_id) as target:
        resp = await start_backup(client, sim, job_id, vm.name, [target])
        assert resp.status == 202
        job = await sim.state.wait_job(job_id, timeout=30, statuses=statuses)
        if settle:  # let the job's task run to its end while the export is still up
            assert job.task is not None
            await asyncio.wait_for(asyncio.shield(job.task), timeout=30)
    return job


@requires_qemu
async def test_job_fault_fail_mid_transfer(sim: VMASim, oma: FakeOma, client: aiohttp.ClientSession,
                                           tmp_path: Path) -> None:
    sim.state.faults.fail_job(after_bytes=2 * MiB, message="NBD write failed: broken pipe")
    job = await _backup_with_fault(sim, oma, client, tmp_path, "b-fail", ("Failed",))
    assert job.bytes_transferred == 2 * MiB and job.last_error == "NBD write failed: broken pipe"
    last = oma.telemetry_for("b-fail")[-1]
    assert last["status"] == "failed" and last["error"]["message"] == "NBD write failed: broken pipe"
    assert oma.completes == []
    async with client.get(f"{sim.api_url}/progress/b-fail") as resp:
        body = await resp.json()
    assert body["status"] == "Failed" and body["last_error"] == "NBD write failed: broken pipe"


@requires_qemu
async def test_job_fault_never_completes(sim: VMASim, oma: FakeOma, client: aiohttp.ClientSession,
                                         tmp_path: Path) -> None:
    sim.state.faults.hang_job(vm_name=ODD_NAMES[2])
    job = await _backup_with_fault(sim, oma, client, tmp_path, "b-hang", ("Finalizing",))
    assert job.bytes_transferred == 8 * MiB
    assert oma.completes == []
    assert all(t["status"] == "running" for t in oma.telemetry_for("b-hang"))


@requires_qemu
async def test_job_fault_disconnect(sim: VMASim, oma: FakeOma, client: aiohttp.ClientSession,
                                    tmp_path: Path) -> None:
    sim.state.faults.disconnect_job(after_bytes=3 * MiB)
    # The job stays frozen in Streaming once its budget is spent: wait for its task to end.
    job = await _backup_with_fault(sim, oma, client, tmp_path, "b-gone", ("Streaming",), settle=True)
    assert job.status == "Streaming" and job.bytes_transferred == 3 * MiB
    assert oma.completes == []
    assert all(t["status"] == "running" for t in oma.telemetry_for("b-gone"))


async def test_job_fault_refuse(sim: VMASim, oma: FakeOma, client: aiohttp.ClientSession) -> None:
    sim.state.faults.refuse_job(message="snapshot failed")
    resp = await start_backup(client, sim, "b-no", ODD_NAMES[2], ["nbd://127.0.0.1:1/x"])
    assert resp.status == 200
    assert sim.state.job("b-no").status == "Failed"
    assert oma.telemetry == []


# -- command line --------------------------------------------------------------------------------------


async def test_command_line_serves_an_inventory_file(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    inventory = {
        "vcenter": {"host": VCENTER, "datacenter": "DC1", "username": USER, "password": PASSWORD},
        "vms": [{"name": "cli vm", "disks": [{"capacity_bytes": 32 * MiB, "datastore": "ssd"}],
                 "nics": ["LAN", {"network_name": "DMZ", "adapter_type": "e1000e"}]}],
    }
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(inventory))
    repo = Path(__file__).resolve().parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.sim.vma", "--port", "0", "--inventory", str(path),
        "--workdir", str(tmp_path / "work"), cwd=str(repo), stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=15)
        assert b"listening on " in line, line
        api_url = line.decode().split("listening on ")[1].split()[0]
        async with client.post(api_url + "/discover", json=creds()) as resp:
            (vm,) = (await resp.json())["vms"]
        assert vm["disks"][0]["vmdk_path"] == "[ssd] cli vm/cli vm.vmdk"
        assert [(n["network_name"], n["adapter_type"]) for n in vm["networks"]] == [("LAN", "vmxnet3"), ("DMZ", "e1000e")]
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
