"""Immutable backup files: the immutable attribute on files below the configured repository roots, for omad.

A file with the immutable attribute cannot be written, renamed or removed, even by root, until the attribute
is cleared (chattr(1), "i"); only a process with CAP_LINUX_IMMUTABLE may set or clear it, hence this root
agent. omad asks by path, and owns the repository directories, so a path is never used as a name: it must be
normalised and strictly below a root, and is opened with openat2(2) beneath that root's descriptor without
following any symbolic link or crossing a mount (a share mounted below the root is itself the root of the
files in it); the opened descriptor must be a regular file, and the attribute is set through it. A
directory swapped for a symlink at any moment changes nothing. A root itself may sit in a directory omad
owns (/var/lib/oma/repositories): it is opened by name, so its identity (device, inode) is taken when the
agent starts and checked on every open.

A change is a thread blocked in the kernel for as long as the filesystem takes (a hung NFS server: forever),
and a thread cannot be stopped. So a call that runs out of time answers 504 `outcome_unknown` (the change may
still land, and which of the paths were changed, unknown or not tried), and the thread stays on record for
its file until it ends: every later call on that file (a status read, another change) waits for it first,
within its own time limit, and answers `outcome_unknown` again rather than a flag the thread may still
change. A status that answers is therefore the file's final state, and omad re-reads it after any failed
change before it records anything. No late change is undone: the undo would go through the same hung
filesystem, and the state stays readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from oma_common import beneath, mountinfo
from oma_common.contracts.volume_agent import MAX_PATHS
from oma_common.errors import Invalid, TimedOut, Unavailable

from .adapters import fsflags

log = logging.getLogger("volume_agent.immutability")

# O_NONBLOCK: a FIFO planted under the name must not block the open (it is then refused as not a file).
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class NoAttribute(Unavailable):
    """The file's filesystem has no immutable attribute (NFS, CIFS, tmpfs): nothing is or can be locked there."""

    code = "no_immutable_attribute"


class OutcomeUnknown(TimedOut):
    """The filesystem did not answer in time; the change may still land. `changed` were done, `unknown` may or
    may not be, `not_tried` were not touched. Read the status later: it waits for the change still under way."""

    code = "outcome_unknown"


class Immutability:
    def __init__(self, roots: Iterable[Path], *, timeout: float = 60.0) -> None:
        self.roots = [beneath.resolved_root(Path(os.path.normpath(r))) for r in roots]
        self.timeout = timeout
        self._identity: dict[Path, tuple[int, int]] = {}
        # path → the thread still working on that file (set, clear or read), until it ends.
        self._running: dict[str, asyncio.Future[bool]] = {}
        self._given_up: set[asyncio.Future[bool]] = set()  # those whose caller answered outcome_unknown
        for r in self.roots:
            with contextlib.suppress(beneath.RootUntrusted):  # logged; refused at every use
                self._remember(r)

    def _remember(self, root: Path) -> tuple[int, int] | None:
        """The root's identity, taken the first time it is found (None while it is missing), reached through
        no symlink omad could have planted (beneath.open_root: RootUntrusted otherwise)."""
        if root not in self._identity:
            try:
                self._identity[root] = beneath.identity(root)
            except beneath.RootUntrusted:
                log.warning("immutable root %s is reached through a symbolic link that root did not make; nothing "
                            "is locked through it until it is a directory again", root)
                raise
            except FileNotFoundError:
                return None
            log.info("immutable root %s is device %d inode %d", root, *self._identity[root])
        return self._identity[root]

    def _base(self, root: Path, p: Path) -> Path:
        """Where to resolve `p` from: the deepest mount point between `root` and `p` (a share mounted below
        the root), else the root itself."""
        base = root
        for e in mountinfo.read():
            if e.mount_point in p.parents and (e.mount_point == root or root in e.mount_point.parents) \
                    and len(e.mount_point.parts) > len(base.parts):
                base = e.mount_point
        return base

    def check(self, path: str) -> tuple[Path, str]:
        """The root `path` is below and the path relative to it; Invalid for anything else."""
        p = Path(path)
        if not p.is_absolute() or os.path.normpath(path) != path or "\0" in path:
            raise Invalid("bad path", f"{path!r} is not a normalised absolute path")
        for root in self.roots:
            if root in p.parents:
                return root, str(p.relative_to(root))
        raise Invalid("path outside the repositories", f"{path} is not below a repository root "
                                                       f"({', '.join(map(str, self.roots)) or 'none configured'})")

    def _apply(self, path: str, on: bool | None) -> bool:
        """Open `path` beneath its root (no symlink, no other mount), check it is a regular file, then set
        (on=True/False) or read (on=None) its attribute through the descriptor. Blocking: run in a thread."""
        root, _ = self.check(path)
        base = self._base(root, Path(path))
        try:
            known = self._remember(root) if base == root else None
            if base == root and known is None:
                raise Invalid("no such file", f"{path} does not exist ({root} is missing)")
            with beneath.opened(base, str(Path(path).relative_to(base)), OPEN_FLAGS, root_identity=known) as fd:
                if not beneath.is_regular(fd):
                    raise Invalid("not a file", f"{path} is not a regular file")
                if on is not None:
                    fsflags.set_immutable(fd, on)
                return fsflags.immutable(fd)
        except beneath.RootReplaced as e:
            raise Unavailable("repository root replaced", f"{root} is no longer the directory it was when "
                                                          "volume-agent first saw it; refusing to go through it") from e
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise Invalid("no such file", f"{path} does not exist") from e
            if e.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                raise Invalid("bad path", f"{path} goes through a symbolic link or another mount") from e
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise NoAttribute("no immutable attribute", f"{path}: the filesystem does not support the "
                                                            f"immutable attribute ({e.strerror})") from e
            raise Unavailable("cannot change the attribute", f"{path}: {e.strerror}") from e

    async def set(self, paths: list[str], on: bool) -> dict[str, Any]:
        _check_count(paths)
        for p in paths:
            self.check(p)  # all or nothing for malformed requests
        for i, p in enumerate(paths):
            try:
                await self._run(p, on)
            except OutcomeUnknown as e:
                e.extra.update(changed=paths[:i], unknown=[p], not_tried=paths[i + 1:])
                raise
            log.info("%s %s", "locked" if on else "unlocked", p, extra={"resource": p})
        return {"paths": list(paths), "immutable": on}

    async def status(self, paths: list[str]) -> dict[str, Any]:
        _check_count(paths)
        out = {}
        for i, p in enumerate(paths):
            try:
                out[p] = await self._run(p, None)
            except OutcomeUnknown as e:
                e.extra.update(changed=[], unknown=[p], not_tried=paths[i + 1:])
                raise
        return {"immutable": out}

    async def _run(self, path: str, on: bool | None) -> bool:
        """`_apply` in a thread, after any thread still working on the same file has ended, all within the
        time limit; OutcomeUnknown when the limit passes first. A cancelled caller leaves its thread on record,
        like a timed-out one: whoever asks next about the file waits for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while (earlier := self._running.get(path)) is not None:
            if not await _ended_by(earlier, deadline):
                raise OutcomeUnknown("outcome unknown", f"{path}: an earlier change or read of this file has not "
                                     f"ended after {self.timeout:g} s (a hung filesystem?); its outcome is unknown")
            if self._running.get(path) is earlier:
                del self._running[path]
        fut = loop.run_in_executor(None, self._apply, path, on)
        self._running[path] = fut
        fut.add_done_callback(functools.partial(self._ended, path, on))
        if not await _ended_by(fut, deadline):
            self._given_up.add(fut)
            log.warning("%s: the filesystem did not %s within %g s; its outcome is unknown until it does", path,
                        _what(on), self.timeout, extra={"resource": path})
            raise OutcomeUnknown("outcome unknown", f"{path}: the filesystem did not {_what(on)} within "
                                 f"{self.timeout:g} s (a hung filesystem?); it may still happen: read the status "
                                 "before trusting either state")
        return fut.result()

    def _ended(self, path: str, on: bool | None, fut: asyncio.Future[bool]) -> None:
        """The thread's end: off the record; one line when it ended after its caller stopped waiting."""
        if self._running.get(path) is fut:
            del self._running[path]
        if fut.cancelled():  # the executor was shut down before the thread started
            self._given_up.discard(fut)
            return
        exc = fut.exception()  # retrieved here in every case: a given-up caller never will
        if fut in self._given_up:
            self._given_up.discard(fut)
            log.warning("%s: late, after its caller was answered outcome_unknown: %s", path,
                        f"could not {_what(on)} ({exc})" if exc else f"immutable is now {fut.result()}",
                        extra={"resource": path})


async def _ended_by(fut: asyncio.Future[Any], deadline: float) -> bool:
    """Wait for `fut` until `deadline` (loop time) without cancelling it; whether it has ended."""
    remaining = deadline - asyncio.get_running_loop().time()
    if not fut.done() and remaining > 0:
        await asyncio.wait([fut], timeout=remaining)  # asyncio.wait never cancels what it waits for
    return fut.done()


def _what(on: bool | None) -> str:
    return "read the attribute" if on is None else "set the attribute" if on else "clear the attribute"

def _check_count(paths: list[str]) -> None:
    if not paths or len(paths) > MAX_PATHS:
        raise Invalid("bad paths", f"send 1 to {MAX_PATHS} paths")
