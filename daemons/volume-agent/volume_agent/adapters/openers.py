"""Which processes have a block device open (proc(5): /proc/<pid>/fd/* links), so that a volume is not pulled
from under a qemu-nbd that is writing to it."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def openers(device: Path, proc: Path = PROC) -> list[str]:
    """"<pid> (<comm>)" of every process with `device` open; processes that vanish meanwhile are skipped."""
    target = str(device)
    out = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        fd_dir = Path(entry.path) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd_dir / fd) == target:
                    comm = (Path(entry.path) / "comm").read_text().strip()
                    out.append(f"{entry.name} ({comm})")
                    break
            except OSError:
                continue
    return out
