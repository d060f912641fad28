"""Anonymous in-memory files (memfd_create(2)): written once, sealed, then sent many times with sendfile(2).

A body that many requests send whole (the 10 MB VM list) costs Python two copies per request when it is
written to the socket from bytes (asyncio slices what the kernel did not take and buffers the rest); from a
file, sendfile(2) moves it in the kernel and Python never touches it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class SealedFile:
    """An open anonymous file that no longer changes. Its descriptor is closed once the owner retires it
    and nobody holds it (`held()`), or when the object is collected."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self._fd = fd
        self._holders = 0
        self._retired = False
        self._close = weakref.finalize(self, os.close, fd)

    @contextlib.contextmanager
    def held(self) -> Iterator[int]:
        """The descriptor, open at least until the block ends."""
        if not self._close.alive:
            raise ValueError("the file is closed")
        self._holders += 1
        try:
            yield self._fd
        finally:
            self._holders -= 1
            self._close_if_done()

    def retire(self) -> None:
        """The owner is done with it: close it now, or when the last holder is."""
        self._retired = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if not (self._retired and self._holders == 0 and self._close.alive):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._close()
            return
        # The last close frees the file's pages: milliseconds for 10 MB, which the loop does not wait for.
        loop.run_in_executor(None, self._close)


def write(name: str, pieces: Sequence[bytes]) -> SealedFile:
    """A new file holding the pieces one after the other (blocking: run it in a worker thread)."""
    fd = _anonymous(name)
    try:
        size = 0
        for i in range(0, len(pieces), _IOV_MAX):
            batch = pieces[i:i + _IOV_MAX]
            want = sum(len(p) for p in batch)
            done = os.writev(fd, batch)
            if done < want:  # not on a memfd short of an error, but writev(2) allows it
                rest = memoryview(b"".join(batch))[done:]
                while rest:
                    rest = rest[os.write(fd, rest):]
            size += want
        with contextlib.suppress(OSError):  # the tmpfile fallback cannot be sealed
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return SealedFile(fd, size)
    except BaseException:
        os.close(fd)
        raise


def _anonymous(name: str) -> int:
    try:
        return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:  # a kernel or seccomp filter without memfd_create(2): an unlinked temporary file
        with tempfile.TemporaryFile(prefix=f"{name}-") as f:
            return os.dup(f.fileno())
