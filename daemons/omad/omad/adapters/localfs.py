"""The files omad itself touches in a backup repository: capacity, a write probe, directories, removals.

Every call runs in a worker thread with a time limit: a repository may be an NFS or CIFS mount whose server
stopped answering, and a stat there blocks in the kernel. The loop goes on; the stuck thread is left behind
(it cannot be interrupted), and the caller gets a clear error. A copy, which can run for hours, is told
that it was given up: it stops at its next chunk and removes what it wrote.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

CHUNK = 4 * 1024 * 1024
Progress = Callable[[int], None]

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

    async def _call(self, what: str, fn: Callable[[], T], timeout: float | None = None,
                    stop: threading.Event | None = None) -> T:
        """`fn` in a thread within the time limit. Given up (timed out, or the caller cancelled), `stop` is
        set: a long call that checks it (a copy) ends at its next chunk and undoes its own work."""
        limit = timeout or self.timeout
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), limit)
        except asyncio.TimeoutError as e:
            raise TimedOut("storage not answering", f"{what} did not finish within {limit:g} s "
                                                    "(a network share whose server is down?)") from e
        finally:
            if stop is not None:
                stop.set()

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

    async def sha256(self, path: Path, *, timeout: float | None = None) -> str:
        """The file's SHA-256, read in a worker thread (images are large: `timeout` may exceed the default)."""

        def digest() -> str:
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
            except OSError as e:
                raise Unavailable("cannot read file", f"read {path}: {e.strerror or e}") from e
            return h.hexdigest()

        return await self._call(f"sha256 of {path}", digest, timeout)

    async def copy_file(self, src: Path, dst: Path, *, progress: Progress | None = None,
                        timeout: float | None = None) -> str:
        """Copy `src` to a new `dst` (never overwritten), synced; returns the SHA-256 of the bytes written.

        `progress` is called from the worker thread with the bytes copied so far (it must be thread-safe).
        A failed copy leaves no `dst`, nor does one given up (timed out, cancelled): its thread, which the
        caller does not wait for, stops at the next chunk and removes what it wrote.
        """
        stop = threading.Event()

        def copy() -> str:
            h = hashlib.sha256()
            done = 0
            if stop.is_set():
                raise Unavailable("copy given up", f"copy {src} to {dst} was given up before it began")
            try:
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
            except FileExistsError as e:
                raise Invalid("file exists", f"{dst} already exists; refusing to overwrite it") from e
            except OSError as e:
                raise Unavailable("cannot create file", f"create {dst}: {e.strerror or e}") from e
            try:
                with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
                    while chunk := f.read(CHUNK):
                        if stop.is_set():
                            raise Unavailable("copy given up", f"copy {src} to {dst} given up after {done} bytes")
                        h.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done)
                    out.flush()
                    os.fsync(out.fileno())
                    if stop.is_set():  # given up during the last chunk or the sync
                        raise Unavailable("copy given up", f"copy {src} to {dst} given up at its end")
            except OSError as e:
                dst.unlink(missing_ok=True)
                raise Unavailable("copy failed", f"copy {src} to {dst}: {e.strerror or e}") from e
            except BaseException:
                dst.unlink(missing_ok=True)
                raise
            return h.hexdigest()

        return await self._call(f"copy {src}", copy, timeout, stop)

    async def size(self, path: Path) -> int:
        return await self._call(f"stat {path}", lambda: path.stat().st_size)

    async def rename(self, src: Path, dst: Path) -> None:
        def move() -> None:
            try:
                os.rename(src, dst)
            except OSError as e:
                raise Unavailable("cannot rename file", f"rename {src} to {dst}: {e.strerror or e}") from e

        await self._call(f"rename {src}", move)

    async def glob(self, root: Path, pattern: str) -> list[Path]:
        return await self._call(f"listing {root}", lambda: sorted(root.glob(pattern)))
