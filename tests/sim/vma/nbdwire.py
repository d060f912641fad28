"""The simulated VMA's own NBD client for changed extents: the NBD wire protocol over TCP (fixed newstyle
handshake, NBD_OPT_GO, simple replies), as the real VMA's client speaks it to the OMA's qemu-nbd exports.

Requests are pipelined (a window of them in flight per connection) and spread over several connections to
the same export, like the real VMA's 2 connections per disk. Reference: the NBD protocol document
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).

The handshake runs on the event loop; the transfer itself runs in one thread per connection with a blocking
socket, because per request that is the least work the protocol allows (bench/sim_writer measured it): one
preadv of the source into a reused buffer, one sendmsg of the header and that buffer (no copy in Python: 3.11's
asyncio transports join all buffers into one new bytes), and replies parsed many at a time from one recv_into,
where asyncio's streams cost a readexactly, a future and its callbacks per reply. Acknowledged data reaches the
caller's progress callback on the event loop's thread, batched. Cancelling, or any connection failing, shuts
every socket down, which ends a blocked send or receive at once; the threads are waited for before the call
returns, and the sockets and the source are closed by the caller's side only after that.

Measured (1,638 random 64 KiB blocks into a null-co qemu-nbd, 2 connections): the client's CPU went from
0.12 s (asyncio streams) to 0.05-0.06 s, on par with a bare blocking prototype without zero detection or
progress; ~90 receives for ~1,640 replies. os.sendfile of data blocks (after a 4 KiB probe for zeros) was
tried and dropped: no gain for the client, twice the CPU in qemu-nbd."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import struct
import threading
import time
from typing import Callable, Optional, Sequence

from .cbt import BLOCK_SIZE, Extent, blocks_in
from .nbdclient import NbdTarget, TransferError

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0

TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_WRITE_ZEROES = 1 << 6

CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6

REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")  # magic, error, handle

# qemu-nbd refuses requests above 32 MiB (NBD_MAX_BUFFER_SIZE); stay well below.
MAX_REQUEST = 4 * 1024 * 1024
# Requests in flight per connection.
WINDOW = 64
# Acknowledged bytes reach the progress callback at most this often (seconds), and at the end.
PROGRESS_INTERVAL = 0.02
HANDSHAKE_TIMEOUT = 30.0


@dataclasses.dataclass
class Written:
    """What write_extents sent: bytes and blocks as data, blocks as write-zeroes."""

    data_bytes: int = 0
    data_blocks: int = 0
    zero_blocks: int = 0
    zeros_found: int = 0  # bytes of data extents that read as zeros (sent as write-zeroes instead)


async def write_extents(source: str, target: NbdTarget, extents: Sequence[Extent], *, connections: int = 2,
                        block_size: int = BLOCK_SIZE,
                        on_progress: Optional[Callable[[int], None]] = None) -> Written:
    """Read each extent of the raw `source` (and nothing else) and write it into the export over
    `connections` connections: blocks that read as all zeros go as write-zeroes, the rest as data; each
    connection ends with a flush and NBD_CMD_DISC. `on_progress(data_bytes)` runs on the event loop's thread
    as data writes are acknowledged."""
    chunks = [Extent(off, min(MAX_REQUEST, ext.end - off), ext.zero)
              for ext in extents for off in range(ext.offset, ext.end, MAX_REQUEST)]
    written = Written()
    if not chunks:
        return written

    def acknowledged(count: int) -> None:
        written.data_bytes += count
        if on_progress is not None:
            on_progress(count)

    loop = asyncio.get_running_loop()
    work = _Work(chunks)
    socks: list[socket.socket] = []
    pumps: list[_Pump] = []
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = flags = 0
        for _ in range(max(1, connections)):
            try:
                sock, size, flags = await asyncio.wait_for(_connect(target), HANDSHAKE_TIMEOUT)
            except asyncio.TimeoutError:
                raise TransferError(f"{target.url}: no NBD handshake within {HANDSHAKE_TIMEOUT:.0f} s") from None
            socks.append(sock)
        last = max(e.end for e in extents)
        if last > size:
            raise TransferError(f"{target.url} has {size} bytes; the disk needs {last}")
        pumps = [_Pump(loop, sock, flags, fd, work, block_size, acknowledged) for sock in socks]
        await _run(pumps, work)
    finally:
        # Every thread has ended here (_run waits for them), so nothing uses the sockets or the source any more.
        for sock in socks:
            sock.close()
        os.close(fd)
    for pump in pumps:
        written.data_blocks += pump.data_blocks
        written.zero_blocks += pump.zero_blocks
    written.zeros_found = sum(c.length for c in chunks if not c.zero) - written.data_bytes
    return written


async def _run(pumps: "list[_Pump]", work: "_Work") -> None:
    """Start every connection's thread and wait for them all; the first failure (or our cancellation) stops
    the others, which are still waited for. Raises the first failure."""
    started: list[_Pump] = []
    try:
        for p in pumps:
            p.start()
            started.append(p)
        pending = {p.finished for p in started}
        while pending and work.failure is None:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        running = [p.finished for p in started if not p.finished.done()]
        cancelled = False
        if running:
            work.stop()
            for p in started:
                p.abort()
            rest = asyncio.gather(*running)
            while not rest.done():  # they end within a read or a send of a chunk
                try:
                    await asyncio.shield(rest)
                except asyncio.CancelledError:
                    cancelled = True
        for p in started:
            p.join()  # each has resolved its future as its last step: this only waits for the thread's exit
        if cancelled:
            raise asyncio.CancelledError()
    if work.failure is not None:
        raise work.failure


class _Work:
    """The chunks still to send, shared by the connections' threads, and the first failure (what the call
    raises: a connection ending because another failed first is no failure of its own)."""

    def __init__(self, chunks: list[Extent]) -> None:
        self._chunks = chunks
        self._next = 0
        self._lock = threading.Lock()
        self.stopped = False
        self.failure: Optional[TransferError] = None

    def take(self) -> Optional[Extent]:
        with self._lock:
            if self.stopped or self._next >= len(self._chunks):
                return None
            self._next += 1
            return self._chunks[self._next - 1]

    def stop(self) -> None:
        with self._lock:
            self.stopped = True

    def fail(self, error: TransferError) -> None:
        with self._lock:
            if not self.stopped:
                self.failure = error
            self.stopped = True


class _Pump(threading.Thread):
    """One connection's transfer, in its own thread over a blocking socket: sends the chunks it takes (each
    as write and write-zeroes requests) while fewer than WINDOW are in flight, reads replies when the window
    is full or nothing is left to send, then flushes and disconnects."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, flags: int, fd: int, work: _Work,
                 block_size: int, acknowledged: Callable[[int], None]) -> None:
        super().__init__(name=f"nbdwire-{sock.fileno()}", daemon=True)
        self._loop = loop
        self._sock = sock
        self._flags = flags
        self._fd = fd
        self._work = work
        self._block_size = block_size
        self._acknowledged = acknowledged
        self.finished: asyncio.Future[None] = loop.create_future()
        self.data_blocks = 0
        self.zero_blocks = 0
        self._aborted = False
        self._handle = 0
        self._in_flight: dict[int, int] = {}  # handle -> data bytes it writes (0 for other commands)
        self._replies = bytearray(64 * 1024)
        self._have = 0
        self._acked = 0  # data bytes acknowledged, not yet reported
        self._reported_at = 0.0
        self._zero_block = bytes(block_size)

    def abort(self) -> None:
        """From the event loop's thread: end a blocked send or receive now (the thread then ends)."""
        self._aborted = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more

    def run(self) -> None:
        try:
            self._transfer()
        except (OSError, TransferError) as e:
            if not self._aborted:  # else it ends because another connection failed, or the call was cancelled
                self._work.fail(e if isinstance(e, TransferError) else TransferError(f"NBD connection lost: {e!r}"))
        except BaseException as e:  # a bug: still end the call, with its message
            self._work.fail(TransferError(f"NBD client failed: {e!r}"))
        finally:
            self._report(force=True)
            self._loop.call_soon_threadsafe(_resolve, self.finished)

    def _transfer(self) -> None:
        buf = bytearray(MAX_REQUEST)
        view = memoryview(buf)
        while (chunk := self._work.take()) is not None:
            if chunk.zero:
                self._write_zeroes(chunk.offset, chunk.length)
                continue
            if os.preadv(self._fd, [view[:chunk.length]], chunk.offset) != chunk.length:
                raise TransferError(f"short read of the source at {chunk.offset}")
            for start, end, zero in self._runs(buf, chunk.length):
                if zero:
                    self._write_zeroes(chunk.offset + start, end - start)
                else:
                    self._send(CMD_WRITE, chunk.offset + start, end - start, view[start:end])
                    self.data_blocks += blocks_in([(chunk.offset + start, chunk.offset + end)], self._block_size)
        if self._work.stopped:
            return  # another connection failed, or the call was cancelled
        while self._in_flight:
            self._receive()
        if self._flags & TFLAG_SEND_FLUSH:
            self._send(CMD_FLUSH, 0, 0)
            while self._in_flight:
                self._receive()
        self._sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0), socket.MSG_NOSIGNAL)

    def _runs(self, buf: bytearray, length: int) -> list[tuple[int, int, bool]]:
        """[start, end) runs of buf[:length] that are all-zero blocks or data blocks, in order."""
        bs, zero = self._block_size, self._zero_block
        if length <= bs:  # the common case: one block
            return [(0, length, buf.startswith(memoryview(zero)[:length], 0, length))]
        runs: list[tuple[int, int, bool]] = []
        for i in range(0, length, bs):
            end = min(length, i + bs)
            # startswith compares with memcmp, in place; most data blocks differ in their first bytes.
            is_zero = buf.startswith(zero if end - i == bs else memoryview(zero)[:end - i], i, end)
            if runs and runs[-1][2] == is_zero:
                runs[-1] = (runs[-1][0], end, is_zero)
            else:
                runs.append((i, end, is_zero))
        return runs

    def _write_zeroes(self, offset: int, length: int) -> None:
        self.zero_blocks += blocks_in([(offset, offset + length)], self._block_size)
        if self._flags & TFLAG_SEND_WRITE_ZEROES:
            self._send(CMD_WRITE_ZEROES, offset, length)
            return
        zeros = memoryview(bytes(min(length, MAX_REQUEST)))  # an old server: zeroes as data
        for start in range(offset, offset + length, MAX_REQUEST):
            count = min(MAX_REQUEST, offset + length - start)
            self._send(CMD_WRITE, start, count, zeros[:count], counted=False)

    def _send(self, command: int, offset: int, length: int, data: Optional[memoryview] = None,
              counted: bool = True) -> None:
        while len(self._in_flight) >= WINDOW:
            self._receive()
        self._handle += 1
        self._in_flight[self._handle] = length if command == CMD_WRITE and counted else 0
        parts: list[bytes | memoryview] = [REQUEST.pack(REQUEST_MAGIC, 0, command, self._handle, offset, length)]
        if data is not None:
            parts.append(data)
        total = REQUEST.size + (len(data) if data is not None else 0)
        sent = self._sock.sendmsg(parts, [], socket.MSG_NOSIGNAL)
        if sent < total:  # interrupted by a signal, or a reply to the flag of a shutdown: rare, send the rest
            rest = b"".join(bytes(p) for p in parts)[sent:]
            self._sock.sendall(rest, socket.MSG_NOSIGNAL)

    def _receive(self) -> None:
        """Wait for replies and take every whole one that has arrived."""
        view = memoryview(self._replies)
        count = self._sock.recv_into(view[self._have:])
        if count == 0:
            raise TransferError("NBD connection closed by the server")
        # ACK at once (tcp(7): TCP_QUICKACK, re-armed as the kernel clears it): qemu-nbd's 16-byte replies
        # otherwise wait for our delayed ACK (~40 ms) whenever we have nothing to send (a full window, a read
        # of the source, the final flush). Once per receive, not per reply.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self._have += count
        whole = self._have - self._have % REPLY.size
        for magic, error, handle in REPLY.iter_unpack(view[:whole]):
            if magic != SIMPLE_REPLY_MAGIC:
                raise TransferError(f"bad NBD reply magic {magic:#x}")
            data = self._in_flight.pop(handle, None)
            if data is None:
                raise TransferError(f"NBD reply for unknown handle {handle}")
            if error:
                raise TransferError(f"NBD request failed with error {error}")
            self._acked += data
        self._replies[:self._have - whole] = view[whole:self._have]
        self._have -= whole
        self._report()

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._acked and (force or now - self._reported_at >= PROGRESS_INTERVAL):
            self._loop.call_soon_threadsafe(self._acknowledged, self._acked)
            self._acked = 0
            self._reported_at = now


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


async def _connect(target: NbdTarget) -> tuple[socket.socket, int, int]:
    """A connection to the export, negotiated and ready for requests: (blocking socket, export size,
    transmission flags)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    error: Optional[OSError] = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            # Our requests' headers and the replies' ACKs go out at once (tcp(7): TCP_NODELAY).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            size, flags = await _handshake(loop, sock, target.export)
            if flags & TFLAG_READ_ONLY:
                raise TransferError(f"{target.url} is read-only")
            sock.setblocking(True)
            return sock, size, flags
        except OSError as e:
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise TransferError(f"cannot connect to {target.url}: {error}")


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = await loop.sock_recv(sock, count - len(data))
        if not more:
            raise TransferError("the NBD server closed the connection during the handshake")
        data += more
    return data


async def _handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket, export: str) -> tuple[int, int]:
    """Fixed newstyle negotiation with NBD_OPT_GO; returns (export size, transmission flags)."""
    magic, opt_magic, server_flags = struct.unpack(">8s8sH", await _recv_exactly(loop, sock, 18))
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise TransferError("not an NBD newstyle server")
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise TransferError("the NBD server does not speak fixed newstyle")
    client_flags = FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)
    name = export.encode()
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)  # no NBD_INFO requests
    await loop.sock_sendall(sock, struct.pack(">I", client_flags) + IHAVEOPT
                            + struct.pack(">II", OPT_GO, len(payload)) + payload)
    size: Optional[int] = None
    flags = 0
    while True:
        reply_magic, option, reply, length = struct.unpack(">QIII", await _recv_exactly(loop, sock, 20))
        data = await _recv_exactly(loop, sock, length) if length else b""
        if reply_magic != OPT_REPLY_MAGIC or option != OPT_GO:
            raise TransferError("bad NBD option reply")
        if reply & REP_ERROR_BIT:
            raise TransferError(f"NBD server refused export {export!r}: {data.decode(errors='replace') or hex(reply)}")
        if reply == REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
            size, flags = struct.unpack(">QH", data[2:12])
        elif reply == REP_ACK:
            if size is None:
                raise TransferError("the NBD server sent no export information")
            return size, flags
