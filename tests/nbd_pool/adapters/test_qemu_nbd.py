"""Tests for the qemu-nbd adapter with real qemu-nbd and real NBD clients (qemu-img, nbdcopy, qemu-io)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio

from nbd_pool.adapters import nbd_probe as nbd
from nbd_pool.adapters.listen_fd import PortInUse, listen
from nbd_pool.adapters.nbd_probe import ExportNotFound, probe_export
from nbd_pool.adapters.qemu_nbd import ExportOptions, ExportRecord, QemuNbdExport, build_argv
from oma_common.command import run
from oma_common.process import ChildFailed, PidMismatch

from ...lib.filetree import path_sha256

pytestmark = [pytest.mark.timeout(60)]

MIB = 1024 * 1024


def url(export: QemuNbdExport) -> str:
    return f"nbd://127.0.0.1:{export.port}/{export.name}"


def make_source(path: Path, size: int = 64 * MIB) -> Path:
    """Half random data, half zeros (the zeros written as data, so clients must detect them)."""
    with open(path, "wb") as f:
        f.write(os.urandom(size // 2))
        f.write(bytes(size // 2))
    return path


@pytest.fixture(autouse=True)
def _tools(helpers: Any) -> None:
    helpers.need("qemu-nbd", "qemu-img", "qemu-io", "nbdcopy")


@pytest_asyncio.fixture
async def exports() -> AsyncIterator[list[QemuNbdExport]]:
    """Collects the exports a test starts and stops them whatever happens."""
    started: list[QemuNbdExport] = []
    yield started
    for e in started:
        await e.stop(timeout=5)


async def start(exports: list[QemuNbdExport], path: Path, port: int, name: str = "disk0", **opts: object) -> QemuNbdExport:
    export = QemuNbdExport(path, name, "127.0.0.1", port, ExportOptions(**opts))  # type: ignore[arg-type]
    exports.append(export)
    await export.start(timeout=10)
    return export


def test_argv_of_a_persistent_export() -> None:
    argv = build_argv(Path("/repo/vm1/disk0.qcow2"), "vm1-disk0", ExportOptions())
    assert argv == [
        "qemu-nbd", "--persistent", "--format=qcow2", "--export-name=vm1-disk0", "--shared=10", "--cache=none", "--aio=io_uring", "--discard=unmap",
        "--detect-zeroes=unmap", "--", "/repo/vm1/disk0.qcow2",
    ]  # fmt: skip
    plain = ExportOptions(fmt="raw", read_only=True, shared=5, cache=None, aio=None, discard=None, detect_zeroes=None)
    argv = build_argv(Path("/dev/vdb"), "r", plain, bind=("0.0.0.0", 10100))
    assert argv[4:6] == ["--bind=0.0.0.0", "--port=10100"]  # how exports started before socket activation ran
    assert "--read-only" in argv and "--format=raw" in argv and "--shared=5" in argv
    assert not [a for a in argv if a.startswith(("--cache", "--aio", "--discard", "--detect"))]
    assert "--fork" not in argv


def test_argv_refuses_what_qemu_would_refuse() -> None:
    with pytest.raises(ValueError, match="absolute"):
        build_argv(Path("-rf"), "x", ExportOptions())
    with pytest.raises(ValueError):
        ExportOptions(aio="native", cache="writeback")
    with pytest.raises(ValueError):
        ExportOptions(detect_zeroes="unmap", discard="ignore")
    with pytest.raises(ValueError):
        ExportOptions(fmt="vmdk")
    with pytest.raises(ValueError):
        ExportOptions(shared=0)
    assert ExportOptions.from_dict(ExportOptions(read_only=True).to_dict()) == ExportOptions(read_only=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("client", ["qemu-img", "nbdcopy"])
async def test_write_64mib_reads_back_identical(tmp_path: Path, free_port: int, exports: list[QemuNbdExport], client: str) -> None:
    src = make_source(tmp_path / "src.raw")
    target = tmp_path / "target.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", target, "64M"])
    export = await start(exports, target, free_port)
    assert export.info is not None and export.info.size == 64 * MIB and not export.info.read_only
    if client == "qemu-img":
        await run(["qemu-img", "convert", "-n", "-f", "raw", src, "-O", "raw", url(export)], timeout=60)
    else:
        await run(["nbdcopy", src, url(export)], timeout=60)
    # Read back through the export, and from the file once qemu-nbd has flushed and exited.
    assert "identical" in (await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, url(export)])).text
    await export.stop()
    assert not export.running
    assert "identical" in (await run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, target])).text
    back = tmp_path / "back.raw"
    await run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", target, back])
    assert path_sha256(back) == path_sha256(src)


@pytest.mark.asyncio
async def test_two_clients_at_once(tmp_path: Path, free_port: int, exports: list[QemuNbdExport]) -> None:
    target = tmp_path / "t.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", target, "64M"])
    export = await start(exports, target, free_port, shared=5)
    await run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", url(export)])
    # Two interactive qemu-io sessions stay connected until told to quit.
    clients = [
        await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", url(export),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        for _ in range(200):
            if len(await export.clients()) == 2:
                break
            await asyncio.sleep(0.02)
        connected = await export.clients()
        assert len(connected) == 2 and all(c.host == "127.0.0.1" for c in connected)
        outs = await asyncio.gather(*(c.communicate(b"read -P 0xab 1M 64k\nquit\n") for c in clients))
        for c, (out, err) in zip(clients, outs):
            assert c.returncode == 0, err
            assert b"read 65536/65536" in out and b"Pattern verification failed" not in out
    finally:
        for c in clients:
            if c.returncode is None:
                c.kill()
                await c.wait()
    assert await export.clients() == []


async def raw_nbd_write(port: int, name: str, data: bytes, offset: int = 0) -> int:
    """Write through a minimal NBD client of our own (NBD_OPT_GO, one NBD_CMD_WRITE, simple reply) and
    return the server's error code: unlike qemu-io, it does not refuse on the client side first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readexactly(18)
        writer.write(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        raw = name.encode()
        payload = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        writer.write(struct.pack(">QII", nbd.IHAVEOPT, 7, len(payload)) + payload)  # NBD_OPT_GO
        while True:
            _, _, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
            await reader.readexactly(length)
            assert not rtype & nbd.REP_FLAG_ERROR
            if rtype == nbd.REP_ACK:
                break
        writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 1, 42, offset, len(data)) + data)  # NBD_CMD_WRITE
        magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
        assert magic == 0x67446698 and handle == 42
        writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 2, 43, 0, 0))  # NBD_CMD_DISC
        await writer.drain()
        return int(error)
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_read_only_export_refuses_writes(tmp_path: Path, free_port: int, exports: list[QemuNbdExport]) -> None:
    target = tmp_path / "ro.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", target, "64M"])
    export = await start(exports, target, free_port, read_only=True)
    assert export.info is not None and export.info.read_only
    # A well-behaved client sees the read-only flag and refuses to open for writing...
    res = await run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", url(export)], check=False)
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    # ...and the server itself refuses a write sent anyway (qemu-nbd 7.2 answers EINVAL: EROFS has no NBD code).
    assert await raw_nbd_write(free_port, "disk0", b"\xab" * 4096) != 0
    res = await run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 64k", url(export)])
    assert b"Pattern verification failed" not in res.stdout
    # The same raw client can write into a writable export, so the refusal above is the server's.
    rw = tmp_path / "rw.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", rw, "64M"])
    port2 = free_port + 1 if free_port < 65535 else free_port - 1
    await start(exports, rw, port2, name="rw")
    assert await raw_nbd_write(port2, "rw", b"\xab" * 4096) == 0


@pytest.mark.asyncio
async def test_missing_image_fails_with_qemu_message(tmp_path: Path, free_port: int) -> None:
    export = QemuNbdExport(tmp_path / "missing.qcow2", "d", "127.0.0.1", free_port)
    with pytest.raises(ChildFailed) as info:
        await export.start(timeout=10)
    assert info.value.returncode == 1 and "missing.qcow2" in str(info.value)
    assert not export.running


@pytest.mark.asyncio
async def test_port_taken_by_a_stranger_fails(tmp_path: Path, free_port: int) -> None:
    target = tmp_path / "t.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", target, "64M"])
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", free_port)
    async with server:
        export = QemuNbdExport(target, "d", "127.0.0.1", free_port)
        with pytest.raises(PortInUse, match=f"127.0.0.1:{free_port} is already bound"):
            await export.start(timeout=10)
        assert export.pid is None  # known before anything was spawned


def pidfd_getfd(pid: int, fd: int) -> socket.socket:
    """A duplicate of another process's socket (pidfd_getfd(2), Linux 5.6; Python 3.11 has no wrapper)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd, the same number on every architecture
        if dup < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    finally:
        os.close(pidfd)
    return socket.socket(fileno=dup)


async def test_connections_qemu_nbd_accepts_have_nodelay(tmp_path: Path, free_port: int,
                                                          exports: list[QemuNbdExport]) -> None:
    """Without TCP_NODELAY on qemu-nbd's side, a client with requests in flight waits ~40 ms for delayed
    ACKs between replies; qemu-nbd 7.2 sets it nowhere, so it must inherit it from the listener we bind."""
    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd of another process needs CAP_SYS_PTRACE")
    target = tmp_path / "t.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", target, "64M"])
    export = await start(exports, target, free_port)
    assert export.pid is not None
    assert psutil.Process(export.pid).cmdline() == export.argv  # exec'd into qemu-nbd, same pid
    clients = [await asyncio.open_connection("127.0.0.1", free_port) for _ in range(2)]  # --shared: both served
    try:
        for reader, _ in clients:
            assert await reader.readexactly(8) == b"NBDMAGIC"
        ours = {w.get_extra_info("sockname")[1] for _, w in clients}
        proc = psutil.Process(export.pid)
        accepted = [c for c in (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")
                    if c.raddr and c.raddr.port in ours]
        assert len(accepted) == 2
        for conn in accepted:
            with pidfd_getfd(export.pid, conn.fd) as sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for _, w in clients:
            w.close()
    await export.stop()
    listen("127.0.0.1", free_port).close()  # nbd-pool kept no copy of the listener: the port is free again


@pytest.mark.asyncio
async def test_same_image_twice_is_refused_by_its_lock(tmp_path: Path, free_port: int, exports: list[QemuNbdExport]) -> None:
    target = tmp_path / "t.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", target, "64M"])
    await start(exports, target, free_port)
    second = QemuNbdExport(target, "d2", "127.0.0.1", free_port + 1 if free_port < 65535 else free_port - 1)
    with pytest.raises(ChildFailed, match="lock"):
        await second.start(timeout=10)


@pytest.mark.asyncio
async def test_released_export_is_adopted_and_keeps_serving(tmp_path: Path, free_port: int) -> None:
    target = tmp_path / "t.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", target, "64M"])
    export = QemuNbdExport(target, "survivor", "127.0.0.1", free_port)
    await export.start()
    saved = export.release().to_dict()  # as the daemon persists it before exiting
    pid = saved["process"]["pid"]
    assert psutil.pid_exists(pid)
    adopted = QemuNbdExport.adopt(ExportRecord.from_dict(saved))
    try:
        assert adopted.pid == pid and adopted.running
        await run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", url(adopted)])
        assert (await adopted.probe()).size == 64 * MIB
    finally:
        await adopted.stop()
    assert not adopted.running
    with pytest.raises(PidMismatch):
        QemuNbdExport.adopt(ExportRecord.from_dict(saved))


@pytest.mark.asyncio
async def test_probe_names_the_export(tmp_path: Path, free_port: int, exports: list[QemuNbdExport]) -> None:
    target = tmp_path / "t.qcow2"
    await run(["qemu-img", "create", "-q", "-f", "qcow2", target, "64M"])
    export = await start(exports, target, free_port, name="right")
    with pytest.raises(ExportNotFound):
        await probe_export("127.0.0.1", free_port, "wrong")
    # The probe closes right after NBD_OPT_ABORT without waiting for the ACK: qemu-nbd takes it quietly.
    for _ in range(10):
        assert (await probe_export("127.0.0.1", free_port, "right")).size == 64 * MIB
    await asyncio.sleep(0.2)
    assert export.stderr_tail() == ""
