"""omad restarted in the middle of a backup: nbd-pool's exports outlive it and the VMA keeps writing, so the
restarted omad re-adopts the backup and it completes with the right bytes. Only a backup whose exports are
gone meanwhile (or that the VMA lost) is failed, with the reason, and nothing of it is left."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ...rig import Api
from .conftest import IDLE_TIMEOUT, TWO_DISK_VM, Rig, qemu_img

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def image_sha256(image: str | Path, scratch: Path) -> str:
    """The checksum of what the image reads as (its guest-visible bytes)."""
    raw = scratch / (Path(image).name + ".raw")
    r = qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", image, raw)
    assert r.returncode == 0, r.stderr
    try:
        return sha256_of(raw)
    finally:
        raw.unlink()


async def restart_omad(rig: Rig, how: signal.Signals) -> None:
    rig.stack.daemons["omad"].stop(sig=how)
    exports, ports = await rig.nbd_state()
    assert len(exports) == 2 and ports["allocated"] == 2  # nbd-pool keeps serving while omad is away
    await start_omad(rig)


async def start_omad(rig: Rig) -> None:
    """Start omad again on the port it had (as the appliance's fixed one): the VMA's job calls that URL."""
    port = urlsplit(rig.stack.url).port
    rig.stack.add_config("omad", "70-same-port.toml", f"[api]\nport = {port}\n")
    await asyncio.to_thread(rig.stack.start, "omad")  # the simulator (this loop) answers omad's recovery meanwhile
    assert rig.stack.url == rig.state.oma_url, (rig.stack.url, rig.state.oma_url)
    await rig.api.close()
    rig.api = Api(rig.stack.url)
    await rig.api.login("admin", rig.stack.admin_password)


async def held_backup(rig: Rig) -> tuple[str, asyncio.Event]:
    """A backup whose VMA wrote disk 0 and now pauses (telemetry going on) until the event is set."""
    fault = rig.state.faults.hold_job(after_disks=1)
    status, body = await rig.start(TWO_DISK_VM)
    assert status == 200, body
    assert fault.held is not None and fault.release is not None
    await asyncio.wait_for(fault.held.wait(), 30)
    return body["backup_id"], fault.release


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
async def test_backup_survives_an_omad_restart(rig: Rig, how: signal.Signals, tmp_path: Path) -> None:
    backup_id, release = await held_backup(rig)
    await restart_omad(rig, how)
    try:
        status, backup = await rig.api.get(f"/backups/{backup_id}")  # judged before omad serves
        assert status == 200 and backup["status"] == "running", (backup, rig.log_tail())
        steps = rig.stack.sql("SELECT name, status FROM job_steps WHERE job_id = ? ORDER BY seq", (backup_id,))
        assert steps[-1] == ("re-adopted after an omad restart", "completed"), steps
        # Longer than the idle limit: the restarted omad's watchdog watches it, the VMA's telemetry keeps it.
        await asyncio.sleep(IDLE_TIMEOUT + 1)
        assert (await rig.api.get(f"/backups/{backup_id}"))[1]["status"] == "running"
    finally:
        release.set()  # disk 1 is written after the restart, then both disks are completed
    done = await rig.wait(backup_id)
    assert done["status"] == "completed", (done, rig.log_tail())
    assert [c.status for c in rig.state.calls_to(f"/backups/{backup_id}/complete")] == [200, 200]
    for d in done["disk_results"]:
        assert image_sha256(d["qcow2_path"], tmp_path) == sha256_of(rig.source(TWO_DISK_VM, d["disk_id"]))
    exports, ports = await rig.nbd_state()
    assert exports == [] and ports["allocated"] == 0


async def test_backup_whose_exports_stopped_meanwhile_fails_cleanly(rig: Rig) -> None:
    backup_id, release = await held_backup(rig)
    rig.stack.daemons["omad"].stop(sig=signal.SIGKILL)
    pool = rig.pool()
    try:  # meanwhile, the exports end (an operator, a reboot of the appliance)
        await pool.call("POST", f"/jobs/{backup_id}/release")
    finally:
        await pool.close()
    await start_omad(rig)
    try:
        status, backup = await rig.api.get(f"/backups/{backup_id}")
        assert status == 200 and backup["status"] == "failed", backup
        assert backup["error_message"].startswith("interrupted: omad restarted while the backup ran, and the "
                                                  "export of disk 0"), backup["error_message"]
        assert "is gone" in backup["error_message"]
        await rig.assert_nothing_left(backup_id)
    finally:
        release.set()


async def test_backup_the_vma_lost_fails_cleanly(rig: Rig) -> None:
    backup_id, release = await held_backup(rig)
    rig.stack.daemons["omad"].stop(sig=signal.SIGKILL)
    lost = rig.state.jobs.pop(backup_id)  # the VMA restarted meanwhile: it knows nothing of the job
    await start_omad(rig)
    try:
        backup = (await rig.api.get(f"/backups/{backup_id}"))[1]
        assert backup["status"] == "failed", (backup, rig.log_tail())
        assert "the VMA no longer knows the job" in backup["error_message"]
        await rig.assert_nothing_left(backup_id)
    finally:
        release.set()
        if lost.task is not None:
            await asyncio.gather(lost.task, return_exceptions=True)
