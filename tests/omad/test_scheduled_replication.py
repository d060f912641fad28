"""Scheduled replications end to end: omad's scheduler starts real replications of its groups' VMs through the
same domain function as POST /replications (the VMA simulator writes them into nbd-pool's exports of the
CloudStack simulator's volumes), initial first and incremental after; a VM whose replication is already running
is skipped in the run, and the execution's counts match what ran; with CloudStack slow, a run's VMs start at
once and other schedules run meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.sim.cloudstack import CloudStackSim
from tests.sim.vma import MiB
from tests.sim.vma import faults as F

from omad.replication.replications import volume_vm_name

from ..lib.scheduling import run_now, wait_run
from ..rig import Stack
from .replication_rig import VM, Rig, digest, open_rig
from .test_replication import write_random

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

OTHER = "db 02"
SIZES = {VM: [16 * MiB, 8 * MiB], OTHER: [8 * MiB]}


@pytest.fixture
async def rig(cloudstack_sim: CloudStackSim, stack_config: Stack, tmp_path: Path) -> AsyncIterator[Rig]:
    # Look at running jobs every 0.2 s rather than every 5 s; a held job must not be taken for an idle one.
    stack_config.add_config("omad", "70-scheduler.toml", "[scheduler]\npoll_seconds = 0.2\n")
    files: dict[str, list[Path]] = {}
    for vm, sizes in SIZES.items():
        for index, size in enumerate(sizes):
            path = tmp_path / f"{vm.replace(' ', '-')}-{index}.raw"
            with open(path, "wb") as f:
                f.truncate(size)
            write_random(path, MiB, size // 2, seed=index + 10 * len(files))
            files.setdefault(vm, []).append(path)
    async with open_rig(stack_config, cloudstack_sim, tmp_path, files[VM], idle_timeout=60,
                        others={OTHER: files[OTHER]}) as r:
        await save_cloudstack_config(r)
        yield r


async def save_cloudstack_config(rig: Rig) -> None:
    """The default CloudStack config: what a scheduled replication of a VM without its own uses."""
    cs = rig.cs
    status, body = await rig.api.post("/ossea/config", {"action": "create", "config": {
        "name": "primary", "api_url": cs.endpoint, "api_key": cs.api_key, "secret_key": cs.secret_key,
        "zone": next(iter(cs.inv.zones)), "oma_vm_id": cs.appliance_vm_id}})
    assert status == 200 and body["config"]["is_default"], body


async def replications_of(rig: Rig, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """VM name → the replication each of the run's jobs is."""
    out = {}
    for job in run["jobs"]:
        status, rep = await rig.api.get(f"/replications/{job['job_id']}")
        assert status == 200, rep
        out[rep["source_vm"]["name"]] = rep
    return out


def assert_volumes_hold(rig: Rig, rep: dict[str, Any], sources: list[Path]) -> None:
    for disk, src in zip(rep["disks"], sources, strict=True):
        size = src.stat().st_size
        assert digest(rig.cs.devices.link(disk["volume_id"]), size) == digest(src, size), disk["disk_id"]


async def test_a_replication_schedule_replicates_its_groups_and_skips_a_busy_vm(rig: Rig) -> None:
    api = rig.api
    ctx = {v["vm_name"]: v["context_id"] for v in (await api.get("/vm-contexts"))[1]["vm_contexts"]}
    # The contract's schedule: a replication_type and no repository make it a replication schedule.
    status, s = await api.post("/schedules", {"name": "hourly sync", "cron_expression": "0 0 * * * *",
                                              "replication_type": "auto", "max_concurrent_jobs": 2,
                                              "retry_attempts": 0})
    assert status == 201, s
    assert (s["action"], s["replication_type"], s["repository_id"]) == ("replication", "auto", None)
    status, group = await api.post("/machine-groups", {"name": "prod", "schedule_id": s["id"]})
    assert status == 201, group
    status, added = await api.post(f"/machine-groups/{group['id']}/vms", {"vm_context_ids": [ctx[VM], ctx[OTHER]]})
    assert status == 200, added
    sources = {VM: rig.sources, OTHER: [p for p in rig.sources[0].parent.glob("db-02-*.raw")]}

    first = await run_now(rig.api, s["id"], log_tail=rig.log_tail)
    assert (first["status"], first["vms_eligible"], first["jobs_created"], first["jobs_completed"],
            first["jobs_failed"], first["jobs_skipped"]) == ("completed", 2, 2, 2, 0, 0), (first, rig.log_tail())
    reps = await replications_of(rig, first)
    assert set(reps) == {VM, OTHER}
    for vm, rep in reps.items():
        assert (rep["status"], rep["replication_type"]) == ("completed", "initial"), rep
        assert (rep["schedule_execution_id"], rep["vm_group_id"], rep["scheduled_by"], rep["created_by"]) == \
            (str(first["id"]), group["id"], "hourly sync", "scheduler:hourly sync")
        assert rep["configuration"]["ossea_config_id"] == 1
        assert_volumes_hold(rig, rep, sources[vm])
    await rig.assert_released()

    # auto: incrementals now that every disk has a change id; only the changed blocks are written.
    rig.write(0, 2 * MiB, 1 * MiB, seed=77)  # a guest write VMware's CBT notes
    second = await run_now(rig.api, s["id"], log_tail=rig.log_tail)
    assert (second["status"], second["jobs_completed"]) == ("completed", 2), (second, rig.log_tail())
    reps = await replications_of(rig, second)
    assert {rep["replication_type"] for rep in reps.values()} == {"incremental"}
    assert_volumes_hold(rig, reps[VM], sources[VM])
    assert [d.blocks_written for d in rig.state.job(reps[VM]["job_id"]).disks] == [1 * MiB // (64 * 1024), 0]
    listing = {v["vm_name"]: v for v in (await api.get("/vm-contexts"))[1]["vm_contexts"]}
    assert listing[VM]["last_scheduled_job_id"] == reps[VM]["job_id"]
    assert listing[OTHER]["current_status"] == "ready_for_failover"

    # A replication of VM started by hand is still running when the schedule runs: VM is skipped, OTHER not.
    held = F.JobFault(F.HOLD, kind="replication", vm_name=VM, release=asyncio.Event(), held=asyncio.Event())
    rig.state.faults.add_job(held)
    status, manual = await rig.start()
    assert status == 201, manual
    assert held.held is not None and held.release is not None
    await asyncio.wait_for(held.held.wait(), 60)
    third = await run_now(rig.api, s["id"], log_tail=rig.log_tail)
    assert (third["status"], third["vms_eligible"], third["jobs_created"], third["jobs_completed"],
            third["jobs_skipped"]) == ("completed", 2, 1, 1, 1), (third, rig.log_tail())
    vms = {v["vm_name"]: v for v in third["vms"]}
    assert vms[VM]["status"] == "skipped" and manual["job_id"] in vms[VM]["reason"], vms[VM]
    assert vms[OTHER]["status"] == "completed"
    assert third["message"] == "1 of 2 VM(s) protected, 0 failed, 1 skipped"
    held.release.set()
    assert (await rig.wait(manual["job_id"]))["status"] == "completed"
    await rig.assert_released()


async def test_with_cloudstack_slow_a_runs_vms_start_at_once_and_other_schedules_run_meanwhile(rig: Rig) -> None:
    """A first sync creates and attaches a volume per disk, each a CloudStack job: with every job taking a
    second, the run's two VMs are started at once (their volume jobs overlap in CloudStack), and another
    schedule is run by hand (the scheduler's lock) while those starts are still in flight."""
    api, cs = rig.api, rig.cs
    ctx = {v["vm_name"]: v["context_id"] for v in (await api.get("/vm-contexts"))[1]["vm_contexts"]}
    status, s = await api.post("/schedules", {"name": "sync", "cron_expression": "0 0 * * * *",
                                              "replication_type": "auto", "max_concurrent_jobs": 2})
    assert status == 201, s
    status, group = await api.post("/machine-groups", {"name": "prod", "schedule_id": s["id"]})
    assert status == 201, group
    status, _ = await api.post(f"/machine-groups/{group['id']}/vms", {"vm_context_ids": [ctx[VM], ctx[OTHER]]})
    assert status == 200
    status, other = await api.post("/schedules", {"name": "other", "cron_expression": "0 30 * * * *",
                                                  "replication_type": "auto"})
    assert status == 201, other

    cs.faults.job_seconds = 1.0
    status, run = await api.post(f"/schedules/{s['id']}/trigger")
    assert status == 202, run
    deadline = time.monotonic() + 30
    while not any(j.finished is None for j in list(cs.inv.jobs.values())):  # a volume job is under way
        assert time.monotonic() < deadline, rig.log_tail()
        await asyncio.sleep(0.05)
    status, meanwhile = await api.post(f"/schedules/{other['id']}/trigger")  # not held up by those starts
    assert status == 202 and meanwhile["status"] == "skipped", meanwhile  # (no group uses it)
    status, detail = await api.get(f"/schedules/{s['id']}/executions/{run['id']}")
    assert status == 200 and detail["jobs_created"] == 0, detail  # both VMs still starting
    cs.faults.job_seconds = 0.0

    done = await wait_run(api, s["id"], run["id"], log_tail=rig.log_tail)
    assert (done["status"], done["jobs_created"], done["jobs_completed"]) == ("completed", 2, 2), \
        (done, rig.log_tail())
    # CloudStack saw the two VMs' volume jobs at the same time.
    spans: dict[str, list[tuple[float, float]]] = {VM: [], OTHER: []}
    for job in list(cs.inv.jobs.values()):
        volume = cs.inv.volumes.get(job.instanceid)
        if job.cmd.endswith(("CreateVolumeCmd", "AttachVolumeCmd")) and volume is not None:
            for vm in spans:
                if f"-{volume_vm_name(vm)}-" in volume.name:
                    spans[vm].append((job.started, job.finished or time.monotonic()))
    assert spans[VM] and spans[OTHER], (spans, [v.name for v in cs.inv.volumes.values()])
    assert any(a < d and c < b for a, b in spans[VM] for c, d in spans[OTHER]), spans
    await rig.assert_released()
