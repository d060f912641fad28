"""Tests for the fuse-loop attach backend with real qemu-storage-daemon, loop devices and partx (root)."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio

from nbd_pool.adapters import fuse_loop
from nbd_pool.adapters.attach import AttachError, AttachRecord, DetachBusy
from nbd_pool.adapters.fuse_loop import FuseLoopAttachment, FuseLoopBackend, build_qsd_argv
from oma_common import blockdev, mountinfo
from oma_common.command import run
from oma_common.process import ChildFailed

from ...lib.gate import Gate, cancel_inside, children, open_fds

pytestmark = [pytest.mark.timeout(60)]

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _tools(helpers: Any) -> None:
    helpers.need("qemu-storage-daemon", "qemu-img", "losetup", "partx", "sfdisk", "mkfs.ext4")


@pytest_asyncio.fixture
async def attachments() -> AsyncIterator[list[FuseLoopAttachment]]:
    """Detaches whatever a test left attached, even when it failed half-way."""
    made: list[FuseLoopAttachment] = []
    yield made
    for a in made:
        if blockdev.backing_file(a.device) is not None or mountinfo.is_mounted(Path(a.record.fuse_file)):
            await a.detach()


def qsd_pids_for(path: Path) -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and "qemu-storage-daemon" in p.info["cmdline"][0] and any(str(path) in a for a in p.info["cmdline"])
        and p.status() != psutil.STATUS_ZOMBIE
    ]  # fmt: skip


def assert_nothing_left(record: AttachRecord) -> None:
    fuse_file = Path(record.fuse_file)
    assert blockdev.backing_file(record.device) != record.fuse_file
    assert not mountinfo.is_mounted(fuse_file)
    assert qsd_pids_for(fuse_file) == []
    assert not Path(record.workdir).exists()
    assert not [p for p in record.partitions if Path(p.device).exists() and blockdev.backing_file(record.device) == record.fuse_file]


def test_qsd_argv_is_read_only_json() -> None:
    argv = build_qsd_argv(Path("/r/a,b.qcow2"), Path("/w/disk.raw"), "qcow2")
    assert argv[0] == "qemu-storage-daemon"
    assert '"filename":"/r/a,b.qcow2"' in argv[2] and '"read-only":true' in argv[2]
    assert '"driver":"qcow2"' in argv[4] and '"read-only":true' in argv[4]
    assert '"writable":false' in argv[6] and '"mountpoint":"/w/disk.raw"' in argv[6]
    assert "force-share" not in " ".join(argv)
    assert "force-share" in " ".join(build_qsd_argv(Path("/r/a"), Path("/w/d"), "raw", force_share=True))
    with pytest.raises(ValueError):
        build_qsd_argv(Path("rel.qcow2"), Path("/w/d"), "qcow2")


@pytest.mark.root
@pytest.mark.asyncio
async def test_gpt_qcow2_exposes_both_partitions_read_only(tmp_path: Path, helpers: Any, attachments: list[FuseLoopAttachment]) -> None:
    raw, parts = helpers.build_gpt_disk(tmp_path)
    image = helpers.to_qcow2(raw, tmp_path / "disk.qcow2")
    backend = FuseLoopBackend()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    att = await backend.attach(image, tmp_path / "work" / "a1", resource_id="attach-1")
    attach_s = loop.time() - t0
    attachments.append(att)
    assert att.device.startswith("/dev/loop")
    assert [(p.number, p.start, p.size, p.type) for p in att.partitions] == [
        (1, *parts[0], helpers.LINUX_FS), (2, *parts[1], helpers.LINUX_FS),
    ]  # fmt: skip
    for p in att.partitions:
        assert Path(p.device).is_block_device()
        assert Path(f"/sys/class/block/{Path(p.device).name}/ro").read_text().strip() == "1"
    # Writes fail on the disk and on its partitions (kernel 6.x lets a read-only device be opened for
    # writing and refuses the write itself with EPERM; older kernels refuse the open).
    for dev in [att.device] + [p.device for p in att.partitions]:
        with pytest.raises(OSError) as info:
            fd = os.open(dev, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
            finally:
                os.close(fd)
        assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    # The data is the image's: each ext4 superblock magic (0xEF53 at 1024 + 56) where the table says.
    with open(att.device, "rb") as f:
        for p in att.partitions:
            f.seek(p.start + 1024 + 56)
            assert f.read(2) == b"\x53\xef"
    # Mounting read-only without journal replay shows the files (root may mount; not needed otherwise).
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    await run(["mount", "-o", "ro,noload", att.partitions[1].device, mnt])
    try:
        assert (mnt / "p2.txt").read_text() == "hello from partition 2\n"
        # While mounted, detach refuses and leaves everything in place.
        with pytest.raises(DetachBusy):
            await att.detach()
        assert blockdev.backing_file(att.device) == att.record.fuse_file
        assert Path(att.partitions[1].device).exists()
    finally:
        await run(["umount", mnt])
    t0 = loop.time()
    await att.detach()
    detach_s = loop.time() - t0
    assert_nothing_left(att.record)
    print(f"fuse-loop attach {attach_s * 1000:.0f} ms, detach {detach_s * 1000:.0f} ms")


@pytest.mark.root
@pytest.mark.asyncio
async def test_incremental_qcow2_shows_the_top_layer(tmp_path: Path, helpers: Any, attachments: list[FuseLoopAttachment]) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"])
    await run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", base])
    await run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
    await run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 64k", top])
    att = await FuseLoopBackend().attach(top, tmp_path / "w", resource_id="incr")
    attachments.append(att)
    assert att.partitions == []
    with open(att.device, "rb") as f:
        assert f.read(64 * 1024) == b"\x11" * 64 * 1024  # from the backing file
        f.seek(1 * MIB)
        assert f.read(64 * 1024) == b"\x22" * 64 * 1024  # from the top
        f.seek(8 * MIB)
        assert f.read(4096) == bytes(4096)  # unallocated anywhere
    await att.detach()
    assert_nothing_left(att.record)


@pytest.mark.root
@pytest.mark.asyncio
async def test_workdir_behind_a_symlink(tmp_path: Path, attachments: list[FuseLoopAttachment]) -> None:
    """The kernel reports backing files and mount points with symlinks resolved; teardown must still match."""
    image = tmp_path / "plain.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", image, "8M"])
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    att = await FuseLoopBackend().attach(image, tmp_path / "link" / "a", resource_id="symlink")
    attachments.append(att)
    assert att.record.fuse_file == str(tmp_path / "real" / "a" / "disk.raw")
    assert blockdev.backing_file(att.device) == att.record.fuse_file
    await att.detach()
    assert_nothing_left(att.record)
    assert not (tmp_path / "link" / "a").exists()


@pytest.mark.root
@pytest.mark.asyncio
async def test_mbr_logical_partitions_match_the_kernel(tmp_path: Path, helpers: Any, attachments: list[FuseLoopAttachment]) -> None:
    raw = tmp_path / "mbr.img"
    with open(raw, "wb") as f:
        f.truncate(64 * MIB)
    script = "label: dos\nstart=2048, size=8192, type=83\nstart=18432, size=40960, type=5\nstart=20480, size=8192, type=83\n"
    helpers.sh("sfdisk", "-q", raw, input=script.encode())
    att = await FuseLoopBackend().attach(raw, tmp_path / "w", fmt="raw", resource_id="mbr")
    attachments.append(att)
    assert [p.number for p in att.partitions] == [1, 2, 5]  # expose_partitions checked start/size vs sysfs
    await att.detach()
    assert_nothing_left(att.record)


@pytest.mark.root
@pytest.mark.asyncio
async def test_stale_partitions_on_a_reused_loop_device_are_replaced(tmp_path: Path, helpers: Any,
                                                                      attachments: list[FuseLoopAttachment]) -> None:
    """The kernel keeps BLKPG partitions of a loop device after losetup -d (without partscan); the next
    attach on that device must not mistake them for its own."""
    old = tmp_path / "old.img"
    with open(old, "wb") as f:
        f.truncate(64 * MIB)
    helpers.sh("sfdisk", "-q", old, input=f"label: gpt\nstart=2048, size=20480, type={helpers.LINUX_FS}\n".encode())
    free = helpers.sh("losetup", "--find").strip()
    helpers.sh("losetup", "--read-only", free, old)
    helpers.sh("partx", "--add", free)
    helpers.sh("losetup", "--detach", free)
    assert Path(f"/sys/class/block/{Path(free).name}p1").exists()  # what a careless previous user leaves
    raw, parts = helpers.build_gpt_disk(tmp_path)
    att = await FuseLoopBackend().attach(raw, tmp_path / "w", fmt="raw", resource_id="reuse")
    attachments.append(att)
    if att.device != free:
        helpers.sh("partx", "--delete", free)
        pytest.skip(f"another process took {free} meanwhile")
    assert [(p.start, p.size) for p in att.partitions] == parts
    await att.detach()
    assert_nothing_left(att.record)


@pytest.mark.root
@pytest.mark.asyncio
async def test_failed_attach_leaves_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    with pytest.raises(ChildFailed, match="missing.qcow2"):
        await FuseLoopBackend().attach(tmp_path / "missing.qcow2", workdir)
    assert not workdir.exists()
    assert qsd_pids_for(workdir) == []
    # A raw file claimed to be qcow2: qemu refuses to open it; the FUSE mount never appears.
    bogus = tmp_path / "bogus.qcow2"
    bogus.write_bytes(b"not a qcow2" * 1000)
    with pytest.raises(ChildFailed, match="(?i)qcow"):
        await FuseLoopBackend().attach(bogus, workdir)
    assert not workdir.exists() and not mountinfo.is_mounted(workdir / "disk.raw")


@pytest.mark.asyncio
async def test_a_work_directory_made_for_a_cancelled_attach_is_removed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"")
    workdir = tmp_path / "w"
    before, kids = open_fds(), children()
    gate = Gate(fuse_loop._prepare_workdir)
    monkeypatch.setattr(fuse_loop, "_prepare_workdir", gate)
    task = asyncio.create_task(FuseLoopBackend().attach(image, workdir, resource_id="cancelled"))
    await cancel_inside(gate, task)
    assert not workdir.exists() and open_fds() == before and children() <= kids


@pytest.mark.root
@pytest.mark.asyncio
async def test_resume_after_restart_then_detach(tmp_path: Path, helpers: Any, attachments: list[FuseLoopAttachment]) -> None:
    raw, _ = helpers.build_gpt_disk(tmp_path)
    image = helpers.to_qcow2(raw, tmp_path / "disk.qcow2")
    att = await FuseLoopBackend().attach(image, tmp_path / "w", resource_id="resume")
    saved = att.forget().to_dict()  # the daemon stops, leaving the attachment up
    record = AttachRecord.from_dict(saved)
    assert blockdev.backing_file(record.device) == record.fuse_file
    resumed = await FuseLoopBackend().resume(record)
    attachments.append(resumed)
    assert resumed.partitions == att.partitions
    await resumed.detach()
    assert_nothing_left(record)
    with pytest.raises(AttachError):
        await FuseLoopBackend().resume(record)
    await FuseLoopBackend().release(record)  # idempotent on nothing


@pytest.mark.root
@pytest.mark.asyncio
async def test_release_after_qsd_was_killed(tmp_path: Path, helpers: Any) -> None:
    """A crashed storage daemon leaves a dead FUSE mount and a loop device on it: release cleans both."""
    raw, _ = helpers.build_gpt_disk(tmp_path)
    att = await FuseLoopBackend().attach(raw, tmp_path / "w", fmt="raw", resource_id="crash")
    record = att.forget()
    os.kill(record.process.pid, 9)
    await asyncio.sleep(0.1)
    assert mountinfo.is_mounted(Path(record.fuse_file))  # killed: nobody unmounted it
    with pytest.raises(AttachError):
        await FuseLoopBackend().resume(record)
    await FuseLoopBackend().release(record)
    assert_nothing_left(record)
