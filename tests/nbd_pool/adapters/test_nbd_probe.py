"""Tests for the NBD handshake probe: against fake servers speaking bits of the protocol, and real qemu-nbd."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from nbd_pool.adapters import nbd_probe as nbd
from nbd_pool.adapters.nbd_probe import ExportNotFound, NbdProbeError, list_exports, probe_export

pytestmark = [pytest.mark.timeout(30)]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", nbd.REPLY_MAGIC, option, rtype, len(data)) + data


async def read_option(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    magic, option, length = struct.unpack(">QII", await reader.readexactly(16))
    assert magic == nbd.IHAVEOPT
    return option, await reader.readexactly(length)


def list_only_server(names: list[str]) -> Handler:
    """A fixed-newstyle server that predates NBD_OPT_INFO: answers it ERR_UNSUP, lists its exports."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(struct.pack(">QQH", nbd.NBD_MAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await reader.readexactly(4))
        assert cflags & nbd.FLAG_FIXED_NEWSTYLE
        try:
            while True:
                option, _ = await read_option(reader)
                if option == nbd.OPT_INFO:
                    writer.write(reply(option, nbd.REP_ERR_UNSUP))
                elif option == nbd.OPT_LIST:
                    for n in names:
                        raw = n.encode()
                        writer.write(reply(option, nbd.REP_SERVER, struct.pack(">I", len(raw)) + raw))
                    writer.write(reply(option, nbd.REP_ACK))
                elif option == nbd.OPT_ABORT:
                    writer.write(reply(option, nbd.REP_ACK))
                    break
                await writer.drain()
        finally:
            writer.close()

    return handler


@pytest_asyncio.fixture
async def closed_port() -> AsyncIterator[int]:
    server, port = await serve(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    yield port


@pytest.mark.asyncio
async def test_closed_port_fails_cleanly_and_fast(closed_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(NbdProbeError, match="cannot connect"):
        await probe_export("127.0.0.1", closed_port, "x", timeout=2)
    assert time.monotonic() - started < 1


@pytest.mark.asyncio
async def test_not_an_nbd_server() -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server, port = await serve(http)
    async with server:
        with pytest.raises(NbdProbeError, match="not an NBD server"):
            await probe_export("127.0.0.1", port, "x")


@pytest.mark.asyncio
async def test_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    server, port = await serve(silent)
    async with server:
        started = time.monotonic()
        with pytest.raises(NbdProbeError, match="timed out"):
            await probe_export("127.0.0.1", port, "x", timeout=0.3)
        assert time.monotonic() - started < 2
        server.close()


@pytest.mark.asyncio
async def test_falls_back_to_list_without_opt_info() -> None:
    server, port = await serve(list_only_server(["disk-a", "disk-b"]))
    async with server:
        info = await probe_export("127.0.0.1", port, "disk-b")
        assert info.name == "disk-b" and info.size is None
        with pytest.raises(ExportNotFound):
            await probe_export("127.0.0.1", port, "disk-c")
        assert await list_exports("127.0.0.1", port) == ["disk-a", "disk-b"]


def test_export_name_limits() -> None:
    assert nbd.encode_name("vm-1_disk.0") == b"vm-1_disk.0"
    with pytest.raises(ValueError):
        nbd.encode_name("a\0b")
    with pytest.raises(ValueError):
        nbd.encode_name("x" * 4097)
