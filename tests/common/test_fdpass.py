"""Descriptor passing (oma_common.fdpass) against a real aiohttp agent app and against hand-made bad answers:
a good answer hands over exactly one descriptor; a short, malformed, oversized, silent or over-generous answer
fails with a domain error, and no received descriptor is left open in our process."""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from oma_common import errors, fdpass
from oma_common.web import error_response

pytestmark = pytest.mark.timeout(20)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@contextlib.asynccontextmanager
async def raw_server(path: Path, answer: Callable[[socket.socket], Awaitable[None]]) -> AsyncIterator[None]:
    """A unix socket that reads one request head and answers with `answer(conn)`."""
    loop = asyncio.get_running_loop()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()
    srv.setblocking(False)

    async def serve() -> None:
        conn, _ = await loop.sock_accept(srv)
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await loop.sock_recv(conn, 4096)
            await answer(conn)
            await asyncio.sleep(30)  # hold the connection: the client must give up by itself

    task = asyncio.create_task(serve())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        srv.close()


def send_with_fds(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    conn.setblocking(True)
    conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


def ok_head(length: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()


@pytest.mark.parametrize("case", ["short", "two_fds", "five_fds", "no_fd", "garbage", "huge", "trailing", "silent"])
async def test_bad_answers_fail_and_leak_nothing(tmp_path: Path, case: str) -> None:
    files = [os.open("/etc/hostname", os.O_RDONLY) for _ in range(5)]
    sock = tmp_path / "a.sock"

    async def answer(conn: socket.socket) -> None:
        body = b'{"x": 1}'
        if case == "short":  # the connection ends mid-body, descriptor already sent
            send_with_fds(conn, ok_head(100) + body, files[:1])
            conn.shutdown(socket.SHUT_WR)
        elif case in ("two_fds", "five_fds"):
            send_with_fds(conn, ok_head(len(body)) + body, files[:2] if case == "two_fds" else files)
        elif case == "no_fd":
            send_with_fds(conn, ok_head(len(body)) + body, [])
        elif case == "garbage":
            send_with_fds(conn, b"SSH-2.0-nonsense\r\n\r\n", files[:1])
        elif case == "huge":
            send_with_fds(conn, ok_head(10 ** 9), files[:1])
        elif case == "trailing":
            send_with_fds(conn, ok_head(len(body)) + body + b"more", files[:1])
        # silent: nothing at all

    before = open_fds()
    async with raw_server(sock, answer):
        with pytest.raises((errors.Unavailable, errors.TimedOut)):
            await fdpass.request_fd(sock, "/open", agent="test-agent", timeout=1.0)
    for fd in files:
        os.close(fd)
    left = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before}
    assert not left, f"left open: {left}"


@dataclasses.dataclass
class Agent:
    runner: web.AppRunner
    released: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    holders: list[asyncio.Task[object]] = dataclasses.field(default_factory=list)


async def agent_app(path: Path, target: Path) -> Agent:
    """A real aiohttp app answering /open with fdpass, /missing with the one error shape."""
    agent = Agent(web.AppRunner(web.Application()))

    async def open_file(request: web.Request) -> web.StreamResponse:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            resp = await fdpass.reply_with_fd(request, b'{"name": "f"}', fd)
        finally:
            os.close(fd)
        agent.holders.append(asyncio.current_task())  # type: ignore[arg-type]
        await fdpass.hold_until_closed(request, poll=0.02)
        agent.released.set()
        return resp

    async def missing(request: web.Request) -> web.StreamResponse:
        return error_response(errors.NotFound("no such file", "/missing does not exist"))

    agent.runner.app.router.add_get("/open", open_file)
    agent.runner.app.router.add_get("/missing", missing)
    await agent.runner.setup()
    await web.UnixSite(agent.runner, str(path)).start()
    return agent


async def test_a_descriptor_is_handed_over_and_the_hold_ends_when_we_close(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"0123456789" * 1000)
    sock = tmp_path / "agent.sock"
    agent = await agent_app(sock, target)
    try:
        before = open_fds()
        for _ in range(3):
            held = await fdpass.request_fd(sock, "/open", agent="test-agent", timeout=5)
            assert held.body == b'{"name": "f"}'
            assert os.pread(held.fd, 10, 5) == b"5678901234"
            assert os.fstat(held.fd).st_ino == target.stat().st_ino
            agent.released.clear()
            held.close()
            await asyncio.wait_for(agent.released.wait(), 5)  # the agent's hold ended with our close
        with pytest.raises(errors.NotFound) as e:
            await fdpass.request_fd(sock, "/missing", agent="test-agent", timeout=5)
        assert e.value.details == "/missing does not exist"
    finally:
        await agent.runner.cleanup()
    assert open_fds() <= before  # (the agent's side of each connection lives in this process too)


async def test_the_agent_ending_the_hold_is_noticed(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"x")
    sock = tmp_path / "agent.sock"
    agent = await agent_app(sock, target)
    try:
        held = await fdpass.request_fd(sock, "/open", agent="test-agent", timeout=5)
        try:
            watcher = asyncio.create_task(held.released())
            await asyncio.sleep(0.1)
            assert not watcher.done()
            for task in agent.holders:
                task.cancel()  # as a forced unmount cancels the mount's holders
            await asyncio.wait_for(watcher, 5)
        finally:
            held.close()
    finally:
        await agent.runner.cleanup()
