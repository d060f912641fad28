"""omad's qemu-img adapter on real 1 MiB-scale images: full and overlay creation with relative backing files,
info -U of an image a writable qemu-nbd holds, check, compare, and refusals."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path

import pytest

from oma_common.errors import Invalid, NotFound, Unavailable
from omad.adapters.qemu_img import QemuImg

MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_full_and_overlay_with_a_relative_backing_file(tmp_path: Path) -> None:
    q = QemuImg(timeout=30)
    base, top = tmp_path / "vm" / "full.qcow2", tmp_path / "vm" / "inc.qcow2"
    base.parent.mkdir()
    await q.create(base, 4 * MiB)
    await q.create(top, 6 * MiB, backing_file="full.qcow2")  # a disk that grew
    info = await q.info(top)
    assert (info.format, info.virtual_size, info.backing_file, info.backing_format) == ("qcow2", 6 * MiB,
                                                                                         "full.qcow2", "qcow2")
    chain = await q.chain(top)
    assert [Path(i.path).name for i in chain] == ["inc.qcow2", "full.qcow2"]
    moved = tmp_path / "moved"
    shutil.move(str(base.parent), moved)  # the chain moves as a whole
    assert [i.virtual_size for i in await q.chain(moved / "inc.qcow2")] == [6 * MiB, 4 * MiB]
    assert (await q.check(moved / "inc.qcow2")).ok

    with pytest.raises(Invalid, match="already exists"):
        await q.create(moved / "inc.qcow2", MiB)
    with pytest.raises(ValueError):
        await q.create(tmp_path / "x.qcow2", MiB, backing_file=str(moved / "full.qcow2"))
    with pytest.raises(Invalid):
        await q.create(tmp_path / "x.qcow2", 1000)
    with pytest.raises(Unavailable, match="Could not open"):
        await q.create(tmp_path / "x.qcow2", MiB, backing_file="nothing.qcow2")
    assert not (tmp_path / "x.qcow2").exists()
    with pytest.raises(NotFound):
        await q.info(tmp_path / "nothing.qcow2")


async def test_info_and_compare_while_qemu_nbd_writes(tmp_path: Path) -> None:
    q = QemuImg(timeout=30)
    image, raw = tmp_path / "disk.qcow2", tmp_path / "disk.raw"
    await q.create(image, 8 * MiB)
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(os.urandom(MiB))
    port = free_port()
    nbd = await asyncio.create_subprocess_exec(
        "qemu-nbd", "--persistent", "--format=qcow2", "--export-name=d", "--bind=127.0.0.1", f"--port={port}",
        "--shared=10", "--", str(image), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        copy = await asyncio.create_subprocess_exec("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(raw),
                                                    f"nbd://127.0.0.1:{port}/d")
        assert await copy.wait() == 0
        info = await q.info(image)  # -U: the image is locked by qemu-nbd
        assert info.virtual_size == 8 * MiB and info.actual_size > 0
        assert await q.compare(image, raw)
    finally:
        nbd.terminate()
        await nbd.wait()
    assert (await q.check(image)).ok
    with open(raw, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"x")
    assert not await q.compare(image, raw)
