"""Streaming to HTTP: byte ranges (RFC 9110 §14), Content-Disposition (RFC 6266), and a bounded pipe from a
writer thread (zipfile, tarfile) to the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import threading
from collections.abc import AsyncIterator
from urllib.parse import quote

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


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
