"""Anonymous in-memory files (memfd_create(2)): written whole, then sent many times with sendfile(2).

A body that many requests send whole (the 10 MB VM list) costs Python two copies per request when it is
written to the socket from bytes (asyncio slices what the kernel did not take and buffers the rest); from a
file, sendfile(2) moves it in the kernel and Python never touches it again.

Files are reused: writing 10 MB over the pages a file already has costs half of what a new file costs
(allocating those pages, then freeing them when it is closed). A file is written only while nobody holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


class SharedFile:
    """A written file, read by whoever holds it; it goes back to its pool once its owner retired it and
    the last holder is done."""

    def __init__(self, pool: FilePool, fd: int, size: int) -> None:
        self.size = size
        self._pool = pool
        self._fd = fd
        self._holders = 0
        self._retired = False
        self._lost = weakref.finalize(self, os.close, fd)  # dropped without retire(): closed, not leaked

    @contextlib.contextmanager
    def held(self) -> Iterator[int]:
        """The descriptor, unchanged at least until the block ends."""
        if not self._lost.alive:
            raise ValueError("the file was retired")
        self._holders += 1
        try:
            yield self._fd
        finally:
            self._holders -= 1
            self._release_if_done()

    def retire(self) -> None:
        """The owner is done with it: back to the pool now, or when the last holder is done."""
        self._retired = True
        self._release_if_done()

    def _release_if_done(self) -> None:
        if self._retired and self._holders == 0 and self._lost.alive:
            self._lost.detach()
            self._pool.give_back(self._fd)


class FilePool:
    """Anonymous files named `name`, written whole; up to `keep` idle ones are kept for the next write."""

    def __init__(self, name: str, keep: int = 2) -> None:
        self.name = name
        self.keep = keep
        self._idle: list[int] = []
        self._lock = threading.Lock()  # write() runs in worker threads, give_back() on the loop
        weakref.finalize(self, _close_all, self._idle)

    def write(self, pieces: Sequence[bytes]) -> SharedFile:
        """A file holding the pieces one after the other (blocking: run it in a worker thread)."""
        with self._lock:
            fd = self._idle.pop() if self._idle else -1
        if fd < 0:
            fd = _anonymous(self.name)
        try:
            size = 0
            for i in range(0, len(pieces), _IOV_MAX):
                batch = pieces[i:i + _IOV_MAX]
                want = sum(len(p) for p in batch)
                done = os.pwritev(fd, batch, size)
                if done < want:  # not on a memfd short of an error, but pwritev(2) allows it
                    rest = memoryview(b"".join(batch))[done:]
                    while rest:
                        n = os.pwrite(fd, rest, size + want - len(rest))
                        rest = rest[n:]
                size += want
            os.ftruncate(fd, size)  # a reused file may have been longer
            return SharedFile(self, fd, size)
        except BaseException:
            os.close(fd)
            raise

    def give_back(self, fd: int) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(fd)
                return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            os.close(fd)
            return
        # The last close frees the file's pages: milliseconds for 10 MB, which the loop does not wait for.
        loop.run_in_executor(None, os.close, fd)

    def close(self) -> None:
        with self._lock:
            _close_all(self._idle)


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def _anonymous(name: str) -> int:
    try:
        return os.memfd_create(name, os.MFD_CLOEXEC)
    except OSError:  # a kernel or seccomp filter without memfd_create(2): an unlinked temporary file
        with tempfile.TemporaryFile(prefix=f"{name}-") as f:
            return os.dup(f.fileno())
