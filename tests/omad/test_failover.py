"""Test failover and its end as persistent step jobs, end to end: the real daemons, the CloudStack simulator
(volumes attached here are loop devices, others plain files) and a replication by the VMA simulator first.
omad is killed (SIGKILL, by its crash-file hook) right after each step is recorded, and restarted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.sim.cloudstack import CloudStackSim

from ..rig import Stack
from .test_cloudstack_api import ids
from .replication_rig import VM, Rig, digest
from .test_replication import SIZES, rig, write_random  # noqa: F401  (rig: the fixture)

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

TEST_STEPS = ["validate", "stop_exports", "snapshot", "deploy", "detach_here", "attach", "start"]
END_STEPS = ["stop_vm", "detach_from_vm", "destroy_vm", "revert", "delete_snapshots", "attach_here"]


@pytest.fixture
def stack_config(stack_config: Stack) -> Stack:
    stack_config.add_config("omad", "70-failover.toml", f'[failover]\ncrash_file = "{crash_file(stack_config)}"\n'
                                                        "[cloudstack]\npoll_interval_seconds = 0.05\n"
                                                        # a sync right after an omad restart on a busy host may
                                                        # sit idle longer than test_replication's 3 s
                                                        "[replication]\nidle_timeout_seconds = 20\n")
    return stack_config


def crash_file(stack: Stack) -> Path:
    return stack.state / "crash-at"


class Failover:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.cs: CloudStackSim = rig.cs
        self.vms_before: set[str] = set()
        self.volumes_before: set[str] = set()

    async def prepare(self, *, live: bool = False) -> None:
        status, body = await self.rig.api.post("/ossea/config", {"action": "create", "config": {
            "name": "primary", "api_url": self.cs.endpoint, "api_key": self.cs.api_key,
            "secret_key": self.cs.secret_key, **ids(self.cs),
            # big enough for the VM (2 CPUs, 2 GiB): readiness checks it
            "service_offering_id": next(o.id for o in self.cs.inv.service_offerings.values()
                                        if o.name == "Medium Instance")}})
        assert status in (200, 201) and body["success"], body
        test_net = next(n for n in self.cs.inv.networks.values() if n.name != "prod-net")
        prod_net = next(n for n in self.cs.inv.networks.values() if n.name == "prod-net")
        for (name,) in self.rig.stack.sql("SELECT DISTINCT network_name FROM vm_networks"):
            for net, is_test in ((test_net, True), (prod_net, False)) if live else ((test_net, True),):
                status, body = await self.rig.api.post("/network-mappings", {
                    "vm_id": VM, "source_network_name": name, "destination_network_id": net.id,
                    "destination_network_name": net.name, "is_test_network": is_test})
                assert status in (200, 201), body
        self.vms_before = self.live_vms()
        self.volumes_before = set(self.cs.inv.volumes)

    def live_vms(self) -> set[str]:
        return {v.id for v in self.cs.inv.vms.values() if v.state not in ("Destroyed", "Expunging")}

    async def wait(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.rig.api.get(f"/failover/{job_id}/status")
            if status == 200 and body["status"] not in ("running", "compensating"):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{job_id}: {status} {body}\n{self.rig.log_tail(lines=80)}")
            await asyncio.sleep(0.1)

    async def start_test(self) -> str:
        status, body = await self.rig.api.post("/failover/test", {"vm_name": VM})
        assert status == 202, body
        return str(body["job_id"])

    async def end_test(self, job_id: str) -> str:
        status, body = await self.rig.api.delete(f"/failover/test/{job_id}")
        assert status == 202, body
        return str(body["job_id"])

    async def crash_and_restart(self, step: str, start: Any) -> str:
        """Arm the crash file for `step`, start the job; omad dies at that step; start it again."""
        crash_file(self.rig.stack).write_text(step)
        job_id = await start()
        omad = self.rig.stack.daemons["omad"]
        deadline = time.monotonic() + 60
        while omad.running():
            assert time.monotonic() < deadline, f"omad did not die at {step}\n{self.rig.log_tail()}"
            await asyncio.sleep(0.05)
        assert not crash_file(self.rig.stack).exists()
        await asyncio.to_thread(self.rig.stack.start, "omad")
        return job_id

    def volumes(self) -> list[str]:
        return [str(v) for (v,) in self.rig.stack.sql(
            "SELECT volume_id FROM replication_volumes ORDER BY disk_id")]

    def destination(self) -> Any:
        found = [v for v in self.cs.inv.vms.values() if v.id not in self.vms_before
                 and v.state not in ("Destroyed", "Expunging")]
        assert len(found) == 1, found
        return found[0]

    def assert_failed_over(self) -> None:
        vm = self.destination()
        assert vm.state == "Running"
        vols = self.volumes()
        on_vm = {v.id: v for v in self.cs.inv.volumes_of(vm.id)}
        assert set(on_vm) == set(vols), on_vm  # the template's root volume is gone, ours are there
        assert on_vm[vols[0]].type == "ROOT" and on_vm[vols[0]].deviceid == 0
        assert on_vm[vols[1]].type == "DATADISK"
        for vol, src, size in zip(vols, self.rig.sources, SIZES):
            assert digest(self.cs.devices.volume_file(vol), size) == digest(src, size)
        assert set(self.cs.inv.volumes) == self.volumes_before  # nothing else left behind
        assert len(self.cs.inv.snapshots) == 2
        assert self.cs.attached_here() == []

    async def assert_back_here(self) -> None:
        """As before the failover: no VM, no snapshot, no other volume; ours attached here once, holding the
        replicated bytes; no export; the context ready."""
        assert self.live_vms() == self.vms_before
        assert set(self.cs.inv.volumes) == self.volumes_before
        assert self.cs.inv.snapshots == {}
        vols = self.volumes()
        assert sorted(self.cs.attached_here()) == sorted(vols)
        for vol, src, size in zip(vols, self.rig.sources, SIZES):
            assert digest(self.cs.devices.link(vol), size) == digest(src, size)
        assert sum(1 for d in self.cs.devices.loops if d in vols) == len(vols)
        await self.rig.assert_released()
        ctx = (await self.rig.context())["context"]
        assert ctx["current_status"] == "ready_for_failover" and ctx["current_job_id"] is None


@pytest.fixture
async def fo(rig: Rig) -> AsyncIterator[Failover]:
    await rig.sync()
    f = Failover(rig)
    await f.prepare()
    yield f


async def test_test_failover_boots_the_replica_and_end_test_restores_it(fo: Failover) -> None:
    job_id = await fo.start_test()
    status, again = await fo.rig.api.post("/failover/test", {"vm_name": VM})
    assert status == 409, again
    done = await fo.wait(job_id)
    assert done["status"] == "completed", (done, fo.rig.log_tail(lines=80))
    assert [s["name"] for s in done["steps"]] == TEST_STEPS
    assert all(s["status"] == "completed" and s["started_at"] and s["completed_at"] for s in done["steps"])
    assert done["destination_vm_id"] == fo.destination().id
    fo.assert_failed_over()
    ctx = (await fo.rig.context())["context"]
    assert ctx["current_status"] == "failed_over_test"
    status, listing = await fo.rig.api.get("/failover/jobs", params={"vm_id": VM})
    assert status == 200 and [j["job_id"] for j in listing["jobs"]] == [job_id]

    # The test VM writes into its disks; ending the test throws that away.
    write_random(fo.cs.devices.volume_file(fo.volumes()[0]), 0, 1024 * 1024, seed=7)
    end_id = await fo.end_test(job_id)
    end = await fo.wait(end_id)
    assert end["status"] == "completed", (end, fo.rig.log_tail(lines=80))
    assert [s["name"] for s in end["steps"]] == END_STEPS
    await fo.assert_back_here()
    status, parent = await fo.rig.api.get(f"/failover/{job_id}/status")
    assert parent["status"] == "ended"
    # The replicated state is exactly back: the next sync is an incremental.
    changed = 64 * 1024 * 16
    fo.rig.write(0, 2 * 1024 * 1024, changed, seed=5)
    again_sync = await fo.rig.sync()
    assert again_sync["replication_type"] == "incremental"
    fo.rig.assert_volumes_hold_sources(again_sync)

    # A test ended by the VM's name (the GUI's cleanup button) instead of the job's id.
    second = await fo.start_test()
    assert (await fo.wait(second))["status"] == "completed"
    status, body = await fo.rig.api.post(f"/failover/cleanup/{VM}")
    assert status == 202, body
    assert (await fo.wait(body["job_id"]))["status"] == "completed"
    await fo.assert_back_here()
    audit = fo.rig.stack.sql("SELECT actor, action, resource FROM audit_log WHERE action LIKE 'failover.%' "
                             "ORDER BY id")
    assert audit == [("admin", "failover.failover", f"job:{job_id}"), ("admin", "failover.end_test", f"job:{end_id}"),
                     ("admin", "failover.failover", f"job:{second}"),
                     ("admin", "failover.end_test", f"job:{body['job_id']}")], audit


async def test_a_cloudstack_error_fails_the_job_with_its_text_and_compensates(fo: Failover) -> None:
    fo.cs.faults.fail["startvm"] = "Insufficient capacity on host sim-host-1"  # the job of startVirtualMachine
    try:
        done = await fo.wait(await fo.start_test())
    finally:
        fo.cs.faults.fail.clear()
    assert done["status"] == "compensated", done
    assert "Insufficient capacity on host sim-host-1" in done["error_message"]
    start = done["steps"][-1]
    assert start["name"] == "start" and "Insufficient capacity" in start["error_message"]
    assert all(s["status"] == "compensated" for s in done["steps"]), done["steps"]
    ctx = (await fo.rig.context())["context"]
    assert ctx["failed_jobs"] == 1 and ctx["last_operation_summary"]["operation"] == "failover"
    await fo.assert_back_here()


async def test_omad_killed_at_every_step_boundary_finishes_or_compensates(fo: Failover) -> None:
    """Each step of the test failover and of its end: omad dies right after the step is recorded, and (`ran:`)
    after it ran but before its outcome is recorded; the next omad resumes (or, for validate, compensates)."""
    end_points = [p for s in END_STEPS for p in (s, f"ran:{s}")]
    points = [p for s in TEST_STEPS for p in (s, f"ran:{s}")]
    for i, point in enumerate(points):
        job_id = await fo.crash_and_restart(point, fo.start_test)
        done = await fo.wait(job_id)
        log = fo.rig.log_tail(lines=100)
        if point in ("validate", "ran:validate"):  # COMPENSATE on a crash: nothing was made
            assert done["status"] == "compensated", (done, log)
            await fo.assert_back_here()
            continue
        assert done["status"] == "completed", (point, done, log)
        fo.assert_failed_over()
        end_point = end_points[i % len(end_points)]
        end_id = await fo.crash_and_restart(end_point, lambda: fo.end_test(job_id))
        end = await fo.wait(end_id)
        assert end["status"] == "completed", (end_point, end, fo.rig.log_tail(lines=100))
        await fo.assert_back_here()


async def test_omad_killed_while_compensating_finishes_the_undo(fo: Failover) -> None:
    fo.cs.faults.fail["startvm"] = "Insufficient capacity on host sim-host-1"
    try:
        job_id = await fo.crash_and_restart("undo:detach_here", fo.start_test)
        done = await fo.wait(job_id)
    finally:
        fo.cs.faults.fail.clear()
    assert done["status"] == "compensated" and "Insufficient capacity" in done["error_message"], done
    await fo.assert_back_here()


async def test_a_failed_undo_leaves_cleanup_required_and_cleanup_failed_clears_it(fo: Failover) -> None:
    fo.cs.faults.fail["startvm"] = "Insufficient capacity on host sim-host-1"
    fo.cs.faults.fail["destroyvm"] = "Unable to destroy: host unreachable"  # the job of destroyVirtualMachine
    try:
        done = await fo.wait(await fo.start_test())
    finally:
        fo.cs.faults.fail.clear()
    assert done["status"] == "failed" and "undoing deploy failed" in done["error_message"], done
    assert "host unreachable" in done["error_message"]
    ctx = (await fo.rig.context())["context"]
    assert ctx["current_status"] == "cleanup_required"
    assert fo.destination().id and len(fo.cs.inv.snapshots) == 2  # the VM and the snapshots are left
    status, decision = await fo.rig.api.get(f"/failover/rollback/decision/test/{VM}")
    assert decision["failed_job_id"] == done["job_id"]

    status, body = await fo.rig.api.post(f"/failover/{VM}/cleanup-failed")
    assert status == 202, body
    assert fo.rig.stack.sql("SELECT actor, resource FROM audit_log WHERE action = 'failover.rollback'") == \
        [("admin", f"job:{body['job_id']}")]
    cleaned = await fo.wait(body["job_id"])
    assert cleaned["status"] == "completed", (cleaned, fo.rig.log_tail(lines=80))
    assert [s["name"] for s in cleaned["steps"]] == ["undo_start", "undo_attach", "undo_detach_here", "undo_deploy",
                                                     "undo_snapshot"]
    await fo.assert_back_here()
    status, failed = await fo.rig.api.get(f"/failover/{done['job_id']}/status")
    assert failed["status"] == "ended"
    assert (await fo.rig.api.post(f"/failover/{VM}/cleanup-failed"))[0] == 404
