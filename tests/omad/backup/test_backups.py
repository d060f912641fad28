"""VM-level backups end to end: omad creates the images and asks nbd-pool for real qemu-nbd exports, the VMA
simulator writes real disks into them with real NBD clients and completes each disk; every backup's chain
top reads exactly as the source did at that moment."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from urllib.parse import quote

import pytest

from ...lib.diskimages import File, Pattern, ext4_modify
from tests.sim.vma import faults as F

from .conftest import TWO_DISK_VM, Rig, qemu_img, write_random

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

MiB = 1024 * 1024


def assert_same(image: str | Path, source: Path) -> None:
    r = qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", image, source)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_full_then_two_incrementals_of_a_two_disk_vm(rig: Rig) -> None:
    src0, src1 = rig.source(TWO_DISK_VM, 0), rig.source(TWO_DISK_VM, 1)
    status, started = await rig.start(TWO_DISK_VM, "full", tags={"why": "test"})
    assert status == 200, started
    bid = started["backup_id"]
    assert re.fullmatch(r"backup-db-01-\d+(-\d+)?", bid)
    assert (started["status"], started["backup_type"], started["vm_name"], started["repository_id"]) == \
        ("started", "full", TWO_DISK_VM, rig.repo_id)
    assert started["vm_context_id"].startswith("ctx-") and started["tags"] == {"why": "test"}
    disks = started["disk_results"]
    assert [d["disk_id"] for d in disks] == [0, 1] and all(d["status"] == "qemu_started" for d in disks)
    assert all(d["qemu_nbd_pid"] > 0 and d["nbd_port"] > 0 for d in disks)
    assert [d["nbd_export_name"] for d in disks] == [f"{bid}-disk-2000", f"{bid}-disk-2001"]
    assert started["nbd_targets_string"] == ",".join(
        f"{2000 + i}:nbd://127.0.0.1:{d['nbd_port']}/{d['nbd_export_name']}" for i, d in enumerate(disks))
    # What the VMA was asked: the same targets, the vCenter login, the VM's path.
    (req,) = rig.state.requests_to("backup/start")
    assert req.json["job_id"] == bid and req.json["nbd_targets"] == started["nbd_targets_string"]
    assert req.json["vm_path"] == rig.vm(TWO_DISK_VM).path and req.json["vcenter_password"] == "VMware1!"

    full = await rig.wait(bid)
    assert full["status"] == "completed", full
    for d in full["disk_results"]:
        assert_same(d["qcow2_path"], [src0, src1][d["disk_id"]])
        assert d["backing_file"] is None and d["virtual_size"] == d["capacity_bytes"]
        assert d["size_bytes"] > 0 and d["change_id"] and d["status"] == "completed"
        assert Path(d["qcow2_path"]).stat().st_uid == os.geteuid()  # omad's, although qemu-nbd wrote it
    assert full["bytes_transferred"] > 0 and full["progress_percent"] == 100 and full["current_phase"] == "completed"
    assert rig.state.calls_to(f"/telemetry/backup/{bid}") and all(
        c.status == 200 for c in rig.state.calls_to(f"/telemetry/backup/{bid}"))
    assert [c.status for c in rig.state.calls_to(f"/backups/{bid}/complete")] == [200, 200]

    # Incremental 1: files change on disk 0, a region of disk 1 is rewritten.
    image = rig.images[TWO_DISK_VM]
    ext4_modify(src0, image.partition(1).offset, add={"etc/motd": b"changed once\n",
                                                      "var/log/new.log": File(Pattern(MiB, seed=3))})
    write_random(src1, 30 * MiB, MiB, seed=9)
    inc1 = await rig.backup(TWO_DISK_VM, "incremental")
    # Incremental 2: more changes, a file removed on the second partition.
    ext4_modify(src0, image.partition(2).offset, add={"db/table2": File(Pattern(MiB, seed=12))},
                remove=["db/README"])
    write_random(src1, 0, 64 * 1024, seed=10)
    inc2 = await rig.backup(TWO_DISK_VM, "incremental")

    for inc, parent in ((inc1, full), (inc2, inc1)):
        assert inc["parent_backup_id"] == parent["backup_id"] and inc["chain_id"] == bid
        for d, p in zip(inc["disk_results"], parent["disk_results"]):
            assert d["backing_file"] == Path(p["qcow2_path"]).name  # relative: the chain can be moved
            assert d["previous_change_id"] == p["change_id"] and d["change_id"] != p["change_id"]
    for d in inc2["disk_results"]:
        assert_same(d["qcow2_path"], [src0, src1][d["disk_id"]])
    # An incremental carries only the changed extents: far less than the full copy.
    assert inc1["bytes_transferred"] < full["bytes_transferred"] / 2
    assert inc1["size_bytes"] < full["size_bytes"]
    # The earlier layers still read as the source did then: the full image alone is the first state.
    assert qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", full["disk_results"][1]["qcow2_path"],
                    src1).returncode == 1

    status, chain = await rig.api.get("/backups/chain", params={"vm_name": TWO_DISK_VM})
    assert status == 200, chain
    assert (chain["chain_id"], chain["full_backup_id"], chain["backup_count"]) == (bid, bid, 3)
    assert [b["backup_id"] for b in chain["backups"]] == [bid, inc1["backup_id"], inc2["backup_id"]]
    assert [b["backup_type"] for b in chain["backups"]] == ["full", "incremental", "incremental"]
    assert all(b["size_bytes"] > 0 and len(b["disks"]) == 2 for b in chain["backups"])
    assert chain["total_size_bytes"] == sum(b["size_bytes"] for b in chain["backups"])
    status, same = await rig.api.get(f"/backups/{quote(TWO_DISK_VM, safe='')}/chain")
    assert status == 200 and same == chain

    for index in (0, 1):
        status, cid = await rig.api.get("/backups/changeid", params={"vm_name": TWO_DISK_VM, "disk_id": str(index)},
                                        token="")  # the VMA's call: no token, from loopback
        assert status == 200, cid
        assert cid["change_id"] == rig.state.change_ids(TWO_DISK_VM, index)[-1]
        assert cid["backup_id"] == cid["backup_job_id"] == inc2["backup_id"] and cid["disk_id"] == str(index)
        assert cid["backup_type"] == "incremental" and cid["completed_at"] == inc2["completed_at"]
    assert (await rig.api.get("/backups/changeid", params={"vm_name": TWO_DISK_VM, "disk_id": "7"}))[0] == 404
    assert (await rig.api.get("/backups/changeid", params={"vm_name": "nobody", "disk_id": "0"}))[0] == 404

    status, listing = await rig.api.get("/backups", params={"vm_name": TWO_DISK_VM})
    assert status == 200 and listing["total"] == 3
    assert [b["backup_id"] for b in listing["backups"]] == [inc2["backup_id"], inc1["backup_id"], bid]
    status, page = await rig.api.get("/backups", params={"backup_type": "incremental", "limit": "1", "offset": "1"})
    assert (page["total"], page["count"], page["backups"][0]["backup_id"]) == (2, 1, inc1["backup_id"])
    assert (await rig.api.get("/backups", params={"status": "running"}))[1]["total"] == 0
    exports, ports = await rig.nbd_state()
    assert exports == [] and ports["allocated"] == 0
    status, recent = await rig.api.get(f"/vm-contexts/{full['vm_context_id']}/recent-jobs")
    assert [(j["job_id"], j["job_type"], j["status"]) for j in recent["jobs"]] == [
        (inc2["backup_id"], "backup", "completed"), (inc1["backup_id"], "backup", "completed"),
        (bid, "backup", "completed")]


async def test_incremental_needs_a_full_and_one_backup_runs_at_a_time(rig: Rig) -> None:
    status, body = await rig.start(TWO_DISK_VM, "incremental")
    assert status == 400 and "take a full backup first" in body["details"]
    assert rig.stack.sql("SELECT COUNT(*) FROM backup_jobs") == [(0,)]
    assert (await rig.start("no such vm"))[0] == 404
    assert (await rig.api.post("/backups", {"vm_name": TWO_DISK_VM, "repository_id": "repo-none"}))[0] == 404
    assert (await rig.start(TWO_DISK_VM, "differential"))[0] == 400

    rig.state.faults.hang_job(vm_name=TWO_DISK_VM)  # writes everything, never completes
    status, first = await rig.start(TWO_DISK_VM)
    assert status == 200, first
    status, second = await rig.start(TWO_DISK_VM)
    assert status == 409 and second["backup_id"] == first["backup_id"], second
    status, body = await rig.api.delete(f"/backups/{first['backup_id']}")
    assert status == 409 and "running" in body["details"]
    other = await rig.backup("web 0")  # other VMs are not held up
    assert other["status"] == "completed"
    failed = await rig.wait(first["backup_id"], timeout=30)
    assert failed["status"] == "failed" and failed["error_message"].startswith("idle")
    await rig.assert_nothing_left(first["backup_id"])
    assert (await rig.api.post(f"/backups/{first['backup_id']}/complete", {"change_id": "x", "disk_id": 0}))[0] == 409
    assert (await rig.api.post("/backups/backup-none/complete", {"change_id": "x", "disk_id": 0}))[0] == 404
    assert (await rig.api.post("/telemetry/backup/backup-none", {"status": "running"}))[0] == 404
    assert (await rig.api.post("/telemetry/nothing/x", {"status": "running"}))[0] == 404


async def test_three_vms_at_once_and_the_pool_empties(rig: Rig) -> None:
    results = await asyncio.gather(*(rig.start(f"web {n}") for n in range(3)))
    assert [s for s, _ in results] == [200, 200, 200], results
    ports = {d["nbd_port"] for _, b in results for d in b["disk_results"]}
    assert len(ports) == 3
    done = await asyncio.gather(*(rig.wait(b["backup_id"]) for _, b in results))
    for n, backup in enumerate(done):
        assert backup["status"] == "completed", backup
        assert_same(backup["disk_results"][0]["qcow2_path"], rig.source(f"web {n}", 0))
    exports, status = await rig.nbd_state()
    assert exports == [] and status["allocated"] == 0 and status["allocations"] == []


async def test_delete_from_the_newest_end(rig: Rig) -> None:
    full = await rig.backup("web 1")
    write_random(rig.source("web 1", 0), 10 * MiB, MiB, seed=5)
    inc1 = await rig.backup("web 1", "incremental")
    write_random(rig.source("web 1", 0), 12 * MiB, MiB, seed=6)
    inc2 = await rig.backup("web 1", "incremental")

    status, body = await rig.api.delete(f"/backups/{full['backup_id']}")
    assert status == 409 and body["dependents"] == [inc1["backup_id"]], body
    assert inc1["backup_id"] in body["details"]
    status, body = await rig.api.delete(f"/backups/{inc1['backup_id']}")
    assert status == 409 and body["dependents"] == [inc2["backup_id"]]
    status, body = await rig.api.delete(f"/repositories/{rig.repo_id}")
    assert status == 409 and body["backup_count"] == 3
    for b in (inc2, inc1, full):
        status, body = await rig.api.delete(f"/backups/{b['backup_id']}")
        assert status == 200, body
        assert not Path(b["disk_results"][0]["qcow2_path"]).exists()
        assert (await rig.api.get(f"/backups/{b['backup_id']}"))[0] == 404
    assert list(rig.repo_dir.iterdir()) == []  # the VM's directory went with its last image
    assert rig.stack.sql("SELECT COUNT(*) FROM backup_jobs") == [(0,)]
    assert rig.stack.sql("SELECT COUNT(*) FROM backup_disks") == [(0,)]
    audit = rig.stack.sql("SELECT action FROM audit_log WHERE action LIKE 'backup.%' ORDER BY id")
    assert [a for (a,) in audit] == ["backup.start"] * 3 + ["backup.delete"] * 3
    assert (await rig.api.delete(f"/repositories/{rig.repo_id}"))[0] == 200


async def test_the_vm_context_counts_backups(rig: Rig) -> None:
    """A backup is one of the VM's jobs: counted, remembered as its last operation, current while it runs."""
    done = await rig.backup("web 0")
    rig.state.faults.add_job(F.JobFault(F.FAIL, kind="backup", after_bytes=MiB))
    status, started = await rig.start("web 0")
    assert status == 200, started
    failed = await rig.wait(started["backup_id"])
    assert failed["status"] == "failed"
    status, detail = await rig.api.get("/vm-contexts/web 0")
    assert status == 200, detail
    ctx = detail["context"]
    assert (ctx["total_jobs_run"], ctx["successful_jobs"], ctx["failed_jobs"]) == (2, 1, 1)
    assert ctx["last_successful_job_id"] == done["backup_id"] and ctx["current_job_id"] is None
    assert ctx["first_job_at"] and ctx["last_job_at"]
    assert ctx["current_status"] == "discovered"  # a backup does not move the replication status
    summary = ctx["last_operation_summary"]
    assert summary["job_type"] == "backup" and summary["status"] == "failed" and summary["error_message"]
