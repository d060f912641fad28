"""Immutability on a real ext4 filesystem (a loop device mounted by the test): a backup copied into an
immutable repository is locked with its chain, by the appliance (409 with the unlock date) and by the
filesystem (chattr +i through volume-agent: even root cannot remove the files); a lock can be extended,
never shortened; once it has ended the API deletes the backup (unlocking the files first)."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from oma_common.rpc import AgentClient
from .conftest import TWO_DISK_VM, Rig

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.root]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.fixture
def ext4_dir(rig: Rig, tmp_path: Path) -> Iterator[Path]:
    image = tmp_path / "immutable.ext4"
    with open(image, "wb") as f:
        f.truncate(512 * 1024 * 1024)
    sh("mkfs.ext4", "-q", "-F", str(image))
    device = sh("losetup", "--find", "--show", str(image))
    point = rig.stack.state / "repos" / "immutable"
    point.mkdir()
    try:
        sh("mount", "-t", "ext4", device, str(point))
        try:
            yield point
        finally:
            for p in point.rglob("*"):
                if p.is_file():
                    subprocess.run(["chattr", "-i", str(p)], capture_output=True, timeout=30)
            subprocess.run(["umount", str(point)], capture_output=True, timeout=60)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)


async def test_locked_backups_resist_root_and_early_deletion(rig: Rig, ext4_dir: Path) -> None:
    status, repo = await rig.api.post("/repositories", {"name": "vault", "type": "local", "is_immutable": True,
                                                        "min_retention_days": 7,
                                                        "config": {"disk_path": str(ext4_dir)}})
    assert status == 201, repo
    full = await rig.backup(TWO_DISK_VM, "full")
    inc = await rig.backup(TWO_DISK_VM, "incremental")
    status, out = await rig.api.post(f"/backups/{inc['backup_id']}/copy", {"repository_id": repo["id"]})
    assert status == 200, out
    deadline = time.monotonic() + 60
    while (copy := (await rig.api.get(f"/copies/{out['copy_id']}"))[1])["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert copy["status"] == "completed", (copy, rig.log_tail())
    top = copy["copy_backup_id"]
    base = (await rig.api.get(f"/backups/{top}"))[1]["parent_backup_id"]
    assert base and base.startswith(full["backup_id"])

    # Locked by the appliance and by the filesystem, the incremental with the full it needs.
    for bid in (top, base):
        status, lock = await rig.api.get(f"/backups/{bid}/lock")
        assert status == 200 and lock["locked"] and lock["files_locked"], lock
    unlock_at = lock["unlock_at"]
    files = [Path(d["qcow2_path"]) for bid in (top, base) for d in (await rig.api.get(f"/backups/{bid}"))[1]
             ["disk_results"]]
    assert len(files) == 4 and all(f.parent.parent == ext4_dir for f in files)
    assert os.geteuid() == 0
    for f in files:
        assert "i" in sh("lsattr", "-d", str(f)).split()[0]
        with pytest.raises(PermissionError) as info:
            f.unlink()
        assert info.value.errno == errno.EPERM
        assert f.exists()

    status, body = await rig.api.delete(f"/backups/{top}")
    assert status == 409 and body["unlock_at"] == unlock_at, body
    assert all(f.exists() for f in files)

    # Extending works (for the whole chain); shortening is refused.
    later = (datetime.now(timezone.utc) + timedelta(days=30)).isoformat()
    status, lock = await rig.api.post(f"/backups/{top}/lock", {"until": later})
    assert status == 200 and lock["unlock_at"] > unlock_at, lock
    assert rig.stack.sql("SELECT actor, resource FROM audit_log WHERE action = 'backup.lock'") == \
        [("admin", f"backup:{top}")]
    assert (await rig.api.get(f"/backups/{base}/lock"))[1]["unlock_at"] == lock["unlock_at"]
    sooner = (datetime.now(timezone.utc) + timedelta(days=10)).isoformat()
    status, body = await rig.api.post(f"/backups/{top}/lock", {"until": sooner})
    assert status == 409 and body["unlock_at"] == lock["unlock_at"], body

    # The agent refuses paths outside its repository roots.
    agent = AgentClient("volume-agent", rig.stack.run_dir / "volume-agent.sock", timeout=30)
    try:
        for bad in ("/etc/passwd", str(ext4_dir / ".." / ".." / "oma.db"), "relative"):
            with pytest.raises(Exception) as refused:
                await agent.call("POST", "/immutability/unlock", json={"paths": [bad]})
            assert "invalid" in str(getattr(refused.value, "code", "")) or "path" in str(refused.value)
    finally:
        await agent.close()

    # Once the lock has ended (moved into the past here), deletion unlocks the files and removes them.
    rig.stack.sql("UPDATE backup_jobs SET locked_until = '2000-01-01T00:00:00.000Z' WHERE backup_id IN (?, ?)",
                  (top, base))
    for bid in (top, base):
        status, body = await rig.api.delete(f"/backups/{bid}")
        assert status == 200, body
    assert not any(f.exists() for f in files)
