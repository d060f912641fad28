"""A volume's sync stamp: one 4 KiB block at the very end of the block device, beyond any disk it holds.

omad has the stamp of each completed sync written here and compares it before the next one: a CloudStack
snapshot holds the stamp of its moment, so a volume reverted to anything older than the last completed sync,
or created anew, shows another stamp (or none). Read and written with O_DIRECT (open(2)) so that neither a
stale page of the device's cache nor a write still in it can answer for the disk.
"""

from __future__ import annotations

import mmap
import os
import re

BLOCK = 4096
MAGIC = b"OMA-SYNC-STAMP/1\n"
STAMP = re.compile(rb"[0-9a-f]{32}")


class DeviceChanged(Exception):
    """The path no longer names the device that was vouched for (it changed between check and open)."""


def _open(device: str, flags: int, rdev: str | None) -> int:
    """Open the device; with `rdev` ("major:minor"), check the descriptor is that device before any I/O."""
    fd = os.open(device, flags | os.O_DIRECT | os.O_CLOEXEC)
    if rdev is not None:
        st = os.fstat(fd)
        if f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" != rdev:
            os.close(fd)
            raise DeviceChanged(f"{device} is no longer device {rdev}")
    return fd


def _offset(fd: int) -> int:
    size = os.lseek(fd, 0, os.SEEK_END)
    if size < BLOCK:
        raise OSError(f"the device has {size} bytes, too few for a stamp")
    return size - size % BLOCK - BLOCK


def read(device: str, rdev: str | None = None) -> tuple[str, int]:
    """(the stamp, or "" when the block holds none; its offset). Blocking: run it in a thread."""
    fd = _open(device, os.O_RDONLY, rdev)
    try:
        offset = _offset(fd)
        with mmap.mmap(-1, BLOCK) as buf:  # page-aligned, as O_DIRECT wants
            if os.preadv(fd, [buf], offset) != BLOCK:
                raise OSError(f"short read of the stamp at {offset}")
            block = bytes(buf)
    finally:
        os.close(fd)
    if not block.startswith(MAGIC):
        return "", offset
    found = STAMP.match(block, len(MAGIC))
    return (found.group().decode() if found else ""), offset


def write(device: str, stamp: str, rdev: str | None = None) -> int:
    """Write the stamp (32 hex digits) and flush it to the device; returns its offset."""
    if not STAMP.fullmatch(stamp.encode()):
        raise ValueError(f"bad stamp {stamp!r}")
    fd = _open(device, os.O_WRONLY, rdev)
    try:
        offset = _offset(fd)
        with mmap.mmap(-1, BLOCK) as buf:
            buf.write(MAGIC + stamp.encode() + b"\n")
            if os.pwritev(fd, [buf], offset) != BLOCK:
                raise OSError(f"short write of the stamp at {offset}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset
