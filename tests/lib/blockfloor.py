"""What the replication benchmarks measure the appliance against, on the same kind of device as the CloudStack
simulator's volumes (a loop device over a sparse file): the source disk they copy, `qemu-img convert -n` of it
onto such a device, and the least any writer can pay to put a set of changed blocks onto one (pwrite with
O_DIRECT, then fsync). Used by bench/replication_e2e, bench/sim_writer, bench/backup_e2e and bench/nbd_write."""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

MiB = 1024 * 1024
BLOCK = 64 * 1024  # the simulated CBT's block, and the unit of a changed area


def make_source(path: Path, size: int) -> None:
    """A raw disk whose first half is pseudo-random (one random MiB per position, told apart by its first 8
    bytes) and whose second half is zeros written as data; synced."""
    block = random.Random(1).randbytes(MiB)
    with open(path, "wb") as f:
        for i in range(size // 2 // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])
        zeros = bytes(MiB)
        for _ in range(size // 2 // MiB):
            f.write(zeros)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[str]:
    """A loop device over a new sparse file of `size` bytes, as the simulator attaches a volume; detached and
    the file removed afterwards."""
    with open(backing, "wb") as f:
        f.truncate(size)
    try:
        dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                             text=True).stdout.strip()
        try:
            yield dev
        finally:
            subprocess.run(["losetup", "--detach", dev], check=False)
    finally:
        backing.unlink(missing_ok=True)


def convert_onto(src: Path, dev: str) -> float:
    """Seconds `qemu-img convert -n` takes to copy the raw `src` onto `dev`, until it is on disk (sync)."""
    started = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), dev], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started


def punch(dev: str, offset: int, length: int) -> None:
    """Discard a range of `dev` (the loop device punches a hole in its file), as qemu-nbd's detect-zeroes=unmap
    leaves the zeros of a replication's volume."""
    subprocess.run(["blkdiscard", "--offset", str(offset), "--length", str(length), dev], check=True)


def write_direct(src: Path, dev: str, blocks: Sequence[int]) -> float:
    """Seconds to copy these BLOCK-sized blocks of `src` (page cache) onto `dev` with O_DIRECT pwrites in
    order, then fsync: the least an NBD writer of the same blocks can cost on this device."""
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            started = time.perf_counter()
            for b in blocks:
                os.preadv(sfd, [buf], b * BLOCK)
                os.pwrite(dfd, buf, b * BLOCK)
            os.fsync(dfd)
            return time.perf_counter() - started
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
        buf.close()
