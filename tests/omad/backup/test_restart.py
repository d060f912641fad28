"""omad restarted in the middle of a backup: nbd-pool's exports outlive it and the VMA keeps writing, so the
restarted omad re-adopts the backup and it completes with the right bytes. Only a backup whose exports are
gone meanwhile (or that the VMA lost) is failed, with the reason, and nothing of it is left."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
from oma_common.devrun import write_local_configs

from tests.sim.vma import SimState, VMASim

from ...rig import Api
from ..conftest import PASSWORD, USER, VCENTER, manual, vma_config
from .conftest import (
    IDLE_TIMEOUT,
    TWO_DISK_VM,
    Rig,
    build_inventory,
    free_range,
    kill_strays,
    qemu_img,
)

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daemon_pids(launcher: psutil.Process) -> dict[str, int]:
    out = {}
    for child in launcher.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            argv = child.cmdline()
            if len(argv) > 2 and child.status() != psutil.STATUS_ZOMBIE:
                out[argv[2]] = child.pid
    return out


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def test_under_make_run_a_killed_omad_restarts_alone_and_the_backup_completes(short_tmp: Path,
                                                                                    tmp_path: Path) -> None:
    """`make run`'s launcher (oma_common.devrun) restarts a crashed omad alone, as Restart=on-failure does;
    the backup it ran is re-adopted and completes. The repository is the out-of-the-box <state>/repositories."""
    state = short_tmp
    port = _free_port()
    inv, _images, sources = build_inventory(tmp_path)
    sim_state = SimState(inv, workdir=tmp_path / "vmasim", telemetry_interval=0.2, outbound_timeout=30)
    for name, paths in sources.items():
        for index, path in enumerate(paths):
            sim_state.set_source(name, index, path)
    sim_state.oma_url = f"http://127.0.0.1:{port}"
    dirs = write_local_configs(state, port)  # what the launcher writes too; our drop-ins go beside it
    ports = free_range(8)
    async with VMASim(state=sim_state) as sim:
        (dirs["omad"] / "50-vma.toml").write_text(vma_config(sim.url, timeout=20))
        # The simulator runs in this process: its user stands in for the tunnel user (as tests/rig.py does).
        (dirs["omad"] / "20-tunnel-user.toml").write_text(
            f'[enrollment]\ntunnel_user = "{pwd.getpwuid(os.getuid()).pw_name}"\n')
        (dirs["omad"] / "60-backup.toml").write_text(
            f"[backup]\nidle_timeout_seconds = {IDLE_TIMEOUT}\nwatchdog_interval_seconds = 0.25\n")
        (dirs["nbd-pool"] / "60-pool.toml").write_text(f"port_min = {ports[0]}\nport_max = {ports[-1]}\n")
        out = open(tmp_path / "launcher.out", "w")  # noqa: SIM115 - the launcher's, closed below
        launcher = subprocess.Popen([sys.executable, "-m", "oma_common.devrun", "--state-dir", str(state),
                                     "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, text=True)
        api = Api(sim_state.oma_url)
        try:
            await _until(lambda: "OMA API:" in (tmp_path / "launcher.out").read_text(), 60, "launcher not up")
            await api.login("admin", (state / "admin-password").read_text().strip())
            status, body = await api.post("/vmware-credentials", {
                "credential_name": "sim", "vcenter_host": VCENTER, "username": USER, "password": PASSWORD,
                "datacenter": "DC1", "is_default": True})
            assert status in (200, 201), body
            status, body = await api.post("/discovery/add-vms", {**manual(), "vm_names": [TWO_DISK_VM]})
            assert status == 200, body
            repo_dir = state / "repositories" / "main"
            repo_dir.mkdir()
            status, repo = await api.post("/repositories", {"name": "main", "type": "local",
                                                            "config": {"disk_path": str(repo_dir)}})
            assert status == 201, repo
            fault = sim_state.faults.hold_job(after_disks=1)
            status, started = await api.post("/backups", {"vm_name": TWO_DISK_VM, "repository_id": repo["id"],
                                                          "backup_type": "full"})
            assert status == 200, started
            assert fault.held is not None and fault.release is not None
            await asyncio.wait_for(fault.held.wait(), 30)

            parent = psutil.Process(launcher.pid)
            before = _daemon_pids(parent)
            assert set(before) == {"omad", "nbd_pool", "restore_mounter", "volume_agent"}, before
            os.kill(before["omad"], signal.SIGKILL)
            await _until(lambda: _daemon_pids(parent).get("omad", before["omad"]) != before["omad"], 30,
                         "the launcher did not restart omad")
            await _until(lambda: "omad: ready again" in (tmp_path / "launcher.out").read_text(), 60,
                         "omad did not come back")
            after = _daemon_pids(parent)
            assert {n: p for n, p in after.items() if n != "omad"} == \
                   {n: p for n, p in before.items() if n != "omad"}, "only omad restarts"
            await api.close()
            api = Api(sim_state.oma_url)
            await api.login("admin", (state / "admin-password").read_text().strip())
            backup_id = started["backup_id"]
            assert (await api.get(f"/backups/{backup_id}"))[1]["status"] == "running"
            fault.release.set()
            deadline = time.monotonic() + 60
            while (backup := (await api.get(f"/backups/{backup_id}"))[1])["status"] == "running":
                assert time.monotonic() < deadline, backup
                await asyncio.sleep(0.2)
            assert backup["status"] == "completed", backup
            for d in backup["disk_results"]:
                assert image_sha256(d["qcow2_path"], tmp_path) == sha256_of(sources[TWO_DISK_VM][d["disk_id"]])
            assert launcher.poll() is None
        finally:
            await api.close()
            launcher.send_signal(signal.SIGINT)
            try:
                launcher.wait(30)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
            out.close()
            kill_strays(state / "repositories")
