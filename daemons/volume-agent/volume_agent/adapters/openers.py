"""Which processes have a block device open (proc(5): /proc/<pid>/fd/* links), so that a volume is not pulled
from under a qemu-nbd that is writing to it.

Reading another process's fd links is a ptrace-mode read: a process whose capabilities exceed ours (qemu-nbd
under nbd-pool's CAP_SYS_ADMIN, when this agent runs with none) cannot be inspected without CAP_SYS_PTRACE.
Those are reported apart, so the caller knows when the answer is incomplete."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def openers(device: Path, proc: Path = PROC) -> tuple[list[str], int]:
    """("<pid> (<comm>)" of every process with `device` open, how many processes could not be inspected);
    processes that vanish meanwhile are skipped."""
    target = str(device)
    out = []
    hidden = 0
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        fd_dir = Path(entry.path) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            hidden += 1
            continue
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
    return out, hidden
