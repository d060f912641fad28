"""The immutable attribute of a file through its descriptor: FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (ioctl_iflags(2)).

This is what chattr(1) and lsattr(1) do, done on a descriptor the caller opened and checked, so no name is
resolved again between the check and the change.
"""

from __future__ import annotations

import array
import fcntl

# linux/fs.h: _IOR('f', 1, long) and _IOW('f', 2, long); the kernel reads and writes an int.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010


def get_flags(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return buf[0]


def immutable(fd: int) -> bool:
    return bool(get_flags(fd) & FS_IMMUTABLE_FL)


def set_immutable(fd: int, on: bool) -> None:
    """Set or clear the attribute; OSError (EOPNOTSUPP, ENOTTY: the filesystem has none; EPERM) as the kernel
    says."""
    flags = get_flags(fd)
    new = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
    if new != flags:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [new]), True)
