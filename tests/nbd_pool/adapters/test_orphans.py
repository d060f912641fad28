"""Tests for finding and releasing leftovers of a crashed nbd-pool, made on purpose with the real tools (root)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbd_pool.adapters import fuse_mounts, loopdev, partx
from nbd_pool.adapters.fuse_loop import FuseLoopBackend
from nbd_pool.adapters.orphans import _port_of, list_orphans, references_root, release_orphans
from nbd_pool.adapters.qemu_nbd import QemuNbdExport
from oma_common import blockdev
from oma_common.command import run
from oma_common.process import AdoptedChild

pytestmark = [pytest.mark.timeout(60)]


def test_port_of_qemu_nbd_argv() -> None:
    assert _port_of(["qemu-nbd", "--port=10105", "x"]) == 10105
    assert _port_of(["qemu-nbd", "-p", "10106", "x"]) == 10106
    assert _port_of(["qemu-nbd", "-p10107", "x"]) == 10107
    assert _port_of(["qemu-nbd", "--persistent", "x"]) is None
    assert references_root(["qsd", '{"filename":"/srv/work/a/disk.raw"}'], Path("/srv/work"))
    assert not references_root(["qsd", '{"filename":"/srv/workshop/a"}'], Path("/srv/work"))


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@pytest.mark.root
@pytest.mark.asyncio
async def test_leftovers_are_found_and_released(tmp_path: Path, helpers: Any, free_port: int) -> None:
    helpers.need("qemu-storage-daemon", "qemu-nbd", "qemu-img", "losetup", "partx", "sfdisk", "mkfs.ext4")
    root = tmp_path / "work"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    raw, _ = helpers.build_gpt_disk(tmp_path)
    backend = FuseLoopBackend()

    # 1. An attachment whose daemon "crashed": qemu-storage-daemon, FUSE mount, loop device, partitions.
    crashed = (await backend.attach(raw, root / "a1", fmt="raw", resource_id="a1")).forget()
    # 2. A qemu-storage-daemon killed with SIGKILL: a dead FUSE mount with nobody behind it.
    dead = (await backend.attach(raw, root / "a2", fmt="raw", resource_id="a2")).forget()
    await partx.delete_partitions(dead.device)  # a detached loop device would keep them (see fuse_loop)
    await loopdev.detach(dead.device)
    os.kill(dead.process.pid, 9)
    # 3. A qemu-nbd serving an image under the root, and 4. one elsewhere but on a pool port.
    img_in = root / "exp.qcow2"
    img_out = elsewhere / "pool.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", img_in, "64M"])
    await run(["qemu-img", "create", "-q", "-f", "qcow2", img_out, "64M"])
    pool_ports = range(free_port, free_port + 3)
    nbd_in = QemuNbdExport(img_in, "in", "127.0.0.1", free_port + 1)
    nbd_pool_port = QemuNbdExport(img_out, "pool", "127.0.0.1", free_port + 2)
    # 5. What is not ours: a qemu-nbd outside root and pool range, a loop device over a file elsewhere.
    img_foreign = elsewhere / "foreign.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", img_foreign, "64M"])
    foreign = QemuNbdExport(img_foreign, "foreign", "127.0.0.1", free_port + 3 if free_port + 3 < 65536 else free_port - 1)
    foreign_loop = await blockdev.attach_read_only(raw)
    kept = None
    try:
        for e in (nbd_in, nbd_pool_port, foreign):
            await e.start()
        in_rec, pool_rec, foreign_rec = nbd_in.release(), nbd_pool_port.release(), foreign.release()

        # Socket-activated, the qemu-nbd on a pool port names no port: found by its listening socket.
        assert _port_of(pool_rec.process.argv) is None
        found = await list_orphans(root, ports=pool_ports)
        assert {lo.device for lo in found.loops} == {crashed.device}
        assert {p.pid for p in found.processes} == {crashed.process.pid, in_rec.process.pid, pool_rec.process.pid}
        assert {m.mount_point for m in found.fuse_mounts} == {Path(crashed.fuse_file), Path(dead.fuse_file)}

        # What the daemon adopted is kept out of the list.
        kept_found = await list_orphans(root, ports=pool_ports, keep_pids={in_rec.process.pid})
        assert in_rec.process.pid not in {p.pid for p in kept_found.processes}

        problems = await release_orphans(found, stop_timeout=5)
        assert problems == []
        assert not await list_orphans(root, ports=pool_ports)
        for pid in (crashed.process.pid, in_rec.process.pid, pool_rec.process.pid):
            assert not alive(pid)
        assert blockdev.backing_file(crashed.device) is None or blockdev.backing_file(crashed.device) != crashed.fuse_file
        assert not fuse_mounts.under(root)
        # Nothing foreign was touched.
        assert alive(foreign_rec.process.pid)
        assert blockdev.backing_file(foreign_loop) == str(raw)
        kept = AdoptedChild.adopt_identity(foreign_rec.process, resource_id="foreign")
    finally:
        if kept is not None:
            await kept.stop()
        await loopdev.detach(foreign_loop)
        await asyncio.sleep(0)


@pytest.mark.root
@pytest.mark.asyncio
async def test_busy_loop_device_is_reported_not_forced(tmp_path: Path, helpers: Any) -> None:
    helpers.need("qemu-storage-daemon", "losetup", "partx", "sfdisk", "mkfs.ext4")
    root = tmp_path / "work"
    raw, _ = helpers.build_gpt_disk(tmp_path)
    rec = (await FuseLoopBackend().attach(raw, root / "a", fmt="raw", resource_id="busy")).forget()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    await run(["mount", "-o", "ro,noload", rec.partitions[0].device, mnt])
    try:
        found = await list_orphans(root)
        problems = await release_orphans(found)
        assert any("in use" in p for p in problems)
        assert blockdev.backing_file(rec.device) == rec.fuse_file  # the mounted device is left alone
    finally:
        await run(["umount", mnt])
    assert await release_orphans(await list_orphans(root)) == []
    assert not await list_orphans(root)


@pytest.mark.root
@pytest.mark.asyncio
async def test_a_containers_qemu_nbd_on_a_pool_port_is_not_ours(tmp_path: Path, helpers: Any, free_port: int) -> None:
    """/proc shows the processes of containers too. A qemu-nbd in another PID and network namespace that
    serves an image under our root on one of our port numbers is the container's export: listed as a
    leftover, the host's nbd-pool would stop it at every start (as it did in the packaging test's
    container while other test daemons started on the host)."""
    helpers.need("qemu-nbd", "qemu-img", "unshare", "ip")
    root = tmp_path / "work"
    root.mkdir()
    img = root / "theirs.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"])
    argv = ["qemu-nbd", "--persistent", "--format=qcow2", "--export-name=theirs", "--bind=127.0.0.1",
            f"--port={free_port}", "--shared=5", "--", str(img)]
    container = await asyncio.create_subprocess_exec(
        "unshare", "--pid", "--net", "--fork", "--kill-child", "--", "sh", "-ec",
        'ip link set lo up; exec "$@"', "sh", *argv)
    theirs: list[psutil.Process] = []
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not (theirs := [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == argv]):
            assert asyncio.get_running_loop().time() < deadline and container.returncode is None, "did not start"
            await asyncio.sleep(0.05)
        assert references_root(argv, root)  # by its argv alone it would be ours twice over
        found = await list_orphans(root, ports=range(free_port, free_port + 1))
        assert not found.processes, found
        assert await release_orphans(found) == []
        assert alive(theirs[0].pid)
    finally:
        for p in theirs:  # unshare blocks SIGTERM while it waits for its child: end the child
            p.terminate()
        if not theirs:
            container.kill()
        await asyncio.wait_for(container.wait(), 10)
