"""Expiry rules with a fake clock: a lease in use is renewed, one idle within the grace kept, one idle longer
reclaimed with its export; release stops a job's exports (all at once) before freeing ports."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, cast

import psutil
import pytest

from nbd_pool.adapters.qemu_nbd import ExportOptions, QemuNbdExport
from nbd_pool.exports import Exports, StartRequest, records_file
from nbd_pool.jobs import Jobs
from nbd_pool.pool import Pool
from nbd_pool.roots import Roots
from oma_common.statefile import Damaged, StateFile
from oma_common.errors import Conflict, Unavailable

from .helpers import free_range, sh

from .test_pool import Clock


@dataclasses.dataclass
class FakeLive:
    name: str
    port: int
    job_id: str
    clients: list[str]
    last_active: float


class FakeExports:
    """What Jobs uses of Exports, with the clients and activity set by the test."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.live: dict[int, FakeLive] = {}
        self.stopped: list[int] = []
        self.refreshed = 0

    def add(self, port: int, job_id: str, clients: int = 0, idle: float = 0.0) -> None:
        self.live[port] = FakeLive(f"e{port}", port, job_id, [f"127.0.0.1:{40000 + i}" for i in range(clients)],
                                   self.clock() - idle)

    async def refresh(self) -> list[Any]:
        self.refreshed += 1
        return []

    def on_port(self, port: int) -> FakeLive | None:
        return self.live.get(port)

    def of_job(self, job_id: str) -> list[FakeLive]:
        return [x for x in self.live.values() if x.job_id == job_id]

    def idle_seconds(self, port: int) -> float | None:
        live = self.live.get(port)
        return None if live is None else self.clock() - live.last_active

    @contextlib.asynccontextmanager
    async def locked(self, ports: Iterable[int]) -> AsyncIterator[None]:
        yield

    async def stop_locked(self, port: int) -> int | None:
        if self.live.pop(port, None) is None:
            return None
        self.stopped.append(port)
        return 1000 + port


def setup(tmp_path: Path, grace: float = 600) -> tuple[Clock, Pool, FakeExports, Jobs]:
    clock = Clock()
    pool = Pool(StateFile(tmp_path / "leases.json", "leases", damaged=Damaged.REFUSE), port_min=10100, port_max=10109, host="127.0.0.1",
                lease_seconds=3600, max_lease_seconds=86400, clock=clock, port_free=lambda h, p: True)
    exports = FakeExports(clock)
    return clock, pool, exports, Jobs(pool, cast(Exports, exports), idle_grace_seconds=grace, clock=clock)


async def test_sweep_renews_keeps_and_reclaims(tmp_path: Path) -> None:
    clock, pool, exports, jobs = setup(tmp_path)
    for job in ("job-busy", "job-recent", "job-idle", "job-bare", "job-fresh"):
        await pool.allocate(job, 1, lease_seconds=60 if job != "job-fresh" else 7200)
    port = {lease.job_id: lease.port for lease in pool.leases()}
    clock.now += 120  # every lease but job-fresh's has expired
    exports.add(port["job-busy"], "job-busy", clients=2, idle=0)  # a backup writing right now
    exports.add(port["job-recent"], "job-recent", clients=0, idle=300)  # between two connections
    exports.add(port["job-idle"], "job-idle", clients=0, idle=1200)  # nobody for 20 minutes
    exports.add(port["job-fresh"], "job-fresh", clients=0, idle=5000)  # idle, but its lease runs
    out = await jobs.sweep_expired()
    assert out == {"renewed": [port["job-busy"]], "kept": [port["job-recent"]],
                   "reclaimed": sorted([port["job-idle"], port["job-bare"]])}
    assert exports.stopped == [port["job-idle"]]
    assert {lease.job_id for lease in pool.leases()} == {"job-busy", "job-recent", "job-fresh"}
    busy = pool.lease(port["job-busy"])
    assert busy is not None and busy.expires_at == clock.now + 3600
    # Later the "recent" one has stayed idle past the grace: reclaimed too.
    clock.now += 400
    exports.live[port["job-recent"]].clients = []
    out = await jobs.sweep_expired()
    assert out["reclaimed"] == [port["job-recent"]]


async def test_nothing_expired_costs_no_client_scan(tmp_path: Path) -> None:
    _, pool, exports, jobs = setup(tmp_path)
    await pool.allocate("job-1", 2)
    assert await jobs.sweep_expired() == {"renewed": [], "kept": [], "reclaimed": []}
    assert exports.refreshed == 0


async def test_allocation_reclaims_expired_idle_leases_when_short(tmp_path: Path) -> None:
    clock, pool, _, jobs = setup(tmp_path, grace=0)
    await pool.allocate("job-old", 10, lease_seconds=60)
    clock.now += 61
    got = await jobs.allocate("job-new", 4)
    assert len(got["allocated_ports"]) == 4 and got["expires_at"].endswith("Z")
    assert {lease.job_id for lease in pool.leases()} == {"job-new"}


async def test_release_stops_exports_first_and_checks_ownership(tmp_path: Path) -> None:
    _, pool, exports, jobs = setup(tmp_path)
    a = await pool.allocate("job-a", 2)
    b = await pool.allocate("job-b", 1)
    exports.add(a[0].port, "job-a")
    exports.add(b[0].port, "job-b")
    with pytest.raises(Conflict):
        await jobs.release("job-a", [a[0].port, b[0].port])
    assert exports.stopped == [] and len(pool.leases()) == 3  # refused before anything was stopped
    out = await jobs.release_job("job-a")
    assert (out["released_count"], out["stopped_exports"], exports.stopped) == (2, 1, [a[0].port])
    out = await jobs.release(ports=[b[0].port])
    assert (out["released_count"], out["stopped_pids"]) == (1, [1000 + b[0].port])


async def test_a_stop_that_fails_keeps_every_port_and_the_others_stop_anyway(tmp_path: Path) -> None:
    _, pool, exports, jobs = setup(tmp_path)
    leases = await pool.allocate("job-f", 3)
    for lease in leases:
        exports.add(lease.port, "job-f")
    stuck = leases[1].port
    real_stop = exports.stop_locked

    async def stop_locked(port: int) -> int | None:
        if port == stuck:
            raise Unavailable("export did not stop", f"pid {1000 + port} survived SIGKILL")
        return await real_stop(port)

    exports.stop_locked = stop_locked  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        await jobs.release_job("job-f")
    assert sorted(exports.stopped) == [leases[0].port, leases[2].port]
    assert len(pool.leases_of("job-f")) == 3  # no port freed: the caller retries
    exports.stop_locked = real_stop  # type: ignore[method-assign]
    out = await jobs.release_job("job-f")
    assert (out["released_count"], out["stopped_pids"]) == (3, [1000 + stuck])


@pytest.mark.timeout(60)
async def test_a_jobs_exports_flush_and_stop_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three real qemu-nbd exports of one job whose stops each take a while (the flush): release_job begins
    every stop before the first has ended, and frees the ports once their exports are gone."""
    repo = tmp_path / "repo"
    repo.mkdir()
    ports = free_range(3)
    pool = Pool(StateFile(tmp_path / "leases.json", "leases", damaged=Damaged.REFUSE), port_min=ports.start,
                port_max=ports.stop - 1, host="127.0.0.1", lease_seconds=3600, max_lease_seconds=86400)
    exports = Exports(pool, Roots([str(repo)]), records_file(tmp_path / "exports.json", Damaged.REFUSE),
                      bind_address="127.0.0.1", options=ExportOptions())
    jobs = Jobs(pool, exports, idle_grace_seconds=600, clock=time.time)
    leases = await pool.allocate("job-3", 3, ["d0", "d1", "d2"])
    for i, lease in enumerate(leases):
        sh("qemu-img", "create", "-q", "-f", "qcow2", repo / f"d{i}.qcow2", "4M")
        await exports.start(StartRequest(f"d{i}", lease.port, str(repo / f"d{i}.qcow2"), job_id="job-3"))
    pids = sorted(exports.pids())

    began: list[tuple[str, int]] = []  # (export, how many stops had ended when it began)
    ended: list[str] = []
    all_began = asyncio.Event()
    real_stop = QemuNbdExport.stop

    async def slow_stop(self: QemuNbdExport, *args: Any, **kwargs: Any) -> None:
        began.append((self.name, len(ended)))
        if len(began) == 3:
            all_began.set()
        # A flush that lasts until every stop has begun (or 5 s: then they ran one after another).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_began.wait(), 5)
        try:
            await real_stop(self, *args, **kwargs)
        finally:
            ended.append(self.name)

    monkeypatch.setattr(QemuNbdExport, "stop", slow_stop)
    try:
        out = await jobs.release_job("job-3")
    finally:
        monkeypatch.undo()
        for live in exports.of_job("job-3"):  # the test failed half-way: stop what is left
            await live.export.stop()
    assert sorted(began) == [("d0", 0), ("d1", 0), ("d2", 0)] and len(ended) == 3, (began, ended)
    assert sorted(out["stopped_pids"]) == pids and out["released_ports"] == [lease.port for lease in leases]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert len(exports) == 0 and pool.leases() == [] and json.loads(exports.store.path.read_text())["items"] == []
