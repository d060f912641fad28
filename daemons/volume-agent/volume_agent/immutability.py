"""Immutable backup files: `chattr +i` on files below the configured repository roots, for omad.

A file with the immutable attribute cannot be written, renamed or removed, even by root, until the attribute
is cleared (chattr(1), "i"); only a process with CAP_LINUX_IMMUTABLE may set or clear it, hence this root
agent. omad asks by path, so every path is checked before chattr sees it: absolute, an existing regular
file reached without a symbolic link, and strictly below one of the roots (both resolved), so a caller cannot
lock or unlock anything else on the host.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from oma_common.errors import Invalid, Unavailable
from oma_common.command import CommandFailed

from .adapters import chattr

log = logging.getLogger("volume_agent.immutability")

MAX_PATHS = 256


class Immutability:
    def __init__(self, roots: Iterable[Path], *, timeout: float = 60.0, chattr_program: str = "chattr",
                 lsattr_program: str = "lsattr") -> None:
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self.timeout = timeout
        self.chattr_program = chattr_program
        self.lsattr_program = lsattr_program

    def check(self, path: str) -> Path:
        """The path, if it is a regular file strictly below a root and no component is a symbolic link."""
        p = Path(path)
        if not p.is_absolute() or os.path.normpath(path) != path:
            raise Invalid("bad path", f"{path!r} is not a normalised absolute path")
        real = Path(os.path.realpath(p))
        if real != p:
            raise Invalid("bad path", f"{path} goes through a symbolic link")
        if not any(r in real.parents for r in self.roots):
            raise Invalid("path outside the repositories", f"{path} is not below a repository root "
                                                           f"({', '.join(map(str, self.roots)) or 'none configured'})")
        try:
            st = os.lstat(real)
        except FileNotFoundError as e:
            raise Invalid("no such file", f"{path} does not exist") from e
        if not stat.S_ISREG(st.st_mode):
            raise Invalid("not a file", f"{path} is not a regular file")
        return real

    async def set(self, paths: list[str], on: bool) -> dict[str, Any]:
        if not paths or len(paths) > MAX_PATHS:
            raise Invalid("bad paths", f"send 1 to {MAX_PATHS} paths")
        checked = [self.check(p) for p in paths]
        try:
            await chattr.set_immutable(checked, on, timeout=self.timeout, program=self.chattr_program)
        except CommandFailed as e:
            raise Unavailable("chattr failed", f"chattr {'+' if on else '-'}i: {e} (does the filesystem support "
                                               "the immutable attribute?)") from e
        for p in checked:
            log.info("%s %s", "locked" if on else "unlocked", p, extra={"resource": str(p)})
        return {"paths": [str(p) for p in checked], "immutable": on}

    async def status(self, paths: list[str]) -> dict[str, Any]:
        out = {}
        for p in paths:
            real = self.check(p)
            try:
                out[str(real)] = await chattr.immutable(real, timeout=self.timeout, program=self.lsattr_program)
            except CommandFailed as e:
                raise Unavailable("lsattr failed", f"lsattr {real}: {e}") from e
        return {"immutable": out}
