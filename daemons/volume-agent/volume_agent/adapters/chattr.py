"""chattr(1) and lsattr(1): the immutable attribute of files (argv lists only; paths are absolute)."""

from __future__ import annotations

import logging
from pathlib import Path

from oma_common.command import CommandResult, run

log = logging.getLogger("volume_agent.chattr")

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


async def set_immutable(paths: list[Path], on: bool, *, timeout: float, program: str = "chattr") -> CommandResult:
    """`chattr +i|-i FILE...`; CommandFailed carries the exit code and message (e.g. "Operation not
    supported" on a filesystem without the attribute). chattr takes no "--": every path is absolute."""
    return await run([program, "+i" if on else "-i", *map(str, paths)], env=ENV, timeout=timeout, logger=log)


async def immutable(path: Path, *, timeout: float, program: str = "lsattr") -> bool:
    """Whether the file has the immutable attribute (lsattr(1) prints the flags, then the name)."""
    result = await run([program, "-d", str(path)], env=ENV, timeout=timeout, logger=log)
    flags = result.text.split(" ", 1)[0]
    return "i" in flags
