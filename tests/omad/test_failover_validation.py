"""Readiness, the validation views and the debug endpoints, from real state (a real sync, volume-agent and the
CloudStack simulator)."""

from __future__ import annotations

import pytest

from ..rig import Api
from .test_failover import Failover, fo, stack_config  # noqa: F401  (fixtures)
from .replication_rig import VM, Rig
from .test_replication import rig  # noqa: F401  (rig: the fixture)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


async def test_readiness_names_each_missing_prerequisite_then_passes(rig: Rig) -> None:
    status, before = await rig.api.get(f"/failover/{VM}/readiness")
    assert status == 200 and before["is_valid"] is False, before
    failing = {c["name"] for c in before["checks"] if not c["passed"]}
    assert {"completed_sync", "volumes_attached_here", "volumes_in_cloudstack", "network_mappings",
            "cloudstack_config"} <= failing, before["checks"]
    assert any("POST /replications" in a for a in before["required_actions"])
    assert any("POST /network-mappings" in a for a in before["required_actions"])
    assert 0 <= before["readiness_score"] < 100

    await rig.sync()
    f = Failover(rig)
    await f.prepare()
    status, ready = await rig.api.get(f"/failover/{VM}/readiness")
    assert status == 200 and ready["is_valid"] is True and ready["readiness_score"] == 100, \
        [c for c in ready["checks"] if not c["passed"]]
    assert ready["required_actions"] == []
    # Live failover has no live mappings: that alone is missing.
    status, live = await rig.api.post("/failover/preflight/validate", {"vm_name": VM, "failover_type": "live"})
    assert status == 200 and [c["name"] for c in live["checks"] if not c["passed"]] == ["network_mappings"]
    status, same = await rig.api.get(f"/vms/{VM}/failover-readiness", params={"failover_type": "live"})
    assert status == 200 and same["readiness_score"] == live["readiness_score"]

    # A VM bigger than the offering: named.
    rig.stack.sql("UPDATE vm_replication_contexts SET cpu_count = 64, memory_mb = 1048576")
    status, big = await rig.api.get(f"/vms/{VM}/configuration-check")
    offering = next(c for c in big["checks"] if c["name"] == "service_offering")
    assert big["is_valid"] is False and not offering["passed"] and "smaller than the VM" in offering["message"]


async def test_validation_views_follow_a_test_failover(fo: Failover) -> None:
    api = fo.rig.api
    status, sync = await api.get(f"/vms/{VM}/sync-status")
    assert status == 200 and sync["has_completed_sync"] and all(d["change_id"] for d in sync["disks"])
    status, vols = await api.get(f"/vms/{VM}/volume-status")
    assert status == 200 and vols["all_attached_here"] and vols["all_in_cloudstack"], vols
    assert [v["volume_id"] for v in vols["volumes"]] == fo.volumes()
    status, nets = await api.get(f"/vms/{VM}/network-mapping-status")
    assert status == 200 and nets["test"]["complete"] and not nets["live"]["complete"]
    status, idle = await api.get(f"/vms/{VM}/active-jobs")
    assert status == 200 and idle["count"] == 0

    fo.cs.faults.job_seconds = 0.3  # slow enough to see the job at work
    try:
        job_id = await fo.start_test()
        status, busy = await api.get(f"/vms/{VM}/active-jobs")
        assert busy["count"] == 1 and busy["jobs"][0]["job_id"] == job_id and busy["jobs"][0]["job_type"] == "failover"
        done = await fo.wait(job_id)
    finally:
        fo.cs.faults.job_seconds = 0.0
    assert done["status"] == "completed", done
    status, vols = await api.get(f"/vms/{VM}/volume-status")
    vm_id = fo.destination().id
    assert not vols["all_attached_here"] and all(v["attached_to_vm"] == vm_id for v in vols["volumes"]), vols
    status, ready = await api.get(f"/failover/{VM}/readiness")
    failing = {c["name"] for c in ready["checks"] if not c["passed"]}
    assert failing == {"volumes_attached_here", "no_failover_in_force"}, ready["checks"]
    status, decision = await api.get(f"/failover/rollback/decision/test/{VM}")
    assert status == 200 and decision["can_rollback"] and decision["failover_job_id"] == job_id
    status, pre = await api.get(f"/failover/preflight/config/test/{VM}")
    assert status == 200 and pre["network_mappings"]["complete"] and pre["configuration"]["is_valid"]
    status, body = await api.post("/failover/rollback", {"vm_name": VM, "failover_type": "test"})
    assert status == 202, body
    end = await fo.wait(body["job_id"])
    assert end["status"] == "completed" and end["operation"] == "end_test", end
    await fo.assert_back_here()


async def test_debug_endpoints_are_for_administrators_and_logs_honour_limit_and_level(fo: Failover) -> None:
    api, stack = fo.rig.api, fo.rig.stack
    assert stack.omactl("user", "add", "olga", "--password-stdin", stdin="operator-pass\n").returncode == 0
    async with Api(stack.url) as op:
        await op.login("olga", "operator-pass")
        for path in ("/debug/health", "/debug/failover-jobs", "/debug/endpoints", "/debug/logs"):
            assert (await op.get(path))[0] == 403, path
    status, health = await api.get("/debug/health")
    assert status == 200 and health["database"] == "connected"
    status, eps = await api.get("/debug/endpoints")
    paths = {(e["method"], e["path"]) for e in eps["endpoints"]}
    assert ("POST", "/failover/test") in paths and ("GET", "/debug/logs") in paths
    job_id = await fo.start_test()
    await fo.wait(job_id)
    status, jobs = await api.get("/debug/failover-jobs")
    assert status == 200 and jobs["recent"][0]["job_id"] == job_id and jobs["recent"][0]["steps"]

    status, logs = await api.get("/debug/logs", params={"limit": 5, "level": "INFO"})
    assert status == 200 and logs["source"] == "files" and len(logs["lines"]) == 5, logs
    status, warnings = await api.get("/debug/logs", params={"limit": 1000, "level": "WARNING"})
    assert warnings["lines"] and all(any(w in line for w in ("WARNING", "ERROR", "CRITICAL"))
                                     for line in warnings["lines"]), warnings["lines"][:5]
    assert not any(" INFO " in line for line in warnings["lines"])
    assert (await api.get("/debug/logs", params={"limit": 0}))[0] == 400
    assert (await api.get("/debug/logs", params={"level": "LOUD"}))[0] == 400
