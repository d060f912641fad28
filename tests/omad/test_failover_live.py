"""Live failover and its rollback: the source powered off through the VMA simulator before a final sync, whose
changes are in the volumes the CloudStack VM boots from; rollback gives everything back."""

from __future__ import annotations

import pytest

from .test_failover import Failover, stack_config  # noqa: F401  (fixture)
from .replication_rig import VM, Rig, digest
from .test_replication import SIZES, rig  # noqa: F401  (rig: the fixture)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

LIVE_STEPS = ["validate", "power_off", "final_sync", "stop_exports", "deploy", "detach_here", "attach", "start"]


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
    status, body = await rig.api.post("/failover/rollback", {"vm_name": VM, "failover_type": "live",
                                                             "power_on_source": True})
    assert status == 202, body
    back = await fo.wait(body["job_id"])
    assert back["status"] == "completed", (back, rig.log_tail(lines=80))
    await fo.assert_back_here()
    assert vm.power_state == "poweredOn"
    status, parent = await rig.api.get(f"/failover/{done['job_id']}/status")
    assert parent["status"] == "ended"


async def test_omad_killed_during_live_failover_and_rollback_finishes_them(rig: Rig) -> None:
    await rig.sync()
    fo = Failover(rig)
    await fo.prepare(live=True)
    vm = next(v for v in rig.state.inventory.vms if v.name == VM)
    rollback_steps = ["undo_start", "undo_attach", "undo_detach_here", "undo_deploy", "undo_power_off"]
    points = ["power_off", "ran:power_off", "final_sync", "ran:final_sync", "ran:deploy", "ran:start"]
    for i, point in enumerate(points):
        rig.write(0, 4 * 1024 * 1024, 64 * 1024 * 4, seed=100 + i)

        async def live() -> str:
            status, body = await rig.api.post("/failover/live", {"vm_name": VM})
            assert status == 202, body
            return str(body["job_id"])

        job_id = await fo.crash_and_restart(point, live)
        done = await fo.wait(job_id, timeout=180)
        assert done["status"] == "completed", (point, done["error_message"], done, rig.log_tail(lines=100))
        assert vm.power_state == "poweredOff"
        for vol, src, size in zip(fo.volumes(), rig.sources, SIZES):
            assert digest(fo.cs.devices.volume_file(vol), size) == digest(src, size), point
        assert fo.destination().state == "Running"

        async def rollback() -> str:
            status, body = await rig.api.post("/failover/rollback", {"vm_name": VM, "failover_type": "live",
                                                                     "power_on_source": True})
            assert status == 202, body
            return str(body["job_id"])

        back = await fo.wait(await fo.crash_and_restart(rollback_steps[i % len(rollback_steps)], rollback))
        assert back["status"] == "completed", (point, back, rig.log_tail(lines=100))
        await fo.assert_back_here()
        assert vm.power_state == "poweredOn"
