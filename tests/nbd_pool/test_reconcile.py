"""nbd-pool dying or restarting under load: exports and attachments survive and are adopted, leftovers are
released, and every lease is accounted for after READY."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbd_pool.adapters.fuse_loop import FuseLoopBackend
from nbd_pool.adapters.orphans import list_orphans
from oma_common import blockdev, mountinfo

from ..lib.diskimages import gpt_two_ext4, to_qcow2
from .helpers import MIB, Pool, ash, make_source, sh, url

pytestmark = [pytest.mark.timeout(120)]


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def write_pattern(port: int, name: str, pattern: int) -> None:
    await ash("qemu-io", "-f", "raw", "-c", f"write -P {pattern:#04x} 0 {MIB}", url(port, name))


async def check_pattern(port: int, name: str, pattern: int) -> None:
    res = await ash("qemu-io", "-f", "raw", "-r", "-c", f"read -P {pattern:#04x} 0 {MIB}", url(port, name))
    assert b"Pattern verification failed" not in res.stdout, res.stdout


async def exports_of(pool: Pool) -> dict[str, dict[str, Any]]:
    return {p["export_name"]: p for p in (await pool.agent.ok("GET", "/exports"))["processes"]}


@pytest.mark.root
async def test_kill_9_with_three_exports_and_an_attachment_then_restart(pool: Pool) -> None:
    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-k", "count": 3,
                                                            "export_names": ["k0", "k1", "k2"]})
    ports = [p["port"] for p in alloc["allocated_ports"]]
    started = {}
    for i, port in enumerate(ports):
        started[f"k{i}"] = await pool.export("job-k", pool.image(f"k{i}.qcow2", "16M"), f"k{i}", port=port)
        await write_pattern(port, f"k{i}", 0x10 + i)
    raw = gpt_two_ext4(pool.stack.state / "fs.raw", {"a.txt": b"A\n"}, {"b.txt": b"B\n"}, size=128 * MIB)
    image = to_qcow2(raw.path, pool.repo / "fs.qcow2")
    att = await pool.agent.ok("POST", "/attachments", {"image": str(image), "owner": "restore-mounter:mnt-k"})

    # Leftovers a crash could also leave: a qemu-nbd on a pool port that was never recorded (killed between
    # spawn and record), and a half-made attachment under the work root.
    spare = next(p for p in pool.ports if p not in ports)
    stray_nbd = await asyncio.create_subprocess_exec(
        "qemu-nbd", "--persistent", "--format=qcow2", "--export-name=stray", "--bind=127.0.0.1", f"--port={spare}",
        "--shared=10", "--", str(pool.image("stray.qcow2", "4M")), stderr=asyncio.subprocess.DEVNULL)
    try:
        stray_att = (await FuseLoopBackend().attach(image, pool.work_root / "att-stray", resource_id="stray")).forget()

        pool.kill9()
        for e in started.values():
            assert alive(e["pid"])  # the exports did not die with the daemon
        await asyncio.to_thread(pool.start)  # returns after READY

        # Adopted: the same processes, still leased to their job.
        listed = await exports_of(pool)
        assert {n: e["pid"] for n, e in listed.items()} == {n: e["pid"] for n, e in started.items()}
        status = await pool.agent.ok("GET", "/ports/status")
        assert sorted((a["port"], a["job_id"]) for a in status["allocations"]) == [(p, "job-k") for p in ports]
        attachments = (await pool.agent.ok("GET", "/attachments"))["attachments"]
        assert [(a["attachment_id"], a["device"], a["status"]) for a in attachments] == [
            (att["attachment_id"], att["device"], "attached")]
        assert all(Path(p["device"]).is_block_device() for p in att["partitions"])
        health = await pool.agent.ok("GET", "/health")
        assert (health["exports"], health["attachments"], health["allocated"]) == (3, 1, 3)

        # Released: the stray qemu-nbd, the stray FUSE export, loop device and qemu-storage-daemon.
        assert await asyncio.wait_for(stray_nbd.wait(), 10) is not None
        assert not alive(stray_att.process.pid)
        assert blockdev.backing_file(stray_att.device) != stray_att.fuse_file
        assert not mountinfo.is_mounted(Path(stray_att.fuse_file))
        assert sorted(d.name for d in pool.work_root.iterdir()) == [att["attachment_id"]]
        keep = {e["pid"] for e in listed.values()} | {attachments[0]["pid"]}
        left = await list_orphans(pool.work_root, ports=pool.ports, keep_pids=keep, keep_devices={att["device"]},
                                  keep_mounts={Path(pool.work_root.resolve() / att["attachment_id"] / "disk.raw")})
        assert not left, left
    finally:
        if stray_nbd.returncode is None:  # the test failed before the restart could release it
            stray_nbd.kill()
            await stray_nbd.wait()

    # The adopted exports still serve their data, and take new writes.
    for i, port in enumerate(ports):
        await check_pattern(port, f"k{i}", 0x10 + i)
    src = make_source(pool.stack.state / "after.raw", 16 * MIB)
    await ash("nbdcopy", src, url(ports[0], "k0"))
    await ash("qemu-img", "compare", "-f", "raw", "-F", "raw", src, url(ports[0], "k0"))
    assert sh("debugfs", "-R", "cat /b.txt", att["partitions"][1]["device"]).stdout == b"B\n"

    # Adopted children are stopped like our own (through their pidfd) when the job is released.
    rel = await pool.agent.ok("POST", "/jobs/job-k/release")
    assert rel["stopped_exports"] == 3 and sorted(rel["stopped_pids"]) == sorted(e["pid"] for e in started.values())
    assert not any(alive(e["pid"]) for e in started.values())
    await pool.agent.ok("DELETE", f"/attachments/{att['attachment_id']}")


async def test_sigterm_leaves_exports_running_and_the_next_start_adopts_them(pool: Pool) -> None:
    e = await pool.export("job-t", pool.image("t.qcow2", "8M"), "t")
    await write_pattern(e["port"], "t", 0x42)
    assert pool.stop() == 0
    assert alive(e["pid"])
    await check_pattern(e["port"], "t", 0x42)  # served while nbd-pool is down
    await asyncio.to_thread(pool.start)
    assert (await exports_of(pool))["t"]["pid"] == e["pid"]
    await check_pattern(e["port"], "t", 0x42)


async def test_records_of_dead_or_unleased_children_are_dropped_at_start(pool: Pool) -> None:
    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-d", "count": 2})
    p0, p1 = (p["port"] for p in alloc["allocated_ports"])
    dead = await pool.export("job-d", pool.image("d0.qcow2", "4M"), "d0", port=p0)
    kept = await pool.export("job-d", pool.image("d1.qcow2", "4M"), "d1", port=p1)
    pool.kill9()
    os.kill(dead["pid"], signal.SIGKILL)  # dies while nbd-pool is down
    await asyncio.to_thread(pool.start)
    assert list(await exports_of(pool)) == ["d1"]
    # Its port stays with the job until the job releases it.
    assert sorted(a["port"] for a in (await pool.agent.ok("GET", "/ports/status"))["allocations"]) == sorted([p0, p1])
    assert alive(kept["pid"])


def exports_named(prefix: str) -> set[int]:
    """Pids of the launchers and qemu-nbd processes of exports whose names start with `prefix`."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(arg.startswith(f"--export-name={prefix}") for arg in proc.info["cmdline"] or []):
            found.add(proc.info["pid"])
    return found


@pytest.mark.root
async def test_kill_9_during_concurrent_starts_of_a_jobs_exports_then_restart(pool: Pool) -> None:
    """nbd-pool dies while four exports of one job start at once and share their saves: once one is recorded.
    After the restart every recorded export still running is adopted, every qemu-nbd spawned but not yet
    recorded is ended, the job keeps its four ports, and it can start the missing exports and release."""
    names = [f"crash{i}" for i in range(4)]
    alloc = await pool.agent.ok("POST", "/ports/allocate", {"job_id": "job-c", "count": 4, "export_names": names})
    ports = [p["port"] for p in alloc["allocated_ports"]]
    images = [pool.image(f"{name}.qcow2", "4M") for name in names]
    records = pool.stack.state / "nbd-pool" / "exports.json"

    def recorded() -> dict[str, int]:
        try:
            items = json.loads(records.read_text())["items"]
        except FileNotFoundError:
            return {}
        return {e["record"]["name"]: e["record"]["process"]["pid"] for e in items}

    starts = [asyncio.create_task(pool.agent.request("POST", "/exports", {
        "export_name": name, "port": port, "path": str(image), "job_id": "job-c"}))
        for name, port, image in zip(names, ports, images)]
    for _ in range(2000):
        if recorded():
            break
        await asyncio.sleep(0.005)
    pool.kill9()
    await asyncio.gather(*starts, return_exceptions=True)  # cut off, or answered just before the kill
    on_disk = recorded()
    spawned = exports_named("crash")
    assert on_disk and set(on_disk.values()) <= spawned

    await asyncio.to_thread(pool.start)
    listed = await exports_of(pool)
    assert {n: e["pid"] for n, e in listed.items()} == on_disk  # every recorded one adopted, nothing else
    assert exports_named("crash") == set(on_disk.values())  # the unrecorded ones were ended
    status = await pool.agent.ok("GET", "/ports/status")
    assert sorted((a["port"], a["job_id"]) for a in status["allocations"]) == [(p, "job-c") for p in sorted(ports)]

    # The job carries on: it starts what is missing, then releases everything.
    for name, port, image in zip(names, ports, images):
        if name not in listed:
            await pool.export("job-c", image, name, port=port)
    rel = await pool.agent.ok("POST", "/jobs/job-c/release")
    assert (rel["stopped_exports"], rel["released_count"]) == (4, 4)
    assert not exports_named("crash")


async def test_an_unreadable_state_file_stops_the_start_and_touches_nothing(pool: Pool) -> None:
    e = await pool.export("job-u", pool.image("u.qcow2", "4M"), "u")
    pool.kill9()
    leases = pool.stack.state / "nbd-pool" / "leases.json"
    good = leases.read_text()
    leases.write_text("{not json")
    with pytest.raises(Exception, match="exited with 1"):
        await asyncio.to_thread(pool.start)
    assert "cannot read the state file" in pool.daemon.log_tail(50)
    assert alive(e["pid"])  # the running export was left alone
    leases.write_text(good)
    await asyncio.to_thread(pool.start)
    assert (await exports_of(pool))["u"]["pid"] == e["pid"]


@pytest.mark.root
async def test_attachment_survives_a_graceful_restart(pool: Pool) -> None:
    raw = gpt_two_ext4(pool.stack.state / "g.raw", {"a.txt": b"A\n"}, {"b.txt": b"B\n"}, size=128 * MIB)
    image = to_qcow2(raw.path, pool.repo / "g.qcow2")
    att = await pool.agent.ok("POST", "/attachments", {"image": str(image), "owner": "o"})
    assert pool.stop() == 0
    assert alive(att["pid"]) and Path(att["partitions"][0]["device"]).is_block_device()
    await asyncio.to_thread(pool.start)
    listed = (await pool.agent.ok("GET", "/attachments"))["attachments"]
    assert [(a["attachment_id"], a["device"], a["pid"]) for a in listed] == [
        (att["attachment_id"], att["device"], att["pid"])]
    assert sh("debugfs", "-R", "cat /a.txt", att["partitions"][0]["device"]).stdout == b"A\n"


@pytest.mark.root
async def test_the_periodic_check_releases_leftovers_under_the_work_root(make_pool: Any) -> None:
    pool = await make_pool("reconcile_interval_seconds = 0.2\n")
    raw = gpt_two_ext4(pool.stack.state / "p.raw", {"a.txt": b"A\n"}, {"b.txt": b"B\n"}, size=128 * MIB)
    image = to_qcow2(raw.path, pool.repo / "p.qcow2")
    ours = await pool.agent.ok("POST", "/attachments", {"image": str(image), "owner": "o"})
    # Frozen while the stray is made, so that a pass cannot catch it half-attached (under load an attach
    # takes longer than the interval); thawed, its next pass must find it.
    daemon_pid = pool.stack.daemons["nbd-pool"].pid
    os.kill(daemon_pid, signal.SIGSTOP)
    try:
        stray = (await FuseLoopBackend().attach(image, pool.work_root / "att-late", resource_id="late")).forget()
    finally:
        os.kill(daemon_pid, signal.SIGCONT)
    for _ in range(100):
        if not alive(stray.process.pid) and not (pool.work_root / "att-late").exists():
            break
        await asyncio.sleep(0.05)
    assert not alive(stray.process.pid)
    assert blockdev.backing_file(stray.device) != stray.fuse_file
    assert not (pool.work_root / "att-late").exists()
    # Ours was left alone.
    assert [a["attachment_id"] for a in (await pool.agent.ok("GET", "/attachments"))["attachments"]] == [
        ours["attachment_id"]]
    assert alive(ours["pid"]) and blockdev.backing_file(ours["device"]) is not None
