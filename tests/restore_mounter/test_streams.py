"""Byte ranges, Content-Disposition (oma_common.filestream) and the bounded pipe from a writer thread, in-process."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from oma_common.filestream import ByteRange, Unsatisfiable, content_disposition, parse_range
from restore_mounter.streams import Cancelled, ChunkPipe, send_archive

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("header,expected", [
    (None, None), ("", None), ("bytes=0-9", ByteRange(0, 9)), ("bytes=10-", ByteRange(10, 99)),
    ("bytes=-10", ByteRange(90, 99)), ("bytes=-1000", ByteRange(0, 99)), ("bytes=90-1000", ByteRange(90, 99)),
    ("bytes=99-99", ByteRange(99, 99)), ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=5-1", None),
    ("bytes=-", None), (" bytes=1-2 ", ByteRange(1, 2)),
])
def test_parse_range(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header,size", [("bytes=100-", 100), ("bytes=200-300", 100), ("bytes=-0", 100),
                                         ("bytes=0-", 0), ("bytes=-5", 0)])
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


def test_content_disposition_is_safe() -> None:
    assert content_disposition("report.pdf") == "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
    value = content_disposition('a"b;c\\d\r\nSet-Cookie: x=1 é.txt')
    assert "\r" not in value and "\n" not in value
    assert value.startswith('attachment; filename="a_b_c_d__Set-Cookie: x=1 _.txt"; ')
    assert value.endswith("filename*=UTF-8''a%22b%3Bc%5Cd%0D%0ASet-Cookie%3A%20x%3D1%20%C3%A9.txt")


async def test_pipe_is_bounded_and_ordered() -> None:
    pipe = ChunkPipe(asyncio.get_running_loop(), chunk=1000, slots=3)
    produced: list[int] = []

    def writer() -> None:
        for i in range(50):
            pipe.write(bytes([i]) * 1000)
            produced.append(i)
        pipe.finish()

    t = threading.Thread(target=writer)
    t.start()
    await asyncio.sleep(0.3)
    assert len(produced) <= 4  # 3 chunks in flight, the 4th write blocks
    received = [chunk async for chunk in pipe.chunks()]
    t.join()
    assert received == [bytes([i]) * 1000 for i in range(50)]


async def test_pipe_cancel_stops_the_writer() -> None:
    pipe = ChunkPipe(asyncio.get_running_loop(), chunk=10, slots=1)
    outcome: list[BaseException] = []

    def writer() -> None:
        try:
            while True:
                pipe.write(b"x" * 10)
        except Cancelled as e:
            outcome.append(e)

    t = threading.Thread(target=writer)
    t.start()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    pipe.cancel()
    await asyncio.get_running_loop().run_in_executor(None, t.join)
    assert outcome and time.monotonic() - started < 1


async def test_pipe_passes_the_writers_failure() -> None:
    pipe = ChunkPipe(asyncio.get_running_loop())
    pipe.write(b"partial")
    pipe.fail(OSError("disk error"))
    with pytest.raises(OSError, match="disk error"):
        async for _ in pipe.chunks():
            pass


async def test_archive_response_outlives_a_second_cancel_until_its_writer_ends() -> None:
    """The writer thread holds descriptors inside the mount: the response returns only once it has ended,
    even when the handler is cancelled again while it waits (a client gone, then the daemon stopping)."""
    from aiohttp.test_utils import make_mocked_request

    loop = asyncio.get_running_loop()
    pipe = ChunkPipe(loop, chunk=10, slots=1)
    release = threading.Event()

    def writer() -> int:
        release.wait(5)  # a thread still reading inside the mount, deaf to cancellation for a while
        return 0

    producer = loop.run_in_executor(None, writer)
    task = asyncio.ensure_future(send_archive(make_mocked_request("GET", "/archive"), pipe, producer,
                                              "a.zip", "application/zip", "a"))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert producer.done()
