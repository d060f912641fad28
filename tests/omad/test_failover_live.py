"""Live failover and its rollback: the source powered off through the VMA simulator before a final sync, whose
changes are in the volumes the CloudStack VM boots from; rollback gives everything back."""

from __future__ import annotations

import pytest

from .test_failover import Failover, stack_config  # noqa: F401  (fixture)
from .replication_rig import VM, Rig, digest
from .test_replication import SIZES, rig  # noqa: F401  (rig: the fixture)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

LIVE_STEPS = ["validate", "power_off", "final_sync", "stop_exports", "deploy", "detach_here", "attach", "start"]


async def start_live(rig: Rig) -> str:
    status, body = await rig.api.post("/failover/live", {"vm_name": VM})
    assert status == 202, body
    return str(body["job_id"])


async def roll_back(rig: Rig) -> str:
    """A live rollback that powers the source on again; its job id."""
    status, body = await rig.api.post("/failover/rollback", {"vm_name": VM, "failover_type": "live",
                                                             "power_on_source": True})
    assert status == 202, body
    return str(body["job_id"])


async def test_live_failover_powers_off_syncs_last_changes_and_rolls_back(rig: Rig) -> None:
    await rig.sync()
    fo = Failover(rig)
    await fo.prepare(live=True)
    vm = next(v for v in rig.state.inventory.vms if v.name == VM)
    assert vm.power_state == "poweredOn"
    rig.write(1, 1024 * 1024, 64 * 1024 * 8, seed=42)  # changed after the last sync

    status, body = await rig.api.post("/failover/unified", {"vm_name": VM, "failover_type": "live"})
    assert status == 202, body
    done = await fo.wait(body["job_id"], timeout=180)
    assert done["status"] == "completed", (done, rig.log_tail(lines=80))
    steps = {s["name"]: s for s in done["steps"]}
    assert [s["name"] for s in done["steps"]] == LIVE_STEPS
    assert steps["power_off"]["completed_at"] <= steps["final_sync"]["started_at"]
    assert vm.power_state == "poweredOff"
    final = steps["final_sync"]["produced"]
    assert final["final_sync_type"] == "incremental"
    vma_job = rig.state.job(final["final_sync_job_id"])
    assert [d.sync_type for d in vma_job.disks] == ["incremental", "incremental"]
    # The CloudStack VM runs from the volumes, which hold the source as it was at power-off.
    dest = fo.destination()
    assert dest.state == "Running" and dest.name.endswith(done["job_id"][-6:].lower())
    assert {n.networkid for n in dest.nics} == {n.id for n in fo.cs.inv.networks.values() if n.name == "prod-net"}
    for vol, src, size in zip(fo.volumes(), rig.sources, SIZES):
        assert digest(fo.cs.devices.volume_file(vol), size) == digest(src, size)
    assert fo.cs.inv.snapshots == {}  # no snapshot kept
    ctx = (await rig.context())["context"]
    assert ctx["current_status"] == "failed_over_live"

    status, decision = await rig.api.get(f"/failover/rollback/decision/live/{VM}")
    assert status == 200 and decision["can_rollback"] and decision["failover_job_id"] == done["job_id"]
    back = await fo.wait(await roll_back(rig))
    assert back["status"] == "completed", (back, rig.log_tail(lines=80))
    await fo.assert_back_here()
    assert vm.power_state == "poweredOn"
    status, parent = await rig.api.get(f"/failover/{done['job_id']}/status")
    assert parent["status"] == "ended"
    audit = rig.stack.sql("SELECT actor, action, resource FROM audit_log WHERE action LIKE 'failover.%' ORDER BY id")
    assert audit == [("admin", "failover.failover", f"job:{done['job_id']}"),
                     ("admin", "failover.rollback", f"job:{back['job_id']}")], audit


async def test_omad_killed_during_live_failover_and_rollback_finishes_them(rig: Rig) -> None:
    await rig.sync()
    fo = Failover(rig)
    await fo.prepare(live=True)
    vm = next(v for v in rig.state.inventory.vms if v.name == VM)
    rollback_steps = ["undo_start", "undo_attach", "undo_detach_here", "undo_deploy", "undo_power_off"]
    points = ["power_off", "ran:power_off", "final_sync", "ran:final_sync", "ran:deploy", "ran:start"]
    started = []
    for i, point in enumerate(points):
        rig.write(0, 4 * 1024 * 1024, 64 * 1024 * 4, seed=100 + i)
        job_id = await fo.crash_and_restart(point, lambda: start_live(rig))
        started.append(job_id)
        done = await fo.wait(job_id, timeout=180)
        assert done["status"] == "completed", (point, done["error_message"], done, rig.log_tail(lines=100))
        assert vm.power_state == "poweredOff"
        for vol, src, size in zip(fo.volumes(), rig.sources, SIZES):
            assert digest(fo.cs.devices.volume_file(vol), size) == digest(src, size), point
        assert fo.destination().state == "Running"
        back = await fo.wait(await fo.crash_and_restart(rollback_steps[i % len(rollback_steps)],
                                                        lambda: roll_back(rig)))
        assert back["status"] == "completed", (point, back, rig.log_tail(lines=100))
        await fo.assert_back_here()
        assert vm.power_state == "poweredOn"
    audit = rig.stack.sql("SELECT resource FROM audit_log WHERE action = 'failover.failover' ORDER BY id")
    assert [r for (r,) in audit] == [f"job:{j}" for j in started]


async def test_omad_killed_before_the_vma_got_the_final_sync_syncs_again_and_leaks_nothing(rig: Rig) -> None:
    """omad dies after recording the final sync, leasing its ports and starting its exports, but before asking the
    VMA: after the restart that sync (which the VMA never heard of) is failed, its exports and leases released, and
    a new final sync copies the last changes; the failover completes and nothing of the cut one is left."""
    await rig.sync()
    fo = Failover(rig)
    await fo.prepare(live=True)
    vm = next(v for v in rig.state.inventory.vms if v.name == VM)
    rig.write(1, 2 * 1024 * 1024, 64 * 1024 * 4, seed=7)  # changed after the last sync
    job_id = await fo.crash_and_restart("replication:vma", lambda: start_live(rig))
    done = await fo.wait(job_id, timeout=180)
    assert done["status"] == "completed", (done["error_message"], done, rig.log_tail(lines=100))
    assert vm.power_state == "poweredOff"
    final = {s["name"]: s for s in done["steps"]}["final_sync"]["produced"]
    assert final["final_sync_type"] == "incremental"
    cut = [(j, m) for j, s, m in rig.stack.sql("SELECT job_id, status, error_message FROM replication_jobs")
           if s == "failed"]
    assert len(cut) == 1 and "before the VMA took" in str(cut[0][1]), cut
    assert cut[0][0] not in rig.state.jobs and final["final_sync_job_id"] in rig.state.jobs
    assert final["final_sync_job_id"] != cut[0][0]
    for vol, src, size in zip(fo.volumes(), rig.sources, SIZES):
        assert digest(fo.cs.devices.volume_file(vol), size) == digest(src, size)
    await rig.assert_released()  # the cut sync's exports and leases too (stop_exports ran for the new one)

    back = await fo.wait(await roll_back(rig))
    assert back["status"] == "completed", (back, rig.log_tail(lines=80))
    await fo.assert_back_here()
