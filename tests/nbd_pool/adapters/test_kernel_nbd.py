"""Tests for the kernel-nbd backend. No nbd module here: device selection, locking and the connect /
disconnect protocol run against a fake /sys/block and a fake qemu-nbd; the real test is skipped."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbd_pool.adapters import kernel_nbd
from nbd_pool.adapters.attach import AttachError
from nbd_pool.adapters.kernel_nbd import KernelNbdBackend, _DeviceLock, build_connect_argv, connected_devices, free_devices

from ...lib.gate import Gate, cancel_inside, children, open_fds

pytestmark = [pytest.mark.timeout(30)]

# A stand-in for `qemu-nbd --connect DEV --read-only ... --verbose -- IMAGE` and `qemu-nbd --disconnect DEV`
# that plays the kernel's part in a fake /sys/block: connecting writes nbdN/pid and nbdN/size, and the
# process stays in the foreground until a disconnect clears them.
FAKE_QEMU_NBD = r'''#!PYTHON
import os, sys, time, pathlib
sys_block = pathlib.Path(os.environ["FAKE_SYS_BLOCK"])
args = sys.argv[1:]
if args[0] == "--disconnect":
    d = sys_block / pathlib.Path(args[1]).name
    (d / "pid").unlink(missing_ok=True)
    (d / "size").write_text("0\n")
    sys.exit(0)
dev = pathlib.Path(args[0].split("=", 1)[1]).name
d = sys_block / dev
image = args[-1]
if not os.path.exists(image):
    print(f"qemu-nbd: Failed to blk_new_open '{image}': No such file", file=sys.stderr)
    sys.exit(1)
if dev in os.environ.get("FAKE_RACE", "").split(","):
    (d / "pid").write_text("1\n")  # someone else connected it first
    print("qemu-nbd: Failed to set NBD socket: Device or resource busy", file=sys.stderr)
    sys.exit(1)
print(f"NBD device /dev/{dev} is now connected to {image}", file=sys.stderr, flush=True)
(d / "size").write_text("2048\n")
(d / "pid").write_text(f"{os.getpid()}\n")
while (d / "pid").exists():
    time.sleep(0.02)
'''


@pytest.fixture
def fake_sys(tmp_path: Path) -> Path:
    sys_block = tmp_path / "sys" / "block"
    for n in (0, 1, 2, 3, 10):
        d = sys_block / f"nbd{n}"
        d.mkdir(parents=True)
        (d / "size").write_text("0\n")
    (sys_block / "loop0").mkdir()
    return sys_block


@pytest.fixture
def fake_qemu_nbd(tmp_path: Path, fake_sys: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    prog = tmp_path / "qemu-nbd"
    prog.write_text(FAKE_QEMU_NBD.replace("PYTHON", sys.executable))
    prog.chmod(0o755)
    monkeypatch.setenv("FAKE_SYS_BLOCK", str(fake_sys))
    return prog


@pytest.fixture
def fake_dev(tmp_path: Path) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for n in (0, 1, 2, 3, 10):
        with open(dev / f"nbd{n}", "wb") as f:
            f.truncate(1024 * 1024)  # no partition table: the attach reads it as "none"
    return dev


def test_argv_stays_in_the_foreground() -> None:
    argv = build_connect_argv(Path("/repo/disk.qcow2"), "/dev/nbd3", "qcow2")
    assert argv == ["qemu-nbd", "--connect=/dev/nbd3", "--read-only", "--format=qcow2", "--verbose", "--", "/repo/disk.qcow2"]
    with pytest.raises(ValueError):
        build_connect_argv(Path("/repo/disk.qcow2"), "/dev/loop0", "qcow2")
    with pytest.raises(ValueError):
        build_connect_argv(Path("disk.qcow2"), "/dev/nbd0", "qcow2")


def test_free_devices_in_numeric_order_skipping_used_ones(fake_sys: Path) -> None:
    (fake_sys / "nbd0" / "pid").write_text("1234\n")  # connected
    (fake_sys / "nbd1" / "size").write_text("2048\n")  # size without pid: going away, leave it
    assert free_devices(fake_sys) == ["nbd2", "nbd3", "nbd10"]
    assert free_devices(fake_sys, allowed=["/dev/nbd3", "/dev/nbd10"]) == ["nbd3", "nbd10"]
    assert connected_devices(fake_sys) == [("/dev/nbd0", 1234)]


def test_device_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    first, second = _DeviceLock(tmp_path, "nbd2"), _DeviceLock(tmp_path, "nbd2")
    assert first.try_acquire()
    assert not second.try_acquire()  # flock conflicts between open files, even in one process
    first.release()
    assert second.try_acquire()
    second.release()


@pytest.mark.asyncio
async def test_attach_skips_locked_and_raced_devices_then_detaches(
    tmp_path: Path, fake_sys: Path, fake_dev: Path, fake_qemu_nbd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"")
    (fake_sys / "nbd0" / "pid").write_text("1\n")  # in use
    monkeypatch.setenv("FAKE_RACE", "nbd2")  # lost to a program that does not take our lock
    backend = KernelNbdBackend(sys_block=fake_sys, dev=fake_dev, lock_dir=tmp_path / "locks", program=str(fake_qemu_nbd))
    held = _DeviceLock(tmp_path / "locks", "nbd1")  # another attach is connecting nbd1 right now
    assert held.try_acquire()
    try:
        att = await backend.attach(image, tmp_path / "unused", resource_id="knbd")
    finally:
        held.release()
    assert att.device == str(fake_dev / "nbd3")
    assert (fake_sys / "nbd2" / "pid").read_text() == "1\n"  # nbd2 was tried and lost, nbd1 was skipped
    assert (fake_sys / "nbd1" / "size").read_text() == "0\n"
    assert att.partitions == []
    pid = att.record.process.pid
    assert int((fake_sys / "nbd3" / "pid").read_text()) == pid
    await att.detach()
    assert not (fake_sys / "nbd3" / "pid").exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.asyncio
async def test_image_error_is_not_retried_on_other_devices(tmp_path: Path, fake_sys: Path, fake_dev: Path, fake_qemu_nbd: Path) -> None:
    backend = KernelNbdBackend(sys_block=fake_sys, dev=fake_dev, lock_dir=tmp_path / "locks", program=str(fake_qemu_nbd))
    with pytest.raises(AttachError, match="No such file"):
        await backend.attach(tmp_path / "missing.qcow2", tmp_path / "w")
    assert free_devices(fake_sys) == ["nbd0", "nbd1", "nbd2", "nbd3", "nbd10"]


@pytest.mark.asyncio
async def test_no_free_device(tmp_path: Path, fake_sys: Path, fake_dev: Path, fake_qemu_nbd: Path) -> None:
    for d in fake_sys.glob("nbd*"):
        (d / "pid").write_text("1\n")
    backend = KernelNbdBackend(sys_block=fake_sys, dev=fake_dev, lock_dir=tmp_path / "locks", program=str(fake_qemu_nbd))
    with pytest.raises(AttachError, match="no free nbd device"):
        await backend.attach(tmp_path / "disk.qcow2", tmp_path / "w")


@pytest.mark.root
@pytest.mark.skipif(not kernel_nbd.available(), reason="no nbd kernel module (/dev/nbd0 absent) on this machine")
@pytest.mark.asyncio
async def test_real_kernel_nbd_attach(tmp_path: Path, helpers: Any) -> None:
    raw, parts = helpers.build_gpt_disk(tmp_path)
    image = helpers.to_qcow2(raw, tmp_path / "disk.qcow2")
    att = await KernelNbdBackend().attach(image, tmp_path / "w", resource_id="real-nbd")
    try:
        assert [(p.start, p.size) for p in att.partitions] == parts
        with pytest.raises(OSError):
            fd = os.open(att.device, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
            finally:
                os.close(fd)
    finally:
        await att.detach()
    assert kernel_nbd.connected_pid(os.path.basename(att.device)) is None


def test_both_backends_satisfy_the_interface() -> None:
    # Checked by mypy (structural typing), and at run time for the attribute the daemon selects by.
    from nbd_pool.adapters.attach import AttachBackend
    from nbd_pool.adapters.fuse_loop import FuseLoopBackend

    backends: list[AttachBackend] = [FuseLoopBackend(), KernelNbdBackend()]
    assert [b.name for b in backends] == ["fuse-loop", "kernel-nbd"]


@pytest.mark.asyncio
async def test_a_device_lock_taken_for_a_cancelled_attach_is_dropped(
    tmp_path: Path, fake_sys: Path, fake_dev: Path, fake_qemu_nbd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"")
    backend = KernelNbdBackend(sys_block=fake_sys, dev=fake_dev, lock_dir=tmp_path / "locks", program=str(fake_qemu_nbd))
    before, kids = open_fds(), children()
    gate = Gate(_DeviceLock.try_acquire)
    # The flock is taken in the attach's thread once the gate is released.
    monkeypatch.setattr(_DeviceLock, "try_acquire", lambda self: gate(self))
    task = asyncio.create_task(backend.attach(image, tmp_path / "w", resource_id="knbd"))
    await cancel_inside(gate, task)
    assert open_fds() == before and children() <= kids
    monkeypatch.undo()
    assert free_devices(fake_sys) == ["nbd0", "nbd1", "nbd2", "nbd3", "nbd10"]
    lock = _DeviceLock(tmp_path / "locks", "nbd0")  # nobody holds the device the cancelled attach locked
    assert lock.try_acquire()
    lock.release()
