"""Every way a backup can fail ends the same: the backup is `failed` with the reason, and nothing is left —
no qemu-nbd, no leased port, no image file, no row half-way. The faults are the VMA simulator's (refuse,
error, drop, fail mid-transfer, disconnect, hang) and nbd-pool's (no ports, a path it will not export);
omad's own death mid-backup is test_restart.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from oma_common.rpc import AgentClient
from tests.sim.vma import FINALIZING

from .conftest import IDLE_TIMEOUT, TWO_DISK_VM, Rig

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

MiB = 1024 * 1024


async def started_then_failed(rig: Rig) -> dict:
    status, body = await rig.start(TWO_DISK_VM)
    assert status == 200, body
    return await rig.wait(body["backup_id"], timeout=30)


async def refused_at_start(rig: Rig, http_status: int) -> dict:
    status, body = await rig.start(TWO_DISK_VM)
    assert status == http_status, body
    assert body["backup_id"].startswith("backup-"), body  # the failed backup can be looked up
    status, backup = await rig.api.get(f"/backups/{body['backup_id']}")
    assert status == 200
    audit = rig.stack.sql("SELECT actor, outcome FROM audit_log WHERE action = 'backup.start' AND resource = ?",
                          (f"backup:{body['backup_id']}",))
    assert audit == [("admin", "failed")]
    return backup


CASES: dict[str, tuple[Callable[[Rig], object], Callable[[Rig], Awaitable[dict]], str]] = {
    "vma refuses": (lambda r: r.state.faults.refuse_job(), lambda r: refused_at_start(r, 503),
                    "the VMA refused the backup: the VMA answered status 'failed': failed to create VM snapshot"),
    "vma errors": (lambda r: r.state.faults.error("backup/start", status=500, body="vCenter session expired"),
                   lambda r: refused_at_start(r, 503), "the VMA refused the backup: vCenter session expired"),
    "vma drops the call": (lambda r: r.state.faults.drop("backup/start"), lambda r: refused_at_start(r, 503),
                           "the VMA refused the backup: VMA unreachable"),
    "fails mid-transfer": (lambda r: r.state.faults.fail_job(after_bytes=2 * MiB), started_then_failed,
                           "the VMA reported the backup failed: injected failure: NBD write failed"),
    "disconnects": (lambda r: r.state.faults.disconnect_job(after_bytes=2 * MiB), started_then_failed,
                    "idle: no NBD client on its exports and no telemetry or completion from the VMA"),
    "never completes": (lambda r: r.state.faults.hang_job(), started_then_failed, "idle: "),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_vma_faults(rig: Rig, case: str) -> None:
    arm, run, reason = CASES[case]
    arm(rig)
    backup = await run(rig)
    assert backup["status"] == "failed" and backup["error_message"].startswith(reason), backup["error_message"]
    await rig.assert_nothing_left(backup["backup_id"])
    # The VM is free again: the next backup works.
    rig.state.faults.clear()
    await rig.backup(TWO_DISK_VM)


async def test_no_ports_left(rig: Rig) -> None:
    pool = AgentClient("nbd-pool", rig.stack.run_dir / "nbd-pool.sock")
    try:
        status = await pool.call("GET", "/ports/status")
        await pool.call("POST", "/ports/allocate", json={"job_id": "squatter", "count": status["available"] - 1})
        backup = await refused_at_start(rig, 409)
        assert backup["status"] == "failed" and "port pool exhausted" in backup["error_message"], backup
        steps = rig.stack.sql("SELECT name, status FROM job_steps WHERE job_id = ? ORDER BY seq",
                              (backup["backup_id"],))
        assert steps == [("create images", "completed"), ("allocate ports", "failed")]
        await pool.call("POST", "/ports/release", json={"job_id": "squatter"})
    finally:
        await pool.close()
    await rig.assert_nothing_left(backup["backup_id"])


async def test_a_repository_nbd_pool_will_not_export(rig: Rig) -> None:
    outside = rig.stack.state / "outside-roots"
    outside.mkdir()
    # Refused at creation (and by the dry-run test), naming the roots and where to change them.
    status, body = await rig.api.post("/repositories", {"name": "outside", "type": "local",
                                                        "config": {"disk_path": str(outside)}})
    assert status == 400 and body["error"] == "outside the export roots", body
    roots = [str(rig.repo_dir), str(rig.stack.state / "repos")]
    assert all(r in body["details"] for r in roots), body
    assert "nbd-pool.d/*.toml" in body["details"] and "export_roots" in body["details"], body
    status, test = await rig.api.post("/repositories/test", {"type": "local", "config": {"disk_path": str(outside)}})
    assert status == 400 and test["error"] == "outside the export roots", test  # no retry can make it work
    assert all(r in test["details"] for r in roots) and "nbd-pool.d/*.toml" in test["details"], test
    # A repository whose roots were narrowed after its creation: the backup is refused and undone.
    inside = rig.stack.state / "repos" / "narrowed"
    inside.mkdir()
    status, repo = await rig.api.post("/repositories", {"name": "narrowed", "type": "local",
                                                        "config": {"disk_path": str(inside)}})
    assert status == 201, repo
    rig.stack.sql("UPDATE backup_repositories SET root_path = ? WHERE id = ?", (str(outside), repo["id"]))
    status, body = await rig.api.post("/backups", {"vm_name": TWO_DISK_VM, "repository_id": repo["id"]})
    assert status == 400 and body["error"] == "path outside the export roots", body
    assert "is not inside an export root" in body["details"]
    backup = (await rig.api.get(f"/backups/{body['backup_id']}"))[1]
    assert backup["status"] == "failed" and "export roots" in backup["error_message"]
    assert list(outside.iterdir()) == []
    await rig.assert_nothing_left(backup["backup_id"])


async def test_telemetry_is_recorded_while_it_runs(rig: Rig) -> None:
    rig.state.faults.hang_job()
    status, body = await rig.start(TWO_DISK_VM)
    assert status == 200
    job = await rig.state.wait_job(body["backup_id"], statuses=(FINALIZING,))
    # The hanging job posts its last telemetry once finalizing: wait until omad has it.
    while not any(c.json["bytes_transferred"] == job.bytes_transferred and c.status == 200
                  for c in rig.state.calls_to(f"/telemetry/backup/{body['backup_id']}")):
        await asyncio.sleep(0.02)
    status, running = await rig.api.get(f"/backups/{body['backup_id']}")
    assert running["status"] == "running", running
    assert running["bytes_transferred"] == job.bytes_transferred > 0
    assert running["total_bytes"] == job.total_bytes and running["progress_percent"] == 100
    assert running["current_phase"] in ("transferring", "finalizing") and running["transfer_speed_bps"] > 0
    assert [d["bytes_transferred"] for d in running["disk_results"]] == [d.bytes_transferred for d in job.disks]
    assert all(d["size_bytes"] > 0 for d in running["disk_results"])  # qemu-img info -U of a held image
    step = rig.stack.sql("SELECT current_step, progress FROM jobs WHERE id = ?", (body["backup_id"],))
    assert step[0][0].startswith("VMA: ") and step[0][1] == 100
    failed = await rig.wait(body["backup_id"], timeout=IDLE_TIMEOUT + 10)
    assert failed["status"] == "failed"
