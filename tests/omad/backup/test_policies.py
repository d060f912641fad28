"""Backup policies end to end: two immediate copy rules copy a full and an incremental (and what the chain
needs) into two more repositories, the copies show the primary's content and restore files, and a copy with
one corrupted byte fails verification naming the file."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ...lib.diskimages import ext4_modify
from .conftest import TWO_DISK_VM, Rig
from .test_restore import mount, read

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


async def add_repo(rig: Rig, name: str, **extra: Any) -> tuple[str, Path]:
    path = rig.stack.state / "repos" / name
    path.mkdir(exist_ok=True)
    status, repo = await rig.api.post("/repositories", {"name": name, "type": "local",
                                                        "config": {"disk_path": str(path)}, **extra})
    assert status == 201, repo
    return repo["id"], path


async def wait_copies(rig: Rig, backup_id: str, count: int, timeout: float = 90) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        status, body = await rig.api.get(f"/backups/{backup_id}/copies")
        assert status == 200, body
        copies = body  # an array, as the specification has it
        assert not [c for c in copies if c["status"] == "failed"], (copies, rig.log_tail())
        if len(copies) >= count and all(c["status"] == "completed" for c in copies):
            return copies
        assert time.monotonic() < deadline, (copies, rig.log_tail())
        await asyncio.sleep(0.1)


def same_content(a: str, b: str) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", a, b], capture_output=True,
                       text=True, timeout=120)
    return r.returncode == 0


async def test_rules_are_validated(rig: Rig) -> None:
    other, _ = await add_repo(rig, "other")
    base = {"name": "p", "primary_repository_id": rig.repo_id, "retention_days": 7}
    for rules, word in (([{"destination_repository_id": rig.repo_id}], "primary"),
                        ([{"destination_repository_id": other}, {"destination_repository_id": other}], "already"),
                        ([{"destination_repository_id": "repo-nope"}], "does not exist")):
        status, body = await rig.api.post("/policies", {**base, "copy_rules": rules})
        assert status == 400 and word in body["details"], body
    status, body = await rig.api.post("/policies", {**base, "primary_repository_id": "repo-nope"})
    assert status == 400, body
    status, policy = await rig.api.post("/policies", {**base, "copy_rules": [{"destination_repository_id": other,
                                                                              "copy_mode": "scheduled"}]})
    assert status == 201 and policy["copy_rules"][0]["copy_mode"] == "scheduled", policy
    assert len((await rig.api.get("/policies"))[1]) == 1  # an array, as the specification has it
    assert (await rig.api.get(f"/policies/{policy['id']}"))[1]["name"] == "p"
    # A backup under a policy goes to its primary repository only.
    status, body = await rig.start(TWO_DISK_VM, "full", policy_id=policy["id"], repository_id=other)
    assert status == 400 and "policy" in body["details"], body
    assert (await rig.api.delete(f"/policies/{policy['id']}"))[0] == 200
    assert (await rig.api.get(f"/policies/{policy['id']}"))[0] == 404


@pytest.mark.root
async def test_two_copy_rules_copy_chains_that_restore_and_verify(rig: Rig) -> None:
    a, _ = await add_repo(rig, "offsite-a")
    b, _ = await add_repo(rig, "offsite-b")
    status, policy = await rig.api.post("/policies", {
        "name": "3-2-1", "primary_repository_id": rig.repo_id, "retention_days": 30,
        "copy_rules": [{"destination_repository_id": a, "priority": 2},
                       {"destination_repository_id": b, "priority": 1, "verify_after_copy": True}]})
    assert status == 201, policy

    status, started = await rig.start(TWO_DISK_VM, "full", policy_id=policy["id"])
    assert status == 200, started
    full = await rig.wait(started["backup_id"])
    assert full["status"] == "completed" and full["policy_id"] == policy["id"]
    image = rig.images[TWO_DISK_VM]
    ext4_modify(rig.source(TWO_DISK_VM, 0), image.partition(1).offset, add={"etc/motd": b"changed\n"})
    status, started = await rig.start(TWO_DISK_VM, "incremental", policy_id=policy["id"])
    assert status == 200, started
    inc = await rig.wait(started["backup_id"])
    assert inc["status"] == "completed", inc

    copies = {c["repository_id"]: c for c in await wait_copies(rig, inc["backup_id"], 2)}
    full_copies = {c["repository_id"]: c for c in await wait_copies(rig, full["backup_id"], 2)}
    assert set(copies) == set(full_copies) == {a, b}
    for repo in (a, b):
        copy_of_inc = (await rig.api.get(f"/backups/{copies[repo]['copy_backup_id']}"))[1]
        copy_of_full = (await rig.api.get(f"/backups/{full_copies[repo]['copy_backup_id']}"))[1]
        # Chain-aware: the incremental's copy is built on the full's copy in the same repository.
        assert copy_of_inc["repository_id"] == repo and copy_of_inc["backup_type"] == "incremental"
        assert copy_of_inc["parent_backup_id"] == copy_of_full["backup_id"]
        assert copy_of_inc["chain_id"] == copy_of_full["backup_id"]
        for original, copy in ((inc, copy_of_inc), (full, copy_of_full)):
            for d_orig, d_copy in zip(original["disk_results"], copy["disk_results"]):
                assert d_copy["qcow2_path"].startswith(str(rig.stack.state / "repos" / ("offsite-a" if repo == a
                                                                                          else "offsite-b")))
                assert same_content(d_orig["qcow2_path"], d_copy["qcow2_path"]), (d_orig, d_copy)
        for d in copy_of_inc["disk_results"]:  # relative backing file, to the destination's copy
            assert d["backing_file"] and "/" not in d["backing_file"] and "@" in d["backing_file"]
        status, chain = await rig.api.get("/backups/chain", params={"vm_name": TWO_DISK_VM, "repository_id": repo})
        assert status == 200 and chain["backup_count"] == 2, chain
        status, listed = await rig.api.get("/backups", params={"repository_id": repo})
        assert listed["total"] == 2

    # File restore from a copy.
    copy_id = copies[b]["copy_backup_id"]
    m = await mount(rig, copy_id)
    try:
        assert (await read(rig, m["mount_id"], "/part1/etc/motd"))[:2] == (200, b"changed\n")
    finally:
        assert (await rig.api.delete(f"/restore/{m['mount_id']}"))[0] == 200

    # Verification: fine, then one corrupted byte in the full's copy fails it and names the file.
    status, result = await rig.api.post(f"/backups/{copy_id}/verify", params={"wait": "true"})
    assert status == 200 and result["verify_status"] == "ok", result
    assert result["files_checked"] == 4
    victim = Path((await rig.api.get(f"/backups/{full_copies[b]['copy_backup_id']}"))[1]
                  ["disk_results"][1]["qcow2_path"])
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    status, result = await rig.api.post(f"/backups/{copy_id}/verify", params={"wait": "true"})
    assert status == 200 and result["verify_status"] == "failed", result
    assert [e["file"] for e in result["errors"]] == [str(victim)], result
    assert "checksum" in result["errors"][0]["problem"]
    status, stored = await rig.api.get(f"/backups/{copy_id}/verification")
    assert stored["verify_status"] == "failed" and stored["verified_at"] and stored["errors"][0]["file"] == str(victim)
    # The primary is untouched; a copy from a source that fails verification is not made.
    status, result = await rig.api.post(f"/backups/{inc['backup_id']}/verify", params={"wait": "true"})
    assert result["verify_status"] == "ok", result
    c, _ = await add_repo(rig, "offsite-c")
    status, out = await rig.api.post(f"/backups/{copy_id}/copy", {"repository_id": c})
    assert status == 200 and out["status"] == "pending", out
    audit = rig.stack.sql("SELECT actor, resource, details FROM audit_log WHERE action = 'backup.copy' "
                          "ORDER BY id DESC LIMIT 1")
    assert [(a, r, json.loads(d)["copy_id"]) for a, r, d in audit] == [("admin", f"backup:{copy_id}", out["copy_id"])]
    deadline = time.monotonic() + 60
    while (body := (await rig.api.get(f"/copies/{out['copy_id']}"))[1])["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert body["status"] == "failed" and "source verification failed" in body["error_message"], body
    assert str(victim) in body["error_message"] and body["attempts"] == 1
    assert not [p for p in (rig.stack.state / "repos" / "offsite-c").rglob("*") if p.is_file()]
