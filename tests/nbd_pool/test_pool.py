"""The lease table alone: a fake clock, a fake port probe, a real state file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from nbd_pool.pool import Pool
from oma_common.statefile import Damaged, StateFile
from oma_common.errors import Conflict, Exhausted, Invalid, NotFound


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, *, busy: set[int] | None = None, size: int = 10, clock: Clock | None = None) -> Pool:
    held = busy if busy is not None else set()
    pool = Pool(StateFile(tmp_path / "leases.json", "leases", damaged=Damaged.REFUSE), port_min=10100, port_max=10100 + size - 1,
                host="127.0.0.1", lease_seconds=3600, max_lease_seconds=86400, clock=clock or Clock(),
                port_free=lambda host, port: port not in held)
    pool.load()
    return pool


async def test_allocation_is_all_or_none_and_persisted_before_it_returns(tmp_path: Path) -> None:
    pool = make(tmp_path)
    got = await pool.allocate("job-1", 3, ["a", "b", "c"])
    assert [(x.port, x.export_name) for x in got] == [(10100, "a"), (10101, "b"), (10102, "c")]
    saved = json.loads((tmp_path / "leases.json").read_text())
    assert saved["kind"] == "leases" and [i["port"] for i in saved["items"]] == [10100, 10101, 10102]
    with pytest.raises(Exhausted) as info:
        await pool.allocate("job-2", 8)
    assert info.value.extra["available"] == 7 and "only 7 of 10 are free" in info.value.details
    assert len(pool.leases()) == 3  # nothing was taken
    again = make(tmp_path)
    assert [(x.port, x.job_id) for x in again.leases()] == [(p, "job-1") for p in (10100, 10101, 10102)]


async def test_concurrent_requests_never_share_a_port(tmp_path: Path) -> None:
    pool = make(tmp_path, size=50)
    results = await asyncio.gather(*(pool.allocate(f"job-{i}", 2) for i in range(25)))
    ports = [x.port for r in results for x in r]
    assert sorted(ports) == list(range(10100, 10150))
    with pytest.raises(Exhausted):
        await pool.allocate("job-late", 1)


async def test_foreign_ports_are_skipped_and_reported(tmp_path: Path) -> None:
    pool = make(tmp_path, busy={10100, 10103})
    got = await pool.allocate("job-1", 8)
    assert 10100 not in {x.port for x in got} and 10103 not in {x.port for x in got}
    st = pool.status()
    assert (st["allocated"], st["available"], st["foreign_ports"]) == (8, 0, [10100, 10103])
    with pytest.raises(Exhausted) as info:
        await pool.allocate("job-2", 1)
    assert "2 held by other processes: 10100, 10103" in info.value.details


async def test_ports_are_handed_out_round_robin(tmp_path: Path) -> None:
    pool = make(tmp_path, size=4)
    first = await pool.allocate("job-1", 1)
    await pool.release(job_id="job-1")
    second = await pool.allocate("job-2", 1)
    assert second[0].port != first[0].port  # a just-freed port rests while others are free


async def test_release_by_job_by_ports_and_ownership(tmp_path: Path) -> None:
    pool = make(tmp_path)
    a = await pool.allocate("job-a", 2)
    b = await pool.allocate("job-b", 1)
    with pytest.raises(Conflict):
        await pool.release(job_id="job-a", ports=[b[0].port])
    assert len(pool.leases()) == 3
    assert [x.port for x in await pool.release(ports=[a[0].port, 10109])] == [a[0].port]
    assert [x.port for x in await pool.release(job_id="job-a")] == [a[1].port]
    assert await pool.release(job_id="job-a") == []
    with pytest.raises(Invalid):
        await pool.release()


async def test_expiry_renew_and_extend_with_a_fake_clock(tmp_path: Path) -> None:
    clock = Clock()
    pool = make(tmp_path, clock=clock)
    await pool.allocate("job-1", 2, lease_seconds=60)
    assert pool.expired() == []
    clock.now += 61
    assert [x.job_id for x in pool.expired()] == ["job-1", "job-1"]
    until = await pool.renew("job-1", 120)
    assert until == clock.now + 120 and pool.expired() == []
    clock.now += 121
    lease = await pool.extend(10100)
    assert lease is not None and lease.expires_at == clock.now + 3600
    assert [x.port for x in pool.expired()] == [10101]
    with pytest.raises(NotFound):
        await pool.renew("job-none")
    with pytest.raises(Invalid):
        await pool.renew("job-1", 86401)


async def test_validation(tmp_path: Path) -> None:
    pool = make(tmp_path)
    args: tuple[str, int, list[str] | None]
    for args in [("job 1", 1, None), ("job-1", 0, None), ("job-1", 11, None), ("job-1", 2, ["a"]),
                 ("job-1", 1, ["a/b"]), ("job-1", 1, [".a"])]:
        with pytest.raises(Invalid):
            await pool.allocate(*args)
    with pytest.raises(Invalid):
        pool.check_in_range(10110)
    pool.check_in_range(10109)


def test_an_unreadable_state_file_is_an_error_not_an_empty_pool(tmp_path: Path) -> None:
    (tmp_path / "leases.json").write_text('{"kind": "exports", "version": 1, "items": []}')
    with pytest.raises(Invalid, match="cannot read the state file"):
        make(tmp_path)
    (tmp_path / "leases.json").write_text('{"kind": "leases", "version": 99, "items": []}')
    with pytest.raises(Invalid, match="newer"):
        make(tmp_path)


async def test_a_failed_save_takes_nothing(tmp_path: Path) -> None:
    pool = make(tmp_path)
    (tmp_path / "leases.json").mkdir()  # the rename over a directory fails
    with pytest.raises(OSError):
        await pool.allocate("job-1", 2)
    assert pool.leases() == []
    assert not list(tmp_path.glob(".leases.json.tmp"))
