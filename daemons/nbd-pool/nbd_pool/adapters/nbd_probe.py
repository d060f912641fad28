"""NBD client handshake (fixed newstyle, NBD_OPT_INFO with an NBD_OPT_LIST fallback) proving an export answers.

Written from the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md). The probe never enters the
transmission phase: it asks for the export's info and then sends NBD_OPT_ABORT, so it costs the server one
short connection and no I/O; it closes without waiting for the ACK of NBD_OPT_ABORT, which the protocol
allows. All integers are big-endian.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

T = TypeVar("T")

NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle negotiation, and the prefix of every client option
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_MAGIC = 0x0003E889045565A9  # option reply magic

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) and client flags
FLAG_NO_ZEROES = 1 << 1

OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags (NBD_FLAG_*), reported with NBD_INFO_EXPORT.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8

MAX_REPLY = 64 * 1024  # no sane option reply is bigger; refuse rather than buffer a hostile one
MAX_NAME = 4096  # the protocol's limit for strings


class NbdProbeError(Exception):
    """The peer did not complete an NBD handshake for the export (closed port, not NBD, refused option)."""


class ExportNotFound(NbdProbeError):
    """The server speaks NBD but has no export of that name."""


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int | None  # None only when the server answered NBD_OPT_LIST but not NBD_OPT_INFO
    transmission_flags: int
    min_block: int | None = None
    preferred_block: int | None = None
    max_block: int | None = None

    @property
    def read_only(self) -> bool:
        return bool(self.transmission_flags & TFLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.transmission_flags & TFLAG_CAN_MULTI_CONN)


def encode_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME or "\0" in name:
        raise ValueError(f"invalid NBD export name {name!r}: NUL or longer than {MAX_NAME} bytes")
    return raw


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise NbdProbeError(f"connection closed during handshake ({len(exc.partial)} of {n} bytes)") from None

    async def send_option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        await self.writer.drain()

    async def read_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", await self.read(20))
        if magic != REPLY_MAGIC:
            raise NbdProbeError(f"bad option reply magic {magic:#x}")
        if opt != option:
            raise NbdProbeError(f"reply to option {opt}, expected {option}")
        if length > MAX_REPLY:
            raise NbdProbeError(f"option reply of {length} bytes refused")
        return rtype, await self.read(length)


async def _handshake(conn: _Conn) -> None:
    magic, second = struct.unpack(">QQ", await conn.read(16))
    if magic != NBD_MAGIC:
        raise NbdProbeError(f"not an NBD server (magic {magic:#x})")
    if second == OLDSTYLE_MAGIC:
        raise NbdProbeError("oldstyle NBD server: export names are not supported")
    if second != IHAVEOPT:
        raise NbdProbeError(f"unknown NBD negotiation magic {second:#x}")
    (hflags,) = struct.unpack(">H", await conn.read(2))
    if not hflags & FLAG_FIXED_NEWSTYLE:
        raise NbdProbeError("server does not offer fixed newstyle negotiation")
    cflags = FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)
    conn.writer.write(struct.pack(">I", cflags))


def _error_text(rtype: int, data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return f"error {rtype & ~REP_FLAG_ERROR}" + (f": {text}" if text else "")


async def _info(conn: _Conn, name: str) -> ExportInfo | None:
    """NBD_OPT_INFO; None if the server does not support it."""
    raw = encode_name(name)
    requests = [INFO_BLOCK_SIZE]
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
    data += b"".join(struct.pack(">H", r) for r in requests)
    await conn.send_option(OPT_INFO, data)
    size: int | None = None
    tflags = 0
    blocks: tuple[int, int, int] | tuple[None, None, None] = (None, None, None)
    while True:
        rtype, payload = await conn.read_reply(OPT_INFO)
        if rtype == REP_ACK:
            break
        if rtype == REP_INFO:
            if len(payload) < 2:
                raise NbdProbeError("short NBD_REP_INFO")
            (itype,) = struct.unpack(">H", payload[:2])
            if itype == INFO_EXPORT and len(payload) >= 12:
                size, tflags = struct.unpack(">QH", payload[2:12])
            elif itype == INFO_BLOCK_SIZE and len(payload) >= 14:
                blocks = struct.unpack(">III", payload[2:14])
            continue  # other info types are allowed and ignored
        if rtype == REP_ERR_UNSUP:
            return None
        if rtype == REP_ERR_UNKNOWN:
            raise ExportNotFound(f"no export named {name!r} ({_error_text(rtype, payload)})")
        if rtype & REP_FLAG_ERROR:
            raise NbdProbeError(f"NBD_OPT_INFO refused: {_error_text(rtype, payload)}")
        raise NbdProbeError(f"unexpected reply type {rtype} to NBD_OPT_INFO")
    if size is None:
        raise NbdProbeError("NBD_OPT_INFO acknowledged without NBD_INFO_EXPORT")
    return ExportInfo(name, size, tflags, *blocks)


async def _list(conn: _Conn) -> list[str]:
    await conn.send_option(OPT_LIST)
    names: list[str] = []
    while True:
        rtype, payload = await conn.read_reply(OPT_LIST)
        if rtype == REP_ACK:
            return names
        if rtype == REP_SERVER:
            if len(payload) < 4:
                raise NbdProbeError("short NBD_REP_SERVER")
            (n,) = struct.unpack(">I", payload[:4])
            names.append(payload[4 : 4 + n].decode("utf-8", "replace"))
            continue
        if rtype & REP_FLAG_ERROR:
            raise NbdProbeError(f"NBD_OPT_LIST refused: {_error_text(rtype, payload)}")
        raise NbdProbeError(f"unexpected reply type {rtype} to NBD_OPT_LIST")


async def _abort(conn: _Conn) -> None:
    # Not waiting for the server's ACK: the protocol has servers tolerate a client that closes right after
    # NBD_OPT_ABORT (qemu-nbd logs nothing), and the round trip sat on every export's start → ready path.
    with contextlib.suppress(Exception):
        await conn.send_option(OPT_ABORT)


async def _session(host: str, port: int, timeout: float) -> _Conn:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        raise NbdProbeError(f"connect to {host}:{port} timed out") from None
    except OSError as exc:
        raise NbdProbeError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    return _Conn(reader, writer)


async def _close(conn: _Conn) -> None:
    conn.writer.close()
    with contextlib.suppress(Exception):
        await conn.writer.wait_closed()


@contextlib.asynccontextmanager
async def _negotiation(host: str, port: int, timeout: float) -> AsyncIterator[_Conn]:
    """A connection past the handshake; socket errors become NbdProbeError, and it is closed at the end."""
    conn = await _session(host, port, timeout)
    try:
        await _handshake(conn)
        yield conn
    except (ConnectionError, OSError) as exc:
        raise NbdProbeError(f"{host}:{port}: {exc}") from exc
    finally:
        await _close(conn)


async def _within(work: Awaitable[T], host: str, port: int, timeout: float) -> T:
    try:
        return await asyncio.wait_for(work, timeout)
    except asyncio.TimeoutError:
        raise NbdProbeError(f"NBD handshake with {host}:{port} timed out after {timeout:g}s") from None


async def probe_export(host: str, port: int, name: str, *, timeout: float = 5.0) -> ExportInfo:
    """Handshake with the NBD server at host:port and return the named export's info.

    Raises ExportNotFound if the server has no such export, NbdProbeError for anything else (closed port,
    not NBD, timeout).
    """

    async def go() -> ExportInfo:
        async with _negotiation(host, port, timeout) as conn:
            try:
                info = await _info(conn, name)
                if info is None:  # a server without NBD_OPT_INFO: settle for its export list
                    if name not in await _list(conn):
                        raise ExportNotFound(f"no export named {name!r}")
                    info = ExportInfo(name, None, 0)
            except ExportNotFound:
                await _abort(conn)  # negotiation is still in step: leave politely, keeping the server's log clean
                raise
            await _abort(conn)
            return info

    return await _within(go(), host, port, timeout)


async def list_exports(host: str, port: int, *, timeout: float = 5.0) -> list[str]:
    """The export names the server lists (NBD_OPT_LIST)."""

    async def go() -> list[str]:
        async with _negotiation(host, port, timeout) as conn:
            names = await _list(conn)
            await _abort(conn)
            return names

    return await _within(go(), host, port, timeout)
