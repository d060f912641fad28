"""Changed block tracking over the VMs' raw source images: block maps, extents and change ids."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import uuid
from typing import Iterator, Optional

BLOCK_SIZE = 64 * 1024  # the granularity of "changed"; VMware's CBT reports 64 KiB-aligned areas too
_DIGEST = 16
_ZERO_DIGEST = bytes(_DIGEST)  # marks an all-zero block (no real digest is this)
_READ_CHUNK = 16 * BLOCK_SIZE
# How many past change ids each disk remembers; older ones force a full copy, like a reset CBT.
HISTORY = 32


@dataclasses.dataclass(frozen=True)
class BlockMap:
    """What a disk held at one moment: a digest per block, all-zero blocks marked as such."""

    size: int
    block_size: int
    digests: bytes

    def blocks(self) -> int:
        return len(self.digests) // _DIGEST

    def digest(self, index: int) -> bytes:
        if index >= self.blocks():
            return _ZERO_DIGEST
        return self.digests[index * _DIGEST:(index + 1) * _DIGEST]

    def is_zero(self, index: int) -> bool:
        return self.digest(index) == _ZERO_DIGEST


@dataclasses.dataclass(frozen=True)
class Extent:
    """A byte range to write; `zero` ranges are sent as write-zeroes, the rest as data."""

    offset: int
    length: int
    zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The allocated ranges of a file (SEEK_DATA/SEEK_HOLE); the whole file where unsupported."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: the rest is a hole
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield offset, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            yield start, end
        offset = end


def allocated_bytes(path: str, start: int = 0, end: Optional[int] = None) -> int:
    """Bytes of `path` within [start, end) that are not holes."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        end = size if end is None else min(end, size)
        return sum(max(0, min(e, end) - max(s, start)) for s, e in data_ranges(f.fileno(), size))


def blocks_in(ranges: "Iterator[tuple[int, int]] | list[tuple[int, int]]", block_size: int = BLOCK_SIZE) -> int:
    """How many `block_size` blocks the [start, end) ranges touch (a block touched twice counts once)."""
    count, last = 0, -1
    for start, end in ranges:
        if end <= start:
            continue
        first, final = start // block_size, (end - 1) // block_size
        first = max(first, last + 1)
        if final >= first:
            count += final - first + 1
            last = final
    return count


def allocated_blocks(path: str, block_size: int = BLOCK_SIZE) -> int:
    """Blocks of `path` holding any allocated byte (what a full copy sends as data)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return blocks_in(list(data_ranges(f.fileno(), size)), block_size)


def offset_after_data(path: str, budget: int) -> int:
    """The smallest offset such that [0, offset) holds `budget` allocated bytes (or the file size)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for s, e in data_ranges(f.fileno(), size):
            if budget <= e - s:
                return s + budget
            budget -= e - s
        return size


def scan(path: str, block_size: int = BLOCK_SIZE) -> BlockMap:
    """Read a raw image once and map it; holes are not read. Blocking: run it in an executor."""
    zero_block = bytes(block_size)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        nblocks = -(-size // block_size)
        out = bytearray(nblocks * _DIGEST)
        chunk = max(block_size, _READ_CHUNK - _READ_CHUNK % block_size)
        for start, end in data_ranges(f.fileno(), size):
            pos = start - start % block_size
            while pos < end:
                buf = os.pread(f.fileno(), min(chunk, size - pos), pos)
                if not buf:
                    break
                view = memoryview(buf)
                for i in range(0, len(buf), block_size):
                    block = view[i:i + block_size]
                    index = (pos + i) // block_size
                    if block == zero_block[:len(block)]:
                        continue  # already marked zero
                    # sha256 (truncated): the fastest hashlib digest here, SHA extensions at work.
                    out[index * _DIGEST:(index + 1) * _DIGEST] = hashlib.sha256(block).digest()[:_DIGEST]
                pos += len(buf)
    return BlockMap(size=size, block_size=block_size, digests=bytes(out))


def changed_extents(old: Optional[BlockMap], new: BlockMap) -> list[Extent]:
    """Runs of blocks whose content differs from `old` (every non-zero block when `old` is None),
    clipped to the new size and merged; a run is either all-zero or all-data."""
    if old is not None and old.block_size != new.block_size:
        old = None
    bs = new.block_size
    runs: list[Extent] = []
    for index in range(new.blocks()):
        digest = new.digest(index)
        if old is None:
            if digest == _ZERO_DIGEST:
                continue
        elif digest == old.digest(index):
            continue
        zero = digest == _ZERO_DIGEST
        offset = index * bs
        length = min(bs, new.size - offset)
        last = runs[-1] if runs else None
        if last is not None and last.end == offset and last.zero == zero:
            runs[-1] = Extent(last.offset, last.length + length, zero)
        else:
            runs.append(Extent(offset, length, zero))
    return runs


def split_extents(extents: list[Extent], max_length: int) -> list[Extent]:
    """Cut long extents so one write never needs more than `max_length` bytes of buffer."""
    out: list[Extent] = []
    for ext in extents:
        if ext.zero:
            out.append(ext)
            continue
        for off in range(ext.offset, ext.end, max_length):
            out.append(Extent(off, min(max_length, ext.end - off), False))
    return out


class DiskTracker:
    """CBT for one disk: a change-id prefix for its lifetime and the block map behind each change id."""

    def __init__(self, seed: str, first_sequence: int = 1) -> None:
        raw = uuid.uuid5(uuid.NAMESPACE_URL, seed).bytes
        hexes = [f"{b:02x}" for b in raw]
        # VMware's form: "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5440".
        self.prefix = " ".join(hexes[:8]) + "-" + " ".join(hexes[8:])
        self._sequence = first_sequence
        self._maps: dict[str, BlockMap] = {}

    def record(self, block_map: BlockMap) -> str:
        """Remember what was just sent and name it with the next change id."""
        change_id = f"{self.prefix}/{self._sequence}"
        self._sequence += 1
        self._maps[change_id] = block_map
        while len(self._maps) > HISTORY:
            del self._maps[next(iter(self._maps))]
        return change_id

    def untracked(self) -> str:
        """The next change id, standing for nothing (change tracking off): its incremental is full."""
        change_id = f"{self.prefix}/{self._sequence}"
        self._sequence += 1
        return change_id

    def lookup(self, change_id: Optional[str]) -> Optional[BlockMap]:
        return self._maps.get(change_id) if change_id else None

    def change_ids(self) -> list[str]:
        return list(self._maps)

    def reset(self) -> None:
        """Forget every change id (as vSphere does when CBT is reset): the next copy is full."""
        self._maps.clear()
