"""The simulated VMA's NBD client for changed extents (tests/sim/vma/nbdwire.py): exact bytes into a real
qemu-nbd, zero detection, progress on the event loop, and failures (the server closing mid-stream, error
replies, a bad magic, cancellation) that end the call at once with no thread or descriptor left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from tests.sim.vma import nbdwire
from tests.sim.vma.cbt import Extent
from tests.sim.vma.nbdclient import NbdTarget, TransferError
from tests.sim.vma.nbdwire import write_extents

from ..lib.qemu_nbd import qemu_nbd as bare_export

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not shutil.which("qemu-nbd"), reason="qemu-nbd (qemu-utils) is not installed"),
]

KiB = 1024
MiB = 1024 * KiB
BS = 64 * KiB


@contextlib.asynccontextmanager
async def qemu_nbd(image: Path, *flags: str) -> AsyncIterator[NbdTarget]:
    async with bare_export(image, flags=flags) as port:
        yield NbdTarget("127.0.0.1", port, "disk")


def nbdwire_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nbdwire")]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest_asyncio.fixture
async def no_leaks() -> "Callable[[], None]":  # async: the event loop's own descriptors exist already
    """Call at the end of a test: no transfer thread runs and no descriptor stayed open."""
    before = open_fds()

    def check() -> None:
        assert nbdwire_threads() == []
        leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
        assert not leaked, [os.readlink(f"/proc/self/fd/{fd}") for fd in leaked]
    return check


async def test_writes_exactly_the_extents(tmp_path: Path, no_leaks: Callable[[], None]) -> None:
    size = 32 * MiB
    source, target = tmp_path / "source.raw", tmp_path / "target.raw"
    data = bytearray(os.urandom(size))
    data[2 * MiB + BS:2 * MiB + 3 * BS] = bytes(2 * BS)  # two zero blocks inside a data extent
    data[8 * MiB:8 * MiB + BS] = bytes(BS)  # a single block that reads as zeros
    source.write_bytes(data)
    with open(target, "wb") as f:
        f.write(os.urandom(size))  # old contents everywhere
    extents = [
        Extent(0, BS),
        Extent(2 * MiB, 6 * MiB),  # more than one request (4 MiB), with zeros inside
        Extent(8 * MiB, BS),
        Extent(9 * MiB, BS, zero=True),  # known zero: not read, sent as write-zeroes
        Extent(12 * MiB, 3 * KiB),  # not a whole block
        *(Extent(13 * MiB + i * 2 * BS, BS) for i in range(100)),  # many small ones: the window fills
    ]
    expected = bytearray(target.read_bytes())
    for e in extents:
        expected[e.offset:e.end] = bytes(e.length) if e.zero else data[e.offset:e.end]
    reports: list[tuple[int, bool]] = []
    loop_thread = threading.current_thread()

    async with qemu_nbd(target, "--cache=none", "--discard=unmap", "--detect-zeroes=unmap") as t:
        written = await write_extents(str(source), t, extents, connections=2,
                                      on_progress=lambda n: reports.append((n, threading.current_thread() is loop_thread)))
    assert target.read_bytes() == bytes(expected)
    data_extents = [e for e in extents if not e.zero]
    assert written.zeros_found == 3 * BS
    assert written.data_bytes == sum(e.length for e in data_extents) - 3 * BS
    assert written.data_blocks == 1 + (6 * MiB // BS - 2) + 0 + 1 + 100
    assert written.zero_blocks == 2 + 1 + 1
    assert sum(n for n, _ in reports) == written.data_bytes
    assert all(on_loop for _, on_loop in reports)
    no_leaks()


async def test_refuses_a_read_only_or_too_small_export(tmp_path: Path, no_leaks: Callable[[], None]) -> None:
    source, target = tmp_path / "source.raw", tmp_path / "target.raw"
    source.write_bytes(os.urandom(2 * MiB))
    target.write_bytes(bytes(MiB))
    async with qemu_nbd(target, "--read-only") as t:
        with pytest.raises(TransferError, match="read-only"):
            await write_extents(str(source), t, [Extent(0, BS)])
    async with qemu_nbd(target) as t:
        with pytest.raises(TransferError, match="has 1048576 bytes"):
            await write_extents(str(source), t, [Extent(MiB, BS)])
    no_leaks()


# -- a scripted NBD server for the failures qemu-nbd does not produce on demand -------------------------


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_server(behaviour: Behaviour, size: int = 64 * MiB) -> AsyncIterator[NbdTarget]:
    """Negotiates like qemu-nbd (fixed newstyle, NBD_OPT_GO, flush and write-zeroes), then runs `behaviour`
    on each connection's transmission phase."""
    handlers: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            writer.write(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))
            await reader.readexactly(4)  # client flags
            _, option, length = struct.unpack(">8sII", await reader.readexactly(16))
            await reader.readexactly(length)
            assert option == nbdwire.OPT_GO
            info = struct.pack(">HQH", 0, size, 1 | nbdwire.TFLAG_SEND_FLUSH | nbdwire.TFLAG_SEND_WRITE_ZEROES)
            writer.write(struct.pack(">QIII", nbdwire.OPT_REPLY_MAGIC, option, nbdwire.REP_INFO, len(info)) + info)
            writer.write(struct.pack(">QIII", nbdwire.OPT_REPLY_MAGIC, option, nbdwire.REP_ACK, 0))
            await writer.drain()
            await behaviour(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield NbdTarget("127.0.0.1", server.sockets[0].getsockname()[1], "disk")
    finally:
        server.close()
        await server.wait_closed()
        for task in handlers:  # 3.11's Server.close() leaves the accepted connections open
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def read_request(reader: asyncio.StreamReader) -> tuple[int, int, int]:
    """(command, handle, length) of the next request, its data read and dropped."""
    _, _, command, handle, _, length = nbdwire.REQUEST.unpack(await reader.readexactly(nbdwire.REQUEST.size))
    if command == nbdwire.CMD_WRITE:
        await reader.readexactly(length)
    return command, handle, length


def replies(requests: int, *, error: int = 0, magic: int = nbdwire.SIMPLE_REPLY_MAGIC) -> Behaviour:
    """Answers `requests` requests, the last one with `error` and `magic`; then closes the connection when
    that reply is a good one, else goes on reading requests without answering (as qemu-nbd does after a
    failed request)."""
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(requests):
            _, handle, _ = await read_request(reader)
            last = i == requests - 1
            writer.write(nbdwire.REPLY.pack(magic if last else nbdwire.SIMPLE_REPLY_MAGIC, error if last else 0,
                                            handle))
            await writer.drain()
        if error or magic != nbdwire.SIMPLE_REPLY_MAGIC:
            while True:
                await read_request(reader)
    return behaviour


def many_blocks(count: int) -> list[Extent]:
    return [Extent(i * 2 * BS, BS) for i in range(count)]


@pytest.fixture
def source(tmp_path: Path) -> str:
    path = tmp_path / "source.raw"
    path.write_bytes(os.urandom(64 * MiB))
    return str(path)


@pytest.mark.parametrize("behaviour, message", [
    (replies(10), "closed by the server|connection lost"),
    (replies(10, error=5), "failed with error 5"),
    (replies(10, magic=0x12345678), "bad NBD reply magic"),
])
async def test_a_failing_server_ends_the_transfer(source: str, behaviour: Behaviour, message: str,
                                                  no_leaks: Callable[[], None]) -> None:
    async with fake_server(behaviour) as target:
        started = time.monotonic()
        with pytest.raises(TransferError, match=message):
            await write_extents(source, target, many_blocks(300), connections=2)
        assert time.monotonic() - started < 5
    no_leaks()


async def test_cancelling_stops_writing_at_once(source: str, no_leaks: Callable[[], None]) -> None:
    """A server that takes requests and never answers: the window fills and the client waits; cancelling
    the call ends its threads and closes its connections."""
    requests = 0
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        try:
            while True:
                await read_request(reader)
                requests += 1
        except asyncio.IncompleteReadError:
            closed.set()

    async with fake_server(silent) as target:
        task = asyncio.ensure_future(write_extents(source, target, many_blocks(300), connections=2))
        while requests < 2 * nbdwire.WINDOW:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert requests == 2 * nbdwire.WINDOW  # the window holds
        task.cancel()
        # At once: nothing bounds a blocked send or recv, so a call that waited for its threads would never end.
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, "the cancelled call did not end"
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 5)  # the server sees the connection end
    no_leaks()


async def test_cancelling_a_blocked_send(source: str, no_leaks: Callable[[], None]) -> None:
    """A server that reads nothing after the handshake: the client's sends block once the socket buffers
    are full; cancelling still ends the call at once."""
    connected = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await asyncio.Event().wait()

    async with fake_server(deaf) as target:
        extents = [Extent(i * nbdwire.MAX_REQUEST, nbdwire.MAX_REQUEST) for i in range(16)]
        task = asyncio.ensure_future(write_extents(source, target, extents, connections=2))
        await asyncio.wait_for(connected.wait(), 5)
        await asyncio.sleep(0.3)
        assert not task.done()
        task.cancel()
        # At once: nothing bounds a blocked send or recv, so a call that waited for its threads would never end.
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, "the cancelled call did not end"
        with pytest.raises(asyncio.CancelledError):
            await task
    no_leaks()
