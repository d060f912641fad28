"""Read-only attachments through the real nbd-pool (fuse-loop here: this machine has no nbd module)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbd_pool.adapters.fuse_loop import FuseLoopBackend
from nbd_pool.attachments import Attachments
from nbd_pool.roots import Roots
from oma_common.statefile import Damaged, StateFile

from ..lib.diskimages import gpt_two_ext4, to_qcow2
from ..lib.gate import Gate, cancel_inside, children, open_fds
from .helpers import Pool, sh

pytestmark = [pytest.mark.timeout(120)]

LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def gpt_qcow2(pool: Pool, name: str = "disk.qcow2") -> Path:
    raw = gpt_two_ext4(pool.stack.state / f"{name}.raw", {"etc/hostname": b"vm1\n"}, {"data/report.txt": b"q3\n"},
                       size=128 * 1024 * 1024)
    image = to_qcow2(raw.path, pool.repo / name)
    raw.path.unlink()
    return image


def nothing_left(att: dict[str, Any], work_root: Path) -> None:
    device = Path(att["device"])
    back = Path(f"/sys/block/{device.name}/loop/backing_file")
    assert not back.exists() or str(work_root) not in back.read_text()
    assert not (work_root / att["attachment_id"]).exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(work_root.resolve()) not in mounts


@pytest.mark.root
async def test_gpt_qcow2_with_two_ext4_is_attached_read_only_and_detached_cleanly(pool: Pool) -> None:
    image = gpt_qcow2(pool)
    att = await pool.agent.ok("POST", "/attachments", {"image": str(image), "owner": "restore-mounter:mnt-1"})
    assert att["backend"] == "fuse-loop" and att["device"].startswith("/dev/loop")
    parts = att["partitions"]
    assert [p["number"] for p in parts] == [1, 2] and all(p["type"] == LINUX_FS for p in parts)
    for p in parts:
        assert Path(p["device"]).is_block_device()
    # Writes fail on the disk and on both partitions.
    for dev in [att["device"]] + [p["device"] for p in parts]:
        with pytest.raises(OSError) as info:
            fd = os.open(dev, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
            finally:
                os.close(fd)
        assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    # Each partition holds its file system and files (read with debugfs: no mount needed).
    for p, path, text in ((parts[0], "/etc/hostname", "vm1\n"), (parts[1], "/data/report.txt", "q3\n")):
        assert sh("debugfs", "-R", f"cat {path}", p["device"]).stdout.decode() == text
    listed = await pool.agent.ok("GET", "/attachments")
    assert listed["max_attachments"] == 8 and listed["available_slots"] == 7 and listed["backend"] == "fuse-loop"
    assert [(a["attachment_id"], a["owner"], a["status"]) for a in listed["attachments"]] == [
        (att["attachment_id"], "restore-mounter:mnt-1", "attached")]
    # While a partition is mounted, detach refuses and changes nothing.
    mnt = pool.stack.state / "mnt"
    mnt.mkdir()
    sh("mount", "-o", "ro,noload", parts[1]["device"], mnt)
    try:
        assert (mnt / "data" / "report.txt").read_text() == "q3\n"
        status, body = await pool.agent.request("DELETE", f"/attachments/{att['attachment_id']}")
        assert status == 409 and body["error"] == "attachment in use", body
        assert Path(parts[1]["device"]).is_block_device()
    finally:
        sh("umount", mnt)
    assert await pool.agent.ok("DELETE", f"/attachments/{att['attachment_id']}") == {"success": True}
    nothing_left(att, pool.work_root)
    assert (await pool.agent.ok("GET", "/attachments"))["attachments"] == []
    status, body = await pool.agent.request("DELETE", f"/attachments/{att['attachment_id']}")
    assert status == 404


@pytest.mark.root
async def test_a_killed_serving_process_shows_the_attachment_broken_at_once(pool: Pool) -> None:
    """Its qemu-storage-daemon killed while a partition is mounted (the OOM killer): the listing says broken,
    naming the process and how it ended, without waiting for the periodic check; once unmounted, DELETE
    removes all of it."""
    image = gpt_qcow2(pool)
    att = await pool.agent.ok("POST", "/attachments", {"image": str(image), "owner": "restore-mounter:mnt-k"})
    qsd = psutil.Process(att["pid"])  # this test's own: a child of its nbd-pool
    assert qsd.ppid() == pool.daemon.pid and Path(qsd.cmdline()[0]).name == "qemu-storage-daemon"
    mnt = pool.stack.state / "mnt"
    mnt.mkdir()
    sh("mount", "-o", "ro,noload", att["partitions"][0]["device"], mnt)
    try:
        qsd.kill()
        qsd.wait(10)
        (listed,) = (await pool.agent.ok("GET", "/attachments"))["attachments"]
        assert listed["status"] == "broken", listed
        assert listed["error"].startswith(f"qemu-storage-daemon (pid {qsd.pid}) serving {att['device']} was "
                                          "killed by SIGKILL"), listed
        status, body = await pool.agent.request("DELETE", f"/attachments/{att['attachment_id']}")
        assert status == 409 and body["error"] == "attachment in use", body
    finally:
        sh("umount", mnt)
    assert await pool.agent.ok("DELETE", f"/attachments/{att['attachment_id']}") == {"success": True}
    nothing_left(att, pool.work_root)
    assert (await pool.agent.ok("GET", "/attachments"))["attachments"] == []


@pytest.mark.root
async def test_backing_chain_is_followed(pool: Pool) -> None:
    base = gpt_qcow2(pool, "base.qcow2")
    top = pool.repo / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    att = await pool.agent.ok("POST", "/attachments", {"image": str(top), "owner": "t"})
    try:
        assert len(att["partitions"]) == 2
        assert sh("debugfs", "-R", "cat /etc/hostname", att["partitions"][0]["device"]).stdout == b"vm1\n"
    finally:
        await pool.agent.ok("DELETE", f"/attachments/{att['attachment_id']}")
    assert base.exists()


@pytest.mark.root
async def test_slots_are_limited(make_pool: Any) -> None:
    pool = await make_pool("max_attachments = 1\n")
    image = gpt_qcow2(pool)
    first = await pool.agent.ok("POST", "/attachments", {"image": str(image), "owner": "a"})
    status, body = await pool.agent.post("/attachments", {"image": str(image), "owner": "b"})
    assert status == 409 and body["code"] == "exhausted" and body["available_slots"] == 0
    await pool.agent.ok("DELETE", f"/attachments/{first['attachment_id']}")
    second = await pool.agent.ok("POST", "/attachments", {"image": str(image), "owner": "b"})
    await pool.agent.ok("DELETE", f"/attachments/{second['attachment_id']}")


async def test_attach_refuses_what_is_outside_the_roots(pool: Pool) -> None:
    outside = pool.stack.state / "elsewhere.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", outside, "8M")
    for image in (str(outside), f"{pool.repo}/../elsewhere.qcow2", "/etc/shadow", "relative.qcow2"):
        status, body = await pool.agent.post("/attachments", {"image": image, "owner": "x"})
        assert status == 400 and body["code"] == "invalid_request", (image, body)
    status, body = await pool.agent.post("/attachments", {"image": str(pool.repo / "nope.qcow2"), "owner": "x"})
    assert status == 404


async def test_an_attach_cancelled_while_the_image_opens_leaves_nothing_open(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled (restore-mounter gone, a timeout) while the thread opens the image: its descriptors are closed,
    no qemu process, no work directory, no slot taken."""
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("qemu-img", "create", "-q", "-f", "qcow2", repo / "disk.qcow2", "1M")
    work = tmp_path / "work"
    atts = Attachments(FuseLoopBackend(), Roots([str(repo)]),
                       StateFile(tmp_path / "attachments.json", "attachments", damaged=Damaged.REFUSE),
                       work_root=work, max_attachments=2)
    before, kids = open_fds(), children()
    gate = Gate(atts.images.open_file)
    monkeypatch.setattr(atts.images, "open_file", gate)
    task = asyncio.create_task(atts.attach(str(repo / "disk.qcow2"), "restore-mounter:mnt-1"))
    await cancel_inside(gate, task)
    assert open_fds() == before and children() <= kids
    assert atts.available_slots == 2 and not work.exists() and not atts.lock.locked()


def crafted_gpt(path: Path, entries_lba: int) -> Path:
    """A raw disk whose GPT header is well formed (CRC and all) but puts its partition entries at
    `entries_lba`: what a guest (whose disk is backed up) or a compromised omad can write."""
    import struct
    import zlib

    ss, size = 512, 4 * 1024 * 1024
    disk = bytearray(size)
    disk[446 + 4] = 0xEE  # protective MBR
    struct.pack_into("<II", disk, 446 + 8, 1, size // ss - 1)
    disk[510:512] = b"\x55\xaa"
    hdr = bytearray(92)
    hdr[:8] = b"EFI PART"
    struct.pack_into("<II", hdr, 8, 0x00010000, 92)
    struct.pack_into("<QQQQ", hdr, 24, 1, size // ss - 1, 34, size // ss - 34)
    struct.pack_into("<QIII", hdr, 72, entries_lba, 128, 128, zlib.crc32(bytes(128 * 128)))
    struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr[:16]) + bytes(4) + bytes(hdr[20:])))
    disk[ss:ss + 92] = hdr
    path.write_bytes(bytes(disk))
    return path


@pytest.mark.root
async def test_a_partition_table_pointing_past_any_disk_is_a_clear_refusal(pool: Pool) -> None:
    """Partition tables come from the guest: a GPT whose entries lie at an LBA no disk has (beyond what a
    file offset can hold) is refused like any damaged table, with nothing left attached, not a 500."""
    for lba in (2**63, 2**64 - 1, 1 << 40):
        image = crafted_gpt(pool.repo / f"gpt-{lba}.raw", lba)
        status, body = await pool.agent.post("/attachments", {"image": str(image), "owner": "restore-mounter:gpt",
                                                              "format": "raw"})
        assert status == 503 and body["error"] == "cannot attach the image", (lba, status, body)
        assert "partition table" in body["details"], body
    assert (await pool.agent.ok("GET", "/attachments"))["attachments"] == []
