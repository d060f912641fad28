"""Recent log lines of the daemons: from log files (under `make run`) or from the journal (the appliance).

Needs: read access to the files; `journalctl` (systemd) and membership of systemd-journal or adm for the journal.
"""

from __future__ import annotations

import asyncio
import collections
import re
from pathlib import Path

from oma_common.command import run
from oma_common.errors import Unavailable

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
UNITS = ("omad", "nbd-pool", "volume-agent", "restore-mounter")


def level_of(line: str) -> str | None:
    m = _LEVEL.search(line)
    return m.group(1) if m else None


def at_least(line: str, level: str) -> bool:
    found = level_of(line)
    return found is not None and LEVELS.index(found) >= LEVELS.index(level)


def _tail(path: Path, keep: int, level: str) -> list[str]:
    out: collections.deque[str] = collections.deque(maxlen=keep)
    with open(path, errors="replace") as f:
        for line in f:
            if at_least(line, level):
                out.append(f"{path.stem}: {line.rstrip()}")
    return list(out)


async def from_files(paths: list[Path], limit: int, level: str) -> list[str]:
    """The last `limit` lines at `level` or above, each file's in order, files one after another."""
    lines: list[str] = []
    for p in paths:
        if p.exists():
            lines += await asyncio.to_thread(_tail, p, limit, level)
    return lines[-limit:]


async def from_journal(limit: int, level: str) -> list[str]:
    """The journal of the oma units; read generously, then filtered by the level word of each line."""
    args = ["journalctl", "--no-pager", "--output", "cat", "--lines", str(min(limit * 20, 100_000))]
    for u in UNITS:
        args += ["--unit", u]
    try:
        res = await run(args, timeout=30, check=False)
    except Exception as e:  # no journalctl (not a systemd host), or it hung
        raise Unavailable("journal unreadable", f"journalctl: {e}") from e
    return [line for line in res.text.splitlines() if at_least(line, level)][-limit:]
