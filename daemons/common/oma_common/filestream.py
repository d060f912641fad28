"""Sending an open file as an HTTP response: one byte range (RFC 9110 §14), Content-Disposition (RFC 6266),
and the bytes by sendfile(2) from the descriptor to the socket, never through our memory.

omad serves the descriptors restore-mounter hands it (oma_common.fdpass) with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import re
import select
import socket
import threading
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from urllib.parse import quote

from aiohttp import web

from . import errors
from .blocking import run_blocking, wait_through
from .web import error_body, json_response

log = logging.getLogger(__name__)

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
READ_CHUNK = 1024 * 1024  # the fallback's read size, where sendfile(2) cannot be used


class Unsatisfiable(Exception):
    """The requested range lies outside the file (416)."""


@dataclasses.dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one range a `Range` header asks for; None means "send it all" (no header, a syntax we ignore,
    or several ranges, which a server may answer in full: RFC 9110 §14.2)."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable()
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None  # invalid: ignore the header
    if start >= size:
        raise Unsatisfiable()
    return ByteRange(start, end)


def content_disposition(name: str, kind: str = "attachment") -> str:
    """A header that names the file safely: an ASCII fallback and the exact UTF-8 name (RFC 6266 §4.3)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in name) or "download"
    exact = quote(name.encode("utf-8", "surrogateescape"), safe="")
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


@dataclasses.dataclass(frozen=True)
class FileMeta:
    """What a download's headers say about the file."""

    name: str  # the file's own name (Content-Disposition)
    size: int
    mtime: float  # epoch seconds (Last-Modified)
    etag: str  # quoted, e.g. "\"2a-400-17b\"" (If-Range compares it)
    mime_type: str

    @classmethod
    def of(cls, name: str, st: os.stat_result, mime_type: str) -> FileMeta:
        return cls(name, st.st_size, st.st_mtime, f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"', mime_type)


def abort(request: web.Request) -> None:
    """End the connection without finishing the body: a truncated stream must never look complete."""
    if request.transport is not None:
        request.transport.abort()


async def send_file(request: web.Request, fd: int, meta: FileMeta,
                    stop: Callable[[], Awaitable[object]] | None = None) -> web.StreamResponse:
    """Answer `request` with the file open as `fd` (200, or 206 for one satisfiable range, 416 outside it).
    `stop()`, when it completes first, cuts the response off (the file's owner wants it back)."""
    size = meta.size
    if_range = request.headers.get("If-Range")
    try:
        rng = parse_range(request.headers.get("Range"), size) if if_range in (None, meta.etag) else None
    except Unsatisfiable:
        err = errors.Invalid("range not satisfiable", f"the file has {size} bytes")
        return json_response(error_body(err), status=416, headers={"Content-Range": f"bytes */{size}"})
    resp = web.StreamResponse(status=206 if rng else 200)
    resp.headers.update({
        "Accept-Ranges": "bytes", "ETag": meta.etag, "Content-Disposition": content_disposition(meta.name),
        "Content-Type": meta.mime_type, "Last-Modified": formatdate(meta.mtime, usegmt=True),
    })
    start, length = (rng.start, rng.length) if rng else (0, size)
    if rng:
        resp.headers["Content-Range"] = rng.content_range(size)
    resp.content_length = length
    await resp.prepare(request)
    copy = asyncio.ensure_future(_copy(request, resp, fd, start, length, meta.name))
    watch = asyncio.ensure_future(stop()) if stop is not None else None
    try:
        if watch is not None:
            await asyncio.wait([copy, watch], return_when=asyncio.FIRST_COMPLETED)
            if not copy.done():
                log.warning("download of %s cut off: its file was taken back", meta.name)
                copy.cancel()
                abort(request)
        await copy
        await resp.write_eof()
    except asyncio.CancelledError:
        copy.cancel()
        with contextlib.suppress(BaseException):
            await copy  # the descriptor must be out of use before the caller closes it
        if watch is not None and watch.done():
            return resp
        raise
    except ConnectionError:
        log.info("download of %s stopped: the client went away", meta.name)
    except Exception:
        log.exception("download of %s failed after its first byte; aborting the response", meta.name)
        abort(request)
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch  # done with what it watches before the caller closes that
    return resp


async def send_framed(request: web.Request, headers: dict[str, str], head: bytes, fd: int, size: int,
                      tail: bytes, name: str) -> web.StreamResponse:
    """Answer 200 with `head`, the first `size` bytes of the open file `fd`, then `tail` (e.g. a JSON document
    around an array kept in a file). The file's bytes go by sendfile(2); the descriptor must stay open until
    the call returns."""
    resp = web.StreamResponse(headers=headers)
    resp.content_length = len(head) + size + len(tail)
    await resp.prepare(request)
    try:
        await resp.write(head)
        await _copy(request, resp, fd, 0, size, name)
        await resp.write(tail)
        await resp.write_eof()
    except ConnectionError:
        log.info("%s stopped: the client went away", name)
    except Exception:
        log.exception("%s failed after its first byte; aborting the response", name)
        abort(request)
    return resp


async def _copy(request: web.Request, resp: web.StreamResponse, fd: int, start: int, length: int,
                name: str) -> None:
    """sendfile(2) from the file to the socket (zero-copy) in a thread of its own, or pread-and-write where
    sendfile cannot be used (no plain socket under the transport, e.g. TLS)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost")
    sock = transport.get_extra_info("socket")
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_SEQUENTIAL)  # the kernel's readahead doubled
    # TCP's send buffer is left to its autotuning (tcp(7)): setting SO_SNDBUF turns that off, and no fixed
    # size measured faster on loopback; nor did the size of each sendfile(2) call (64 KiB to 1 GiB).
    if sock is not None and transport.get_extra_info("sslcontext") is None:
        await _flushed(transport)  # the head must be on the wire before our bytes
        sent = await _SendfileThread(sock.fileno(), fd, start, length, name).run()
        if sent == length:
            return
        start, length = start + sent, length - sent  # sendfile(2) refused the file before its first byte
    await _read_and_write(resp, fd, start, length, name)


async def _flushed(transport: asyncio.BaseTransport) -> None:
    """Wait until aiohttp has written everything it buffered (the response head) to the socket."""
    assert isinstance(transport, asyncio.WriteTransport)
    delay = 0.001
    while transport.get_write_buffer_size() > 0:
        if transport.is_closing():
            raise ConnectionResetError("connection lost")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


class _SendfileThread:
    """The bytes of one response, sent by sendfile(2) from a thread: on a file that is not in the page cache
    (a backup image read through FUSE) sendfile blocks on the reads, for as long as the whole file when the
    client keeps up with the disk (measured: 7 s for 1 GiB), and omad's event loop must not wait with it.

    The thread writes to a duplicate of the connection's socket, so that the transport closing its own
    descriptor (a client gone, an abort) can never make it write into whatever reuses that number. On
    cancellation the connection is shut down, which ends a sendfile waiting on the socket at once; one
    waiting on the file ends with that read. The caller's descriptor is in use until run() returns, cancelled
    or not."""

    CHUNK = 8 * 1024 * 1024  # bytes per sendfile(2) call: how long a stop may wait on a slow file
    POLL_MS = 200  # how often a thread waiting for room in the socket looks for a stop

    def __init__(self, sock_fd: int, fd: int, start: int, length: int, name: str) -> None:
        self.sock = socket.socket(fileno=os.dup(sock_fd))
        self.fd, self.start, self.length, self.name = fd, start, length, name
        self.stopping = threading.Event()

    async def run(self) -> int:
        """Bytes sent: `length`, or fewer when sendfile(2) refused the file before its first byte (then the
        rest is for another way). Connection errors and the file ending early raise."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()

        def settle(result: int | None, exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(result or 0)

        def work() -> None:
            try:
                result = self._send()
            except BaseException as e:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(settle, None, e)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        threading.Thread(target=work, name=f"sendfile {self.name}"[:64], daemon=True).start()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            self.stopping.set()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            # The thread uses the caller's descriptor and our socket: it must be done before either is closed,
            # also when a second cancellation (a shutdown after the client left) arrives meanwhile.
            await wait_through(done)
            raise
        finally:
            # Closed here, not in the thread: shutdown() above can never meet a number reused meanwhile.
            if done.done():
                self.sock.close()
            else:
                done.add_done_callback(lambda _: self.sock.close())

    def _send(self) -> int:
        pos, end = self.start, self.start + self.length
        waiting = select.poll()
        waiting.register(self.sock.fileno(), select.POLLOUT)
        while pos < end:
            if self.stopping.is_set():
                raise ConnectionAbortedError("download stopped")
            try:
                n = os.sendfile(self.sock.fileno(), self.fd, pos, min(self.CHUNK, end - pos))
            except BlockingIOError:
                for _, events in waiting.poll(self.POLL_MS):
                    if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        raise ConnectionResetError("the client closed the connection") from None
                continue
            except OSError as e:
                if pos == self.start and e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    return 0  # this file cannot be spliced: the caller reads it instead
                raise
            if n == 0:
                raise OSError(f"{self.name} ended at {pos - self.start} of {self.length} bytes")
            pos += n
        return pos - self.start


async def _read_and_write(resp: web.StreamResponse, fd: int, start: int, length: int, name: str) -> None:
    """The fallback: pread in a worker thread, write through aiohttp."""
    pos, end = start, start + length
    while pos < end:
        # Cancelled, this still waits for the read: the thread uses the descriptor the caller then closes.
        data = await run_blocking(os.pread, fd, min(READ_CHUNK, end - pos), pos)
        if not data:
            raise OSError(f"{name} ended at {pos - start} of {length} bytes")
        await resp.write(data)
        pos += len(data)
