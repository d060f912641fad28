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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from oma_common import beneath, mountinfo
from oma_common.contracts.volume_agent import MAX_PATHS
from oma_common.errors import Invalid, Unavailable

from .adapters import fsflags

log = logging.getLogger("volume_agent.immutability")

# O_NONBLOCK: a FIFO planted under the name must not block the open (it is then refused as not a file).
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class Immutability:
    def __init__(self, roots: Iterable[Path], *, timeout: float = 60.0) -> None:
        self.roots = [beneath.resolved_root(Path(os.path.normpath(r))) for r in roots]
        self.timeout = timeout
        self._identity: dict[Path, tuple[int, int]] = {}
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
                raise Unavailable("no immutable attribute", f"{path}: the filesystem does not support the "
                                                            f"immutable attribute ({e.strerror})") from e
            raise Unavailable("cannot change the attribute", f"{path}: {e.strerror}") from e

    async def set(self, paths: list[str], on: bool) -> dict[str, Any]:
        _check_count(paths)
        for p in paths:
            self.check(p)  # all or nothing for malformed requests
        for p in paths:
            await asyncio.wait_for(asyncio.to_thread(self._apply, p, on), self.timeout)
            log.info("%s %s", "locked" if on else "unlocked", p, extra={"resource": p})
        return {"paths": list(paths), "immutable": on}

    async def status(self, paths: list[str]) -> dict[str, Any]:
        _check_count(paths)
        out = {}
        for p in paths:
            out[p] = await asyncio.wait_for(asyncio.to_thread(self._apply, p, None), self.timeout)
        return {"immutable": out}


def _check_count(paths: list[str]) -> None:
    if not paths or len(paths) > MAX_PATHS:
        raise Invalid("bad paths", f"send 1 to {MAX_PATHS} paths")
