"""omad's /api/v1/nbd endpoints end to end: the spec's request and response shapes, delegated to the real
nbd-pool over its socket, real NBD clients writing into the exports; admin only; errors as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
import pytest
import pytest_asyncio

from ..nbd_pool.helpers import MIB, POOL_SIZE, free_range, leftovers, make_source, pool_config, sh, url
from ..rig import Api, Stack

pytestmark = [pytest.mark.timeout(120)]


class NbdStack:
    def __init__(self, stack: Stack, ports: range, repo: Path, admin: Api) -> None:
        self.stack = stack
        self.ports = ports
        self.repo = repo
        self.admin = admin

    def image(self, name: str, size: str = "64M") -> Path:
        path = self.repo / name
        sh("qemu-img", "create", "-q", "-f", "qcow2", path, size)
        return path


@pytest.fixture
def nbd_ports(short_tmp: Path) -> Iterator[range]:
    ports = free_range()
    yield ports
    left = leftovers(short_tmp, ports)
    assert not left, f"left behind: {left}"


@pytest_asyncio.fixture
async def nbd(nbd_ports: range, stack_config: Stack) -> AsyncIterator[NbdStack]:
    """The whole stack, nbd-pool on a free range exporting from <state>/repo; everything released after."""
    repo = stack_config.state / "repo"
    repo.mkdir()
    stack_config.add_config("nbd-pool", "50-test.toml", pool_config(nbd_ports, repo))
    await asyncio.to_thread(stack_config.start)
    api = Api(stack_config.url)
    await api.login("admin", stack_config.admin_password)
    try:
        yield NbdStack(stack_config, nbd_ports, repo, api)
        status, body = await api.get("/nbd/ports/status")
        if status == 200:
            for job in {a["job_id"] for a in body["allocations"]}:
                await api.post("/nbd/ports/release", {"job_id": job})
    finally:
        await api.close()


async def test_backup_flow_with_the_spec_shapes(nbd: NbdStack) -> None:
    api = nbd.admin
    status, alloc = await api.post("/nbd/ports/allocate", {"job_id": "backup-vm1-1", "export_name": "vm1",
                                                           "disk_count": 2})
    assert status == 200, alloc
    assert alloc["job_id"] == "backup-vm1-1" and alloc["expires_at"].endswith("Z")
    assert [p["export_name"] for p in alloc["allocated_ports"]] == ["vm1-disk-2000", "vm1-disk-2001"]
    ports = [p["port"] for p in alloc["allocated_ports"]]
    assert all(p in nbd.ports for p in ports) and len(set(ports)) == 2

    status, st = await api.get("/nbd/ports/status")
    assert status == 200
    assert (st["total_ports"], st["allocated"], st["available"]) == (POOL_SIZE, 2, POOL_SIZE - 2)
    assert sorted(st["allocations"], key=lambda a: a["port"])[0].keys() >= {
        "port", "job_id", "export_name", "allocated_at", "expires_at"}

    started = []
    for p in alloc["allocated_ports"]:
        image = nbd.image(f"{p['export_name']}.qcow2")
        status, out = await api.post("/nbd/qemu-nbd/start", {"export_name": p["export_name"], "port": p["port"],
                                                             "qcow2_path": str(image), "read_only": False,
                                                             "shared_connections": 10})
        assert status == 200, out
        assert out.keys() == {"pid", "port", "export_name", "status"}
        assert (out["port"], out["export_name"], out["status"]) == (p["port"], p["export_name"], "running")
        started.append(out)

    # The VMA's side: one stream per disk into the exports.
    src = make_source(nbd.stack.state / "disk.raw", 16 * MIB)
    for p in alloc["allocated_ports"]:
        await asyncio.to_thread(sh, "nbdcopy", src, url(p["port"], p["export_name"]))

    status, listed = await api.get("/nbd/qemu-nbd/list")
    assert status == 200
    procs = sorted(listed["processes"], key=lambda x: x["port"])
    for x in procs:
        assert x.keys() >= {"pid", "port", "export_name", "qcow2_path", "uptime_seconds", "connection_count",
                            "shared_limit"}
        assert x["shared_limit"] == 10 and x["qcow2_path"].startswith(str(nbd.repo))
    assert {x["pid"] for x in procs} == {s["pid"] for s in started}

    status, out = await api.post("/nbd/qemu-nbd/stop", {"export_name": "vm1-disk-2000"})
    assert (status, out) == (200, {"success": True, "stopped_pid": started[0]["pid"]})
    status, out = await api.post("/nbd/qemu-nbd/stop", {"pid": started[1]["pid"]})
    assert (status, out["success"], out["stopped_pid"]) == (200, True, started[1]["pid"])
    status, out = await api.post("/nbd/ports/release", {"job_id": "backup-vm1-1", "ports": ports})
    assert status == 200 and out["success"] is True and out["released_count"] == 2
    for p in alloc["allocated_ports"]:
        await asyncio.to_thread(sh, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", src,
                                nbd.repo / f"{p['export_name']}.qcow2")


async def test_invalid_requests_are_400_json(nbd: NbdStack) -> None:
    api = nbd.admin
    _, alloc = await api.post("/nbd/ports/allocate", {"job_id": "job-v", "export_name": "v", "disk_count": 1})
    port = alloc["allocated_ports"][0]["port"]
    image = nbd.image("v.qcow2", "4M")
    outside = nbd.stack.state / "outside.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", outside, "4M")
    good: dict[str, Any] = {"export_name": "v", "port": port, "qcow2_path": str(image)}
    cases: dict[str, dict[str, Any]] = {
        "path outside the roots": {"qcow2_path": str(outside)},
        "dot-dot out of the root": {"qcow2_path": f"{nbd.repo}/../outside.qcow2"},
        "name with a slash": {"export_name": "vm/disk"},
        "name with spaces": {"export_name": "vm disk 1"},
        "port above the range": {"port": nbd.ports.stop},
        "port below the range": {"port": nbd.ports.start - 1},
        "shared below 5": {"shared_connections": 1},
    }
    for what, override in cases.items():
        status, body = await api.post("/nbd/qemu-nbd/start", {**good, **override})
        assert status == 400, (what, status, body)
        assert body["error"] and body["details"] and body["timestamp"] and body["code"] == "invalid_request", body
    status, body = await api.post("/nbd/ports/allocate", {"job_id": "j", "export_name": "a/b", "disk_count": 1})
    assert status == 400
    status, body = await api.post("/nbd/qemu-nbd/stop", {})
    assert status == 400 and body["error"] == "say which export"
    status, body = await api.post("/nbd/qemu-nbd/stop", {"export_name": "nope"})
    assert status == 404 and body["code"] == "not_found"
    status, _ = await api.get("/nbd/qemu-nbd/list")
    assert status == 200


async def test_exhausted_pool_is_409_with_a_clear_message(nbd: NbdStack) -> None:
    api = nbd.admin
    status, out = await api.post("/nbd/ports/allocate", {"job_id": "job-all", "export_name": "all", "disk_count": 64})
    assert status == 200 and len(out["allocated_ports"]) == 64
    status, out = await api.post("/nbd/ports/allocate", {"job_id": "job-rest", "export_name": "r", "disk_count": 37})
    assert status == 200
    status, body = await api.post("/nbd/ports/allocate", {"job_id": "job-late", "export_name": "late", "disk_count": 1})
    assert status == 409 and body["code"] == "exhausted"
    assert body["error"] == "NBD port pool exhausted" and "0 of 101 are free" in body["details"]
    status, body = await api.post("/nbd/ports/release", {"job_id": "job-all"})
    assert status == 200 and body["released_count"] == 64


async def test_admin_only(nbd: NbdStack) -> None:
    assert nbd.stack.omactl("user", "add", "olga", "--password-stdin", stdin="s3cret-pass\n").returncode == 0
    async with Api(nbd.stack.url) as operator, Api(nbd.stack.url) as anon:
        await operator.login("olga", "s3cret-pass")
        for method, path in [("GET", "/nbd/ports/status"), ("POST", "/nbd/ports/allocate"),
                             ("POST", "/nbd/qemu-nbd/start"), ("GET", "/nbd/qemu-nbd/list")]:
            status, body = await operator.request(method, path, json_body={})
            assert status == 403 and body["code"] == "forbidden", (path, body)
            status, _ = await anon.request(method, path, json_body={})
            assert status == 401


async def test_nbd_pool_down_is_503(nbd: NbdStack) -> None:
    nbd.stack.stop("nbd-pool")
    status, body = await nbd.admin.get("/nbd/ports/status")
    assert status == 503 and body["code"] == "unavailable" and "nbd-pool" in body["details"]
    await asyncio.to_thread(nbd.stack.start, "nbd-pool")
    assert (await nbd.admin.get("/nbd/ports/status"))[0] == 200
