"""Replication end to end: the real daemons (omad, nbd-pool, volume-agent), the CloudStack simulator (volumes
attached here are real loop devices) and the VMA simulator writing with real NBD clients into nbd-pool's exports
of those devices."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cs import AIOCloudStack

from oma_common.rpc import AgentClient
from tests.sim.cloudstack import CloudStackSim
from tests.sim.vma import MiB
from tests.sim.vma import faults as F

from ..rig import Stack
from .replication_rig import VM, Rig, open_rig

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

SIZES = [32 * MiB, 16 * MiB]
IDLE = 3.0


def write_random(path: Path, offset: int, length: int, seed: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(length))


def make_sources(tmp: Path, sizes: list[int]) -> list[Path]:
    """Raw disk files of these sizes, each half pseudo-random from 1 MiB on."""
    sources = []
    for index, size in enumerate(sizes):
        path = tmp / f"disk{index}.raw"
        with open(path, "wb") as f:
            f.truncate(size)
        write_random(path, MiB, size // 2, seed=index)
        sources.append(path)
    return sources


@contextlib.asynccontextmanager
async def open_twins(stack: Stack, cs: CloudStackSim, tmp: Path, twin: str) -> AsyncIterator[Rig]:
    """The rig's VM (disks of SIZES) and another VM, `twin`, whose one disk of SIZES[1] is `tmp`/disk2.raw."""
    paths = make_sources(tmp, [*SIZES, SIZES[1]])
    async with open_rig(stack, cs, tmp, paths[:2], idle_timeout=IDLE, others={twin: paths[2:]}) as r:
        yield r


@pytest.fixture
async def rig(cloudstack_sim: CloudStackSim, stack_config: Stack, tmp_path: Path) -> AsyncIterator[Rig]:
    sources = make_sources(tmp_path, SIZES)
    async with open_rig(stack_config, cloudstack_sim, tmp_path, sources, idle_timeout=IDLE) as r:
        yield r


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
    rig.write(0, 4 * MiB, changed, seed=99)
    second = await rig.sync()
    assert second["replication_type"] == "incremental"
    rig.assert_volumes_hold_sources(second)
    vma = rig.state.job(second["job_id"])
    assert [d.sync_type for d in vma.disks] == ["incremental", "incremental"]
    # The simulator's counters: only the changed extents' bytes went over NBD (as data, none as zeroes).
    assert [d.blocks_written for d in vma.disks] == [changed // (64 * 1024), 0]
    assert [d.zero_blocks_written for d in vma.disks] == [0, 0]
    assert [d.bytes_transferred for d in vma.disks] == [changed, 0]
    assert [d["bytes_transferred"] for d in second["disks"]] == [changed, 0]
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

    status, listed = await rig.api.get("/replications", params={"status": "completed"})
    assert status == 200 and [r["job_id"] for r in listed["replications"]] == [second["job_id"], first["job_id"]]
    status, changed = await rig.api.put(f"/replications/{second['job_id']}", {"target_network": "net-test"})
    assert status == 200 and changed["configuration"]["target_network"] == "net-test"
    status, removed = await rig.api.delete(f"/replications/{first['job_id']}")
    assert status == 200 and removed["deleted"], removed
    assert (await rig.api.get(f"/replications/{first['job_id']}"))[0] == 404
    audit = rig.stack.sql("SELECT actor, action, resource FROM audit_log WHERE action LIKE 'replication.%' "
                          "ORDER BY id")
    assert audit == [("admin", "replication.start", f"job:{first['job_id']}"),
                     ("admin", "replication.start", f"job:{second['job_id']}"),
                     ("admin", "replication.update", f"job:{second['job_id']}"),
                     ("admin", "replication.delete", f"job:{first['job_id']}")], audit


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

    # A volume deleted behind our back (detached and deleted in CloudStack directly, while volume-agent still
    # records it attached here) is created anew and its disk starts over.
    vol0 = first["disks"][0]["volume_id"]
    cs = AIOCloudStack(rig.cs.endpoint, rig.cs.api_key, rig.cs.secret_key, poll_interval=0.05)
    await cs.detachVolume(id=vol0, fetch_result=True)
    await cs.deleteVolume(id=vol0)
    again = await rig.sync()
    assert again["disks"][0]["volume_id"] != vol0
    vma = rig.state.job(again["job_id"])
    assert [d.sync_type for d in vma.disks] == ["full", "full"]
    rig.assert_volumes_hold_sources(again)


async def test_a_volume_reverted_outside_the_appliance_copies_in_full(rig: Rig) -> None:
    """Reverted in CloudStack to a snapshot older than the last sync, a volume holds an older stamp at its end
    than the one that sync wrote: its disk is offered "" and copied in full, the other disk continues. Without
    this the incremental would copy nothing and leave the volume at the old snapshot's content."""
    first = await rig.sync()
    vol0 = first["disks"][0]["volume_id"]
    cs = AIOCloudStack(rig.cs.endpoint, rig.cs.api_key, rig.cs.secret_key, poll_interval=0.05)
    snap = (await cs.createSnapshot(volumeid=vol0, fetch_result=True))["snapshot"]
    rig.write(0, 2 * MiB, 4 * MiB, seed=5)
    rig.write(1, 2 * MiB, MiB, seed=6)
    second = await rig.sync()
    assert second["replication_type"] == "incremental"
    rig.assert_volumes_hold_sources(second)

    # Outside the appliance, in CloudStack directly: the volume is detached (its device goes) and reverted to
    # the older snapshot. volume-agent still records it attached here until it is asked about it.
    await cs.detachVolume(id=vol0, fetch_result=True)
    await cs.revertSnapshot(id=snap["id"], fetch_result=True)
    rig.write(1, 8 * MiB, MiB, seed=7)
    third = await rig.sync()  # finds it detached and attaches it here again
    assert [d["volume_id"] for d in third["disks"]] == [d["volume_id"] for d in second["disks"]]
    assert rig.cs.commands.calls.count("attachVolume") == 3
    assert [d["base_change_id"] for d in third["disks"]] == ["", second["disks"][1]["change_id"]]
    offered = [c.response["change_id"] for c in rig.state.calls_to("/replications/changeid", "GET")[-2:]]
    assert offered == ["", second["disks"][1]["change_id"]]
    vma = rig.state.job(third["job_id"])
    assert [d.sync_type for d in vma.disks] == ["full", "incremental"]
    assert vma.disks[1].blocks_written == MiB // (64 * 1024)
    rig.assert_volumes_hold_sources(third)
    # A revert to a snapshot taken after the last sync loses nothing: the disk continues.
    fourth_base = third["disks"][0]["change_id"]
    snap = (await cs.createSnapshot(volumeid=vol0, fetch_result=True))["snapshot"]
    agent = AgentClient("volume-agent", rig.stack.run_dir / "volume-agent.sock", timeout=60)
    try:
        await agent.call("POST", f"/volumes/{vol0}/revert", json={"snapshot_id": snap["id"]})
    finally:
        await agent.close()
    rig.write(0, 20 * MiB, MiB, seed=8)
    fourth = await rig.sync()
    assert [d["base_change_id"] for d in fourth["disks"]][0] == fourth_base
    assert [d.sync_type for d in rig.state.job(fourth["job_id"]).disks] == ["incremental", "incremental"]
    rig.assert_volumes_hold_sources(fourth)


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
    # The VMA's pushed telemetry is taken without a token from loopback, as its tunnel arrives.
    telemetry = {"job_id": job_id, "job_type": "replication", "status": "running", "current_phase": "transferring",
                 "bytes_transferred": 1, "total_bytes": 2, "progress_percent": 50.0}
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.post(f"{rig.stack.url}/api/v1/telemetry/replication/{job_id}", json=telemetry) as r:
            assert r.status == 200 and (await r.json())["status"] == "recorded"
        async with anonymous.post(f"{rig.stack.url}/api/v1/telemetry/replication/job-nope", json=telemetry) as r:
            assert r.status == 404
    # Cancelled: exports stop, ports are freed, the context counts a failed job.
    status, body = await rig.api.delete(f"/replications/{job_id}")
    assert status == 200 and body["status"] == "cancelled"
    assert rig.stack.sql("SELECT actor, resource FROM audit_log WHERE action = 'replication.cancel'") == \
        [("admin", f"job:{job_id}")]
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


async def test_a_source_vm_listing_a_disk_twice_is_refused(api: Any) -> None:
    vm = {"id": "4207-dup", "name": "dup", "path": "/DC1/vm/dup",
          "disks": [{"id": "disk-2000", "capacity_bytes": MiB}, {"id": "disk-2000", "capacity_bytes": MiB}]}
    status, body = await api.post("/replications", {"source_vm": vm, "ossea_config_id": 1,
                                                    "start_replication": False})
    assert status == 400 and "twice" in body["details"], body
    status, body = await api.post("/replications", {"source_vm": {**vm, "disks": vm["disks"][:1]},
                                                    "ossea_config_id": 1, "start_replication": False})
    assert status == 201 and body["current_status"] == "discovered", body
    status, body = await api.post("/replications", {"source_vm": {**vm, "disks": vm["disks"][:1]},
                                                    "ossea_config_id": 1, "start_replication": False})
    assert status == 409, body
