"""Sending a file as an HTTP answer (oma_common.filestream) through a real aiohttp server over TCP: the bytes
whole and by range, 416, If-Range, a client that goes away, a file taken back mid-way, and sendfile(2) kept
off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from oma_common import filestream

from ..lib.gate import Gate

pytestmark = pytest.mark.timeout(30)

MiB = 1024 * 1024


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    with path.open("wb") as f:
        for i in range(48):
            f.write(hashlib.sha256(str(i).encode()).digest() * (MiB // 32))
    return path


@contextlib.asynccontextmanager
async def serving(path: Path, stop: Callable[[], Awaitable[object]] | None = None) -> AsyncIterator[str]:
    """A real aiohttp server answering GET /f with `path`, sent by filestream.send_file."""

    async def handler(request: web.Request) -> web.StreamResponse:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            meta = filestream.FileMeta.of(path.name, os.fstat(fd), "application/octet-stream")
            return await filestream.send_file(request, fd, meta, stop=stop)
        finally:
            os.close(fd)

    app = web.Application()
    app.router.add_get("/f", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/f"
    finally:
        await runner.cleanup()


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, CIMultiDict[str]]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, await r.read(), CIMultiDict(r.headers)


async def test_whole_file_and_ranges(data_file: Path) -> None:
    data = data_file.read_bytes()
    size = len(data)
    async with serving(data_file) as url:
        status, body, headers = await get(url)
        assert status == 200 and body == data and headers["Content-Length"] == str(size)
        assert headers["Accept-Ranges"] == "bytes" and "Transfer-Encoding" not in headers
        for header, start, end in [("bytes=0-99", 0, 99), ("bytes=1048570-9437190", 1048570, 9437190),
                                   (f"bytes={size - 10}-", size - 10, size - 1), ("bytes=-5", size - 5, size - 1),
                                   ("bytes=100-", 100, size - 1)]:
            status, body, headers = await get(url, {"Range": header})
            assert status == 206, header
            assert headers["Content-Range"] == f"bytes {start}-{end}/{size}"
            assert body == data[start:end + 1], header
        status, body, headers = await get(url, {"Range": f"bytes={size}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}" and b"not satisfiable" in body
        status, body, headers = await get(url, {"Range": "bytes=0-1,3-4"})
        assert status == 200 and body == data  # several ranges: answered in full
        etag = headers["ETag"]
        status, body, _ = await get(url, {"Range": "bytes=1-2", "If-Range": etag})
        assert status == 206 and body == data[1:3]
        status, body, _ = await get(url, {"Range": "bytes=1-2", "If-Range": '"other"'})
        assert status == 200 and body == data


async def test_sendfile_runs_off_the_event_loop(data_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file outside the page cache each sendfile(2) waits for the disk (through FUSE for a backup):
    the event loop must never be the one waiting."""
    callers: set[int] = set()
    real = os.sendfile

    def recording(*args: int) -> int:
        callers.add(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(os, "sendfile", recording)
    async with serving(data_file) as url:
        status, body, _ = await get(url)
    assert status == 200 and body == data_file.read_bytes()
    assert callers and threading.get_ident() not in callers


async def test_a_client_that_goes_away_leaves_nothing_open(data_file: Path) -> None:
    before = open_fds()
    async with serving(data_file) as url:
        port = int(url.split(":")[2].split("/")[0])
        loop = asyncio.get_running_loop()
        for _ in range(3):
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n")
            await loop.sock_recv(sock, 4096)  # the head and the first bytes
            sock.close()  # with most of the file unsent
        status, body, _ = await get(url)  # the server is still fine
        assert status == 200 and body == data_file.read_bytes()
    for _ in range(100):
        if open_fds() <= before:
            break
        await asyncio.sleep(0.05)
    assert open_fds() <= before
    assert not [t for t in threading.enumerate() if t.name.startswith("sendfile")]


async def test_a_file_taken_back_cuts_the_answer_off(data_file: Path) -> None:
    taken_back = asyncio.Event()
    async with serving(data_file, stop=taken_back.wait) as url:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            assert r.status == 200
            await r.content.readexactly(MiB)
            taken_back.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                while await r.content.read(4 * MiB):
                    pass
    # The sending thread ends once its current sendfile returns: on a loaded machine that can be a moment after
    # the client saw the cut (bounded, so a thread that never ends still fails).
    for _ in range(100):
        if not [t for t in threading.enumerate() if t.name.startswith("sendfile")]:
            break
        await asyncio.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith("sendfile")]


@pytest.mark.parametrize("how", ["sendfile", "pread"])
async def test_a_send_cancelled_again_still_waits_for_its_thread(data_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 how: str) -> None:
    """Cancelled (the client left), then cancelled again (the daemon stopping) while its thread is in a read:
    the send returns only once the thread is done with the descriptor its caller closes right after."""
    fd = os.open(data_file, os.O_RDONLY | os.O_CLOEXEC)
    ours, peer = socket.socketpair()
    try:
        gate = Gate(getattr(os, how))
        monkeypatch.setattr(os, how, gate)
        if how == "sendfile":
            task = asyncio.create_task(filestream._SendfileThread(ours.fileno(), fd, 0, MiB, "data").run())
        else:
            task = asyncio.create_task(filestream._read_and_write(web.StreamResponse(), fd, 0, MiB, "data"))
        assert await asyncio.to_thread(gate.entered.wait, 30)
        for _ in range(2):
            task.cancel()
            await asyncio.sleep(0.02)
            assert not task.done(), "the send ended while its thread still reads the descriptor"
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.returned.is_set()
    finally:
        os.close(fd)
        ours.close()
        peer.close()
