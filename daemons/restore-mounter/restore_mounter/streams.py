"""Streaming archives to HTTP: a bounded pipe from a writer thread (zipfile, tarfile) to the event loop."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import AsyncIterator

from aiohttp import web

from oma_common.blocking import wait_through
from oma_common.filestream import abort, content_disposition

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The consumer went away; the writer thread stops at its next write."""


_EOF = object()


class ChunkPipe(io.RawIOBase):
    """A write-only file for a worker thread whose bytes an async consumer reads in chunks.

    At most `slots` chunks of `chunk` bytes are in flight: the writer blocks (checking for cancellation)
    until the consumer has sent one on. It is not seekable and has no tell(), so zipfile writes data
    descriptors and tarfile streams.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, chunk: int = 256 * 1024, slots: int = 8) -> None:
        super().__init__()
        self._loop = loop
        self._chunk = chunk
        self._slots = threading.Semaphore(slots)
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._buf = bytearray()
        self._cancelled = threading.Event()
        self.bytes_written = 0

    # --- the writer thread ---

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self._cancelled.is_set():
            raise Cancelled()
        self._buf += b
        while len(self._buf) >= self._chunk:
            self._send(bytes(self._buf[:self._chunk]))
            del self._buf[:self._chunk]
        return len(b)

    def _send(self, item: object) -> None:
        while not self._slots.acquire(timeout=0.2):
            if self._cancelled.is_set():
                raise Cancelled()
        if self._cancelled.is_set():
            raise Cancelled()
        if isinstance(item, bytes):
            self.bytes_written += len(item)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def finish(self) -> None:
        """All written: send what is buffered and the end."""
        if self._buf:
            self._send(bytes(self._buf))
            self._buf.clear()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _EOF)

    def fail(self, exc: BaseException) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, exc)

    # --- the event loop ---

    def cancel(self) -> None:
        self._cancelled.set()

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is _EOF:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item
            self._slots.release()  # only once the consumer has taken it on: this bounds memory


async def send_archive(request: web.Request, pipe: ChunkPipe, producer: asyncio.Future[int],
                       name: str, content_type: str, what: str) -> web.StreamResponse:
    """Relay what the writer thread `producer` writes into `pipe` as a chunked answer; a failure after the
    first byte aborts the connection (the archive is then visibly incomplete), it never ends it cleanly."""
    resp = web.StreamResponse(headers={"Content-Type": content_type, "Content-Disposition": content_disposition(name)})
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        async for chunk in pipe.chunks():
            await resp.write(chunk)
        await resp.write_eof()
        skipped = await producer
        log.info("archive of %s: %d bytes, %d entries skipped", what, pipe.bytes_written, skipped)
    except ConnectionError:
        log.info("archive of %s stopped: the client went away", what)
    except Exception as e:
        log.warning("archive of %s failed after its first byte (%s); aborting the response", what, e)
        abort(request)
    finally:
        pipe.cancel()
        await wait_through(producer)  # the thread holds descriptors inside the mount, even on a second cancel
        if producer.done() and not producer.cancelled():
            producer.exception()  # retrieved: its failure is already logged above
    return resp
