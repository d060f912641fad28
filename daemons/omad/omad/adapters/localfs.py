"""The files omad itself touches in a backup repository: capacity, a write probe, directories, removals.

Every call runs in a worker thread with a time limit: a repository may be an NFS or CIFS mount whose server
stopped answering, and a stat there blocks in the kernel. The loop goes on; the stuck thread is left behind
(it cannot be interrupted), and the caller gets a clear error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from oma_common.errors import Invalid, TimedOut, Unavailable

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Capacity:
    total_bytes: int
    used_bytes: int
    available_bytes: int  # to an unprivileged writer such as omad (statvfs f_bavail)


class LocalFs:
    def __init__(self, *, timeout: float = 30.0) -> None:
        self.timeout = timeout

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), self.timeout)
        except asyncio.TimeoutError as e:
            raise TimedOut("storage not answering", f"{what} did not finish within {self.timeout:g} s "
                                                    "(a network share whose server is down?)") from e

    async def capacity(self, path: Path) -> Capacity:
        def stat() -> Capacity:
            try:
                st = os.statvfs(path)
            except OSError as e:
                raise Unavailable("storage unreadable", f"statvfs {path}: {e.strerror or e}") from e
            return Capacity(st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize,
                            st.f_bavail * st.f_frsize)

        return await self._call(f"statvfs of {path}", stat)

    async def probe_writable(self, path: Path) -> None:
        """Check that `path` is a directory this process can create, write, sync and remove files in."""

        def probe() -> None:
            if not path.is_absolute():
                raise Invalid("path not absolute", f"{path} is not an absolute path")
            if not path.exists():
                raise Invalid("path does not exist", f"{path} does not exist")
            if not path.is_dir():
                raise Invalid("not a directory", f"{path} is not a directory")
            probe_file = path / f".oma-write-test-{secrets.token_hex(6)}"
            try:
                fd = os.open(probe_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, b"oma")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.unlink(probe_file)
            except OSError as e:
                reason = e.strerror or str(e)
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise Invalid("path not writable", f"{path} is not writable by uid {os.geteuid()}: {reason} "
                                                       "(the directory must belong to, or be writable by, "
                                                       "omad's user)") from e
                raise Unavailable("path not usable", f"cannot write in {path}: {reason}") from e

        await self._call(f"write test in {path}", probe)

    async def make_dir(self, path: Path, mode: int = 0o750) -> None:
        def make() -> None:
            try:
                path.mkdir(mode=mode, parents=False, exist_ok=True)
            except OSError as e:
                raise Unavailable("cannot create directory", f"mkdir {path}: {e.strerror or e}") from e

        await self._call(f"mkdir {path}", make)

    async def remove(self, paths: Iterable[Path]) -> list[Path]:
        """Remove files; those already gone are fine. Returns the ones that were removed."""
        todo = list(paths)

        def remove() -> list[Path]:
            removed = []
            for p in todo:
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise Unavailable("cannot remove file", f"rm {p}: {e.strerror or e}") from e
            return removed

        return await self._call("removing images", remove)

    async def remove_dir_if_empty(self, path: Path) -> None:
        def rmdir() -> None:
            try:
                path.rmdir()
            except OSError:
                pass  # not empty, or gone: both fine

        await self._call(f"rmdir {path}", rmdir)

    async def exists(self, path: Path) -> bool:
        return await self._call(f"stat {path}", path.exists)

    async def owner(self, path: Path) -> int:
        return await self._call(f"stat {path}", lambda: path.stat().st_uid)
