"""The port pool through the real nbd-pool: all-or-none leases under concurrency, exhaustion, release,
expiry (reclaimed when idle, renewed while in use), foreign listeners, and persistence across a restart."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from .conftest import POOL_SIZE, Pool, url

pytestmark = [pytest.mark.timeout(120)]


async def test_whole_range_under_concurrent_requests_then_409_then_release(pool: Pool) -> None:
    async def one(i: int) -> dict[str, Any]:
        return await pool.agent.ok("POST", "/ports/allocate", {"job_id": f"job-{i:03d}", "count": 1,
                                                               "export_names": [f"vm{i}-disk-2000"]})

    results = await asyncio.gather(*(one(i) for i in range(POOL_SIZE)))
    ports = [r["allocated_ports"][0]["port"] for r in results]
    assert len(set(ports)) == POOL_SIZE and set(ports) == set(pool.ports)
    status, body = await pool.agent.post("/ports/allocate", {"job_id": "job-late", "count": 1})
    assert status == 409 and body["code"] == "exhausted"
    assert body["error"] == "NBD port pool exhausted"
    assert "job job-late asked for 1 port(s) but only 0 of 101 are free" in body["details"]
    assert body["available"] == 0 and body["allocated"] == POOL_SIZE
    st = await pool.agent.ok("GET", "/ports/status")
    assert (st["total_ports"], st["allocated"], st["available"]) == (POOL_SIZE, POOL_SIZE, 0)
    assert {(a["port"], a["job_id"]) for a in st["allocations"]} == {(p, r["job_id"]) for p, r in zip(ports, results)}
    assert all(a["expires_at"].endswith("Z") and a["allocated_at"].endswith("Z") for a in st["allocations"])
    # Release: by job, and by port list.
    rel = await pool.agent.ok("POST", "/ports/release", {"job_id": "job-000"})
    assert rel["success"] is True and rel["released_count"] == 1
    rel = await pool.agent.ok("POST", "/ports/release", {"ports": ports[1:]})
    assert rel["released_count"] == POOL_SIZE - 1
    st = await pool.agent.ok("GET", "/ports/status")
    assert (st["allocated"], st["available"], st["allocations"]) == (0, POOL_SIZE, [])
    # Now one job can take the whole range at once, and a request for more than is free takes nothing.
    big = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-big", "count": POOL_SIZE - 1})
    assert len(big["allocated_ports"]) == POOL_SIZE - 1
    status, body = await pool.agent.post("/ports/allocate", {"job_id": "job-two", "count": 2})
    assert status == 409 and body["available"] == 1
    assert (await pool.agent.ok("GET", "/ports/status"))["allocated"] == POOL_SIZE - 1


async def test_multi_disk_allocation_is_all_or_none_and_names_follow_the_order(pool: Pool) -> None:
    out = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-md", "count": 3,
                                                          "export_names": ["d0", "d1", "d2"]})
    assert [p["export_name"] for p in out["allocated_ports"]] == ["d0", "d1", "d2"]
    assert len({p["port"] for p in out["allocated_ports"]}) == 3
    for body, what in [({"job_id": "job-x", "count": 2, "export_names": ["only-one"]}, "2 ports"),
                       ({"job_id": "job-x", "count": 1, "export_names": ["bad/name"]}, "export name"),
                       ({"job_id": "job x", "count": 1}, "job_id"),
                       ({"job_id": "job-x", "count": 0}, "count"),
                       ({"job_id": "job-x", "count": POOL_SIZE + 1}, "count")]:
        status, err = await pool.agent.post("/ports/allocate", body)
        assert status == 400 and err["code"] == "invalid_request", (what, err)
    assert (await pool.agent.ok("GET", "/ports/status"))["allocated"] == 3


async def test_release_checks_ownership_and_range_and_is_idempotent(pool: Pool) -> None:
    a = (await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-a", "count": 1}))["allocated_ports"][0]["port"]
    status, body = await pool.agent.post("/ports/release", {"job_id": "job-b", "ports": [a]})
    assert status == 409 and f"port {a} is leased to job job-a" in body["details"]
    status, body = await pool.agent.post("/ports/release", {"ports": [pool.ports.stop + 5]})
    assert status == 400 and body["error"] == "port outside the pool"
    status, body = await pool.agent.post("/ports/release", {})
    assert status == 400
    assert (await pool.agent.ok("POST", "/ports/release", {"job_id": "job-none"}))["released_count"] == 0
    assert (await pool.agent.ok("POST", "/jobs/job-a/release"))["released_count"] == 1
    assert (await pool.agent.ok("POST", "/jobs/job-a/release"))["released_count"] == 0


async def test_renew_pushes_the_expiry(pool: Pool) -> None:
    first = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-r", "count": 2, "lease_seconds": 60})
    renewed = await pool.agent.ok("POST", "/ports/renew", {"job_id": "job-r", "lease_seconds": 7200})
    assert renewed["expires_at"] > first["expires_at"] and sorted(renewed["ports"]) == sorted(
        p["port"] for p in first["allocated_ports"])
    status, body = await pool.agent.post("/ports/renew", {"job_id": "job-unknown"})
    assert status == 404 and body["code"] == "not_found"
    status, body = await pool.agent.post("/ports/renew", {"job_id": "job-r", "lease_seconds": 10**9})
    assert status == 400 and "lease_seconds" in body["details"]


async def test_an_expired_idle_lease_is_reclaimed(make_pool: Any) -> None:
    pool = await make_pool("idle_grace_seconds = 0\n")  # by default an export is given 15 minutes' grace
    short = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-short", "count": 1, "lease_seconds": 1})
    await pool.export("job-short", pool.image("idle.qcow2", "4M"), "idle", port=short["allocated_ports"][0]["port"])
    await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-rest", "count": POOL_SIZE - 1})
    status, _ = await pool.agent.post("/ports/allocate", {"job_id": "job-new", "count": 1})
    assert status == 409  # not expired yet
    await asyncio.sleep(1.2)  # the lease is one second long; nothing is connected to its export
    got = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-new", "count": 1})
    assert got["allocated_ports"][0]["port"] == short["allocated_ports"][0]["port"]
    assert (await pool.agent.ok("GET", "/exports"))["processes"] == []  # the idle export went with its lease


async def test_an_expired_lease_in_use_is_renewed_not_killed(make_pool: Any) -> None:
    pool = await make_pool("reconcile_interval_seconds = 0.2\nidle_grace_seconds = 0\n")
    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-long", "count": 1, "lease_seconds": 1})
    e = await pool.export("job-long", pool.image("busy.qcow2", "4M"), "busy", port=alloc["allocated_ports"][0]["port"])
    client = await asyncio.create_subprocess_exec("qemu-io", "-f", "raw", url(e["port"], "busy"),
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:  # the periodic check sees the client and renews the lease past its one second
            lease = (await pool.agent.ok("GET", "/ports/status"))["allocations"][0]
            if lease["expires_at"] > alloc["expires_at"]:
                break
            assert time.monotonic() < deadline, lease
            await asyncio.sleep(0.1)
        assert [p["pid"] for p in (await pool.agent.ok("GET", "/exports"))["processes"]] == [e["pid"]]
    finally:
        assert client.stdin is not None
        client.stdin.close()
        await client.wait()
    # Once the client is gone (and the renewed lease runs out) the export would be reclaimed; that is the
    # idle case above. Here the job releases it.
    assert (await pool.agent.ok("POST", "/jobs/job-long/release"))["stopped_exports"] == 1


async def test_a_port_held_by_a_foreign_process_is_skipped_and_reported(pool: Pool) -> None:
    foreign = pool.ports.start + 7
    with socket.socket() as s:
        s.bind(("127.0.0.1", foreign))
        s.listen()
        st = await pool.agent.ok("GET", "/ports/status")
        assert st["foreign_ports"] == [foreign] and st["available"] == POOL_SIZE - 1
        health = await pool.agent.ok("GET", "/health")
        assert health["foreign_ports"] == [foreign] and health["available"] == POOL_SIZE - 1
        got = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-f", "count": POOL_SIZE - 1})
        assert foreign not in {p["port"] for p in got["allocated_ports"]}
        status, body = await pool.agent.post("/ports/allocate", {"job_id": "job-g", "count": 1})
        assert status == 409 and f"1 held by other processes: {foreign}" in body["details"]
        assert body["foreign_ports"] == [foreign]


async def test_leases_survive_a_restart(pool: Pool) -> None:
    got = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-p", "count": 2, "export_names": ["p0", "p1"]})
    before = (await pool.agent.ok("GET", "/ports/status"))["allocations"]
    assert pool.stop() == 0
    await asyncio.to_thread(pool.start)
    after = (await pool.agent.ok("GET", "/ports/status"))["allocations"]
    assert after == before and len(after) == len(got["allocated_ports"])
