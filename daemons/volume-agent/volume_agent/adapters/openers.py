"""Whether a block device is in use: QEMU's locks on it (proc(5): /proc/locks) and the processes whose
/proc/<pid>/fd links lead to it, so that a volume is not pulled from under a qemu-nbd that writes to it.

qemu-nbd takes open file description locks on the device it serves ("locking" of QEMU's file driver); they
are listed in /proc/locks for anyone to read, by the device node's filesystem and inode. The fd links name
the processes, but reading those of a process with capabilities beyond ours (qemu-nbd under nbd-pool) is a
ptrace-mode access this agent is not granted (no CAP_SYS_PTRACE): such processes are counted, not seen.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

PROC = Path("/proc")
PROC_LOCKS = PROC / "locks"


@dataclasses.dataclass(frozen=True)
class Use:
    processes: tuple[str, ...]  # "<pid> (<comm>)"
    locked: bool  # a lock is held on the device node (QEMU's)
    unreadable: int  # processes whose fd links could not be read

    @property
    def in_use(self) -> bool:
        return bool(self.processes) or self.locked

    def describe(self) -> str:
        who = list(self.processes)
        if self.locked and not who:
            who.append("a QEMU process (it holds a lock on it: an export)")
        return ", ".join(who)


def _locked(device: Path, locks: Path) -> bool:
    st = os.stat(device)
    # /proc/locks writes the node's filesystem as hex major:minor, then its inode in decimal.
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = locks.read_text().splitlines()
    except OSError:
        return False
    return any(key in line.split() for line in lines)


def use_of(device: Path, proc: Path = PROC, locks: Path = PROC_LOCKS) -> Use:
    target = str(device)
    found = []
    unreadable = 0
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        fd_dir = Path(entry.path) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue  # gone meanwhile
        for fd in fds:
            try:
                if os.readlink(fd_dir / fd) == target:
                    found.append(f"{entry.name} ({(Path(entry.path) / 'comm').read_text().strip()})")
                    break
            except OSError:
                continue
    return Use(tuple(found), _locked(device, locks), unreadable)
