"""Scheduled backups end to end: omad's scheduler starts real backups through the same domain function as
POST /backups (the VMA simulator writes them into nbd-pool's exports), within the groups' limits, full first
and incremental after, and the execution's counts match the backups that ran; and backups starting at once, run
after run and back to back, on a pool with exactly as many NBD ports as the disks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ...lib.scheduling import run_now
from ...rig import Stack, free_range
from .conftest import TWO_DISK_VM, Rig, qemu_img

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
ROUNDS = 12  # scheduled runs of the concurrency test
WORKER_ROUNDS = 10  # then backups back to back per VM


@pytest.fixture
def fast_scheduler(stack_config: Stack) -> None:
    """Look at running backups every 0.2 s rather than every 5 s (requested before `rig` starts the stack)."""
    stack_config.add_config("omad", "70-scheduler.toml", "[scheduler]\npoll_seconds = 0.2\n")


def assert_same_source(rig: Rig, vm: str, disk: dict[str, Any]) -> None:
    r = qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", disk["qcow2_path"], rig.source(vm, disk["disk_id"]))
    assert r.returncode == 0, r.stdout + r.stderr


async def test_a_schedule_backs_up_its_groups(fast_scheduler: None, rig: Rig) -> None:
    api = rig.api
    ctx = {v["vm_name"]: v["context_id"] for v in (await api.get("/vm-contexts"))[1]["vm_contexts"]}
    status, s = await api.post("/schedules", {"name": "nightly", "cron_expression": "0 0 3 * * *",
                                              "timezone": "Europe/Berlin", "repository_id": rig.repo_id,
                                              "max_concurrent_jobs": 3, "retry_attempts": 0})
    assert status == 201, s
    web = (await api.post("/machine-groups", {"name": "web", "schedule_id": s["id"], "priority": 10,
                                              "max_concurrent_vms": 2}))[1]
    db = (await api.post("/machine-groups", {"name": "db", "schedule_id": s["id"], "priority": 20}))[1]
    await api.post(f"/machine-groups/{web['id']}/vms", {"vm_context_ids": [ctx[f"web {n}"] for n in range(3)]})
    await api.post(f"/machine-groups/{db['id']}/vms", {"vm_context_ids": [ctx[TWO_DISK_VM], ctx["web 0"]]})

    first = await run_now(rig.api, s["id"], log_tail=rig.log_tail)
    assert (first["status"], first["vms_eligible"], first["jobs_created"], first["jobs_completed"],
            first["jobs_failed"]) == ("completed", 4, 4, 4, 0), (first, rig.log_tail())
    backups = {b["backup_id"]: b for b in (await api.get("/backups"))[1]["backups"]}
    assert {j["job_id"] for j in first["jobs"]} == set(backups)  # the jobs ARE the backups
    assert {b["vm_name"] for b in backups.values()} == {"web 0", "web 1", "web 2", TWO_DISK_VM}  # web 0 once
    for b in backups.values():
        assert (b["status"], b["backup_type"], b["created_by"]) == ("completed", "full", "scheduler:nightly")
        assert b["tags"] == {"schedule_id": s["id"], "schedule_name": "nightly"}
    for d in backups[next(k for k, b in backups.items() if b["vm_name"] == TWO_DISK_VM)]["disk_results"]:
        assert_same_source(rig, TWO_DISK_VM, d)

    second = await run_now(rig.api, s["id"], log_tail=rig.log_tail)  # auto: incrementals now that a full backup exists
    assert (second["status"], second["jobs_completed"]) == ("completed", 4), second
    latest = {b["backup_id"]: b for b in (await api.get("/backups"))[1]["backups"]
              if b["backup_id"] not in backups}
    assert {b["backup_type"] for b in latest.values()} == {"incremental"} and len(latest) == 4
    listing = {v["vm_name"]: v for v in (await api.get("/vm-contexts"))[1]["vm_contexts"]}
    for b in latest.values():
        assert listing[b["vm_name"]]["last_scheduled_job_id"] == b["backup_id"]
        assert listing[b["vm_name"]]["next_scheduled_at"] == s["next_run_at"]
    exports, ports = await rig.nbd_state()
    assert exports == [] and ports["allocated"] == 0


@pytest.fixture
def tight_ports(stack_config: Stack) -> range:
    """As many NBD ports as the VMs have disks (5): every run's exports start on the ports the previous run's
    just freed, their connections still in TIME_WAIT."""
    ports = free_range(5)
    stack_config.add_config("nbd-pool", "70-tight.toml", f"port_min = {ports[0]}\nport_max = {ports[-1]}\n")
    return ports


@pytest.mark.timeout(480)
async def test_concurrent_starts_share_nbd_pool_without_a_race(fast_scheduler: None, tight_ports: range,
                                                               rig: Rig) -> None:
    """Four backups (five disks) start at once, run after run, on a pool of exactly five ports: leases, binds and
    the VMA's connections never collide, and every run backs up every VM."""
    api = rig.api
    ctx = [v["context_id"] for v in (await api.get("/vm-contexts"))[1]["vm_contexts"]]
    status, s = await api.post("/schedules", {"name": "all at once", "cron_expression": "0 0 3 * * *",
                                              "timezone": "UTC", "repository_id": rig.repo_id,
                                              "max_concurrent_jobs": 4, "retry_attempts": 0})
    assert status == 201, s
    group = (await api.post("/machine-groups", {"name": "all", "schedule_id": s["id"], "max_concurrent_vms": 4}))[1]
    await api.post(f"/machine-groups/{group['id']}/vms", {"vm_context_ids": ctx})
    for n in range(ROUNDS):  # each run's four starts at once, on the ports the previous run freed
        run = await run_now(api, s["id"], log_tail=rig.log_tail)
        failed = [(v["vm_name"], v["reason"]) for v in run["vms"] if v["status"] != "completed"]
        assert (run["status"], run["jobs_completed"], failed) == ("completed", 4, []), \
            (n, run, rig.log_tail(), rig.log_tail("nbd-pool", 40))

    # Then each VM backs up again as soon as its last backup ends: every start takes the ports another job
    # has just released (its qemu-nbd just stopped) while the other jobs' exports run.
    async def back_to_back(vm: str) -> None:
        for _ in range(WORKER_ROUNDS):
            done = await rig.backup(vm, "incremental")
            assert done["status"] == "completed", done

    names = [v["vm_name"] for v in (await api.get("/vm-contexts"))[1]["vm_contexts"]]
    await asyncio.gather(*(back_to_back(vm) for vm in names))
    backups = (await api.get("/backups", params={"limit": 10000}))[1]["backups"]
    assert len(backups) == 4 * (ROUNDS + WORKER_ROUNDS) and {b["status"] for b in backups} == {"completed"}
    used = {d["nbd_port"] for b in backups for d in b["disk_results"] if d.get("nbd_port")}
    assert used and used <= set(tight_ports), used
    exports, ports = await rig.nbd_state()
    assert exports == [] and ports["allocated"] == 0
