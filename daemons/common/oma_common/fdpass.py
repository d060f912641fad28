"""Handing an open file descriptor from an agent to omad over the agent's unix socket (SCM_RIGHTS, unix(7)).

The exchange is one HTTP request on a connection of its own. The agent answers 200 with a small JSON body
whose bytes carry the descriptor as ancillary data, then keeps the connection open while it holds what the
descriptor belongs to (a restore mount); omad closes the connection when it is done with the descriptor.
Any other answer is the one JSON error shape, without a descriptor.

omad reads the answer with recvmsg(2) only, so a descriptor can never be dropped by a plain read; it takes
every descriptor that arrives and closes all of them on any failure: a malformed, short, oversized or slow
answer, a truncated control message (MSG_CTRUNC), or a count other than one. The whole exchange has a
deadline. aiohttp cannot be the client here: it reads with recv(2), which discards ancillary data.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from . import errors

log = logging.getLogger(__name__)

MAX_FDS = 4  # room for more than the one expected, so that extra descriptors are seen (and closed)
MAX_ANSWER = 64 * 1024  # head and body of an answer


# --- the agent's side ---------------------------------------------------------------------------------


async def reply_with_fd(request: web.Request, body: bytes, fd: int, *, timeout: float = 10.0
                        ) -> web.StreamResponse:
    """Send `body` as a 200 answer whose bytes carry a duplicate of `fd`. The caller still owns (and closes)
    `fd`: the descriptor in flight is the kernel's own reference. A failure once the head is out aborts the
    connection (the caller sees a short answer and closes whatever it received)."""
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    resp.content_length = len(body)
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()  # the head only: aiohttp writes no body bytes, we send them below
    try:
        await _send_body(request, body, fd, timeout)
    except OSError as e:
        log.warning("descriptor not handed over: %s", e)
        if request.transport is not None:
            request.transport.abort()
    return resp


async def _send_body(request: web.Request, body: bytes, fd: int, timeout: float) -> None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        raise ConnectionResetError("connection lost before the descriptor was sent")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Our bytes must follow the head on the wire: wait until aiohttp has none left in its buffer.
    while transport.get_write_buffer_size() > 0:
        if transport.is_closing() or loop.time() > deadline:
            raise ConnectionResetError("the head of the answer could not be sent")
        await asyncio.sleep(0.001)
    raw = socket.socket(fileno=sock.fileno())  # the transport's socket object does not offer sendmsg
    try:
        sent = 0
        while sent < len(body):
            try:
                ancillary = [] if sent else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                sent += raw.sendmsg([body[sent:]], ancillary)
            except BlockingIOError:
                if loop.time() > deadline:
                    raise ConnectionResetError("the answer could not be sent in time") from None
                await asyncio.sleep(0.001)
    finally:
        raw.detach()


async def hold_until_closed(request: web.Request, poll: float = 0.05) -> None:
    """Wait until the client closes the connection (it has finished with the descriptor). Polled: aiohttp
    offers no callback for a lost connection, and cancels a handler on it only in some versions (3.8)."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(poll)


# --- omad's side --------------------------------------------------------------------------------------


class HeldFile:
    """A descriptor received from an agent and the connection that keeps the agent's hold; close() both."""

    def __init__(self, fd: int, body: bytes, conn: socket.socket) -> None:
        self.fd = fd
        self.body = body
        self.conn = conn

    async def released(self) -> None:
        """Completes when the agent ends the hold (it closed the connection, e.g. a forced unmount)."""
        loop = asyncio.get_running_loop()
        while True:
            await _readable(loop, self.conn)
            try:
                if not self.conn.recv(4096):
                    return
            except BlockingIOError:
                continue
            except OSError:
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.conn.close()


async def request_fd(socket_path: Path, target: str, *, agent: str, timeout: float = 30.0) -> HeldFile:
    """GET `target` from the agent at `socket_path` and receive its descriptor; errors.* on any failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    fds: list[int] = []
    try:
        status, body = await asyncio.wait_for(_exchange(sock, socket_path, target, agent, fds), timeout)
        if status != 200:
            try:
                err = json.loads(body)
            except ValueError:
                err = {}
            raise errors.from_body(err if isinstance(err, dict) else {}, status)
        if len(fds) != 1:
            raise errors.Unavailable(f"{agent} answered unexpectedly", f"{len(fds)} descriptors instead of one")
        held = HeldFile(fds.pop(), body, sock)
        return held
    except asyncio.TimeoutError as e:
        sock.close()
        raise errors.TimedOut(f"{agent} timed out", f"{agent} did not hand over {target} within {timeout} s") from e
    except OSError as e:
        sock.close()
        raise errors.Unavailable(f"{agent} unavailable", f"cannot reach {agent} at {socket_path}: {e}") from e
    except BaseException:
        sock.close()
        raise
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def target(path: str, params: dict[str, str]) -> str:
    """A request target: the path with its query, each part percent-encoded."""
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
    return path + ("?" + query if query else "")


async def _exchange(sock: socket.socket, path: Path, target: str, agent: str, fds: list[int]) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, str(path))
    await loop.sock_sendall(sock, f"GET {target} HTTP/1.1\r\nHost: {agent}\r\nAccept: application/json\r\n"
                                  "\r\n".encode("ascii"))
    buf = bytearray()
    need: int | None = None  # bytes of head and body, once the head is in
    start = status = 0
    while need is None or len(buf) < need:
        await _readable(loop, sock)
        try:
            data, ancdata, flags, _ = sock.recvmsg(MAX_ANSWER, socket.CMSG_SPACE(MAX_FDS * 4),
                                                   socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            continue
        fds.extend(_descriptors(ancdata))  # taken before any check: whatever arrived gets closed on failure
        if flags & socket.MSG_CTRUNC:
            raise errors.Unavailable(f"{agent} answered unexpectedly", "too many descriptors (truncated)")
        if not data:
            raise errors.Unavailable(f"{agent} answered unexpectedly", "the connection closed mid-answer")
        buf += data
        if len(buf) > MAX_ANSWER:
            raise errors.Unavailable(f"{agent} answered unexpectedly", f"an answer over {MAX_ANSWER} bytes")
        if need is None:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                status, length = _head(bytes(buf[:end]), agent)
                start, need = end + 4, end + 4 + length
    assert need is not None
    if len(buf) > need:
        raise errors.Unavailable(f"{agent} answered unexpectedly", "bytes after the answer")
    return status, bytes(buf[start:])


def _head(head: bytes, agent: str) -> tuple[int, int]:
    """(status, Content-Length) of an answer's head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise errors.Unavailable(f"{agent} answered unexpectedly", f"not an HTTP answer: {lines[0][:80]!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    if length is None or length > MAX_ANSWER:
        raise errors.Unavailable(f"{agent} answered unexpectedly", "an answer without a usable Content-Length")
    return int(parts[1]), length


def _descriptors(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    out: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            out.extend(fds)
    return out


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until `sock` can be read. The reader is removed by the number it was added with: whoever closes
    the socket must first let this return (an entry left behind would be matched to the next socket that
    gets the same number)."""
    fd = sock.fileno()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
