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
                for i in range(0, len(buf), block_size):
                    # A bytes slice compares with memcmp; a memoryview compares item by item (10x slower).
                    block = buf[i:i + block_size]
                    index = (pos + i) // block_size
                    if block == (zero_block if len(block) == block_size else bytes(len(block))):
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


Stamp = tuple[int, int, int]  # a source image's (inode, size, mtime_ns)


def stamp_of(path: str) -> Stamp:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a copy of one disk starts from: its new change id, and the areas changed since the base
    change id (None: the base is unknown here, so the copy is full)."""

    change_id: str
    changed: Optional[list[Extent]]


class DiskTracker:
    """CBT for one disk: a change-id prefix for its lifetime and what each change id stands for.

    Change map (how VMware's CBT works, QueryChangedDiskAreas): every write to the source is noted
    (`note`) with the current generation; a snapshot issues a change id for the generation it closes; the
    areas changed since a change id are the blocks noted in a later generation: nothing is read to find
    them. A source whose (inode, size, mtime) moved without a note was written behind the tracker's back:
    like a CBT reset, every change id is forgotten and the next copy is full (never a silently short copy).

    Block maps (the "scan" mode, for callers that cannot say what they changed): a digest per block of
    what each copy sent; an incremental reads and digests the whole source to find the changes."""

    def __init__(self, seed: str, first_sequence: int = 1) -> None:
        raw = uuid.uuid5(uuid.NAMESPACE_URL, seed).bytes
        hexes = [f"{b:02x}" for b in raw]
        # VMware's form: "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5440".
        self.prefix = " ".join(hexes[:8]) + "-" + " ".join(hexes[8:])
        self._sequence = first_sequence
        self._maps: dict[str, BlockMap] = {}
        self._generation = 1  # what writes noted now belong to
        self._issued: dict[str, int] = {}  # change id → the last generation it covers
        self._written: dict[int, int] = {}  # block index → generation of its last noted write
        self._stamp: Optional[Stamp] = None  # the source as last accounted for
        self.resets = 0  # change maps dropped because the source changed without a note

    def _next_id(self) -> str:
        change_id = f"{self.prefix}/{self._sequence}"
        self._sequence += 1
        return change_id

    # -- change map -----------------------------------------------------------------------------------

    def note(self, offset: int, length: int, path: Optional[str] = None, block_size: int = BLOCK_SIZE) -> None:
        """[offset, offset+length) of the source was written (by the caller, who may have written it
        directly: the note then accounts for every write since the last one). `path`: refresh the stamp."""
        if length > 0:
            for index in range(offset // block_size, (offset + length - 1) // block_size + 1):
                self._written[index] = self._generation
        if path is not None:
            self._stamp = stamp_of(path)

    def check(self, path: str) -> bool:
        """False (and the change map dropped) when the source changed since it was last accounted for."""
        now = stamp_of(path)
        if self._stamp is not None and now != self._stamp and (self._issued or self._written):
            self._issued.clear()
            self._written.clear()
            self.resets += 1
            self._stamp = now
            return False
        self._stamp = now
        return True

    def knows(self, change_id: Optional[str]) -> bool:
        return bool(change_id) and (change_id in self._issued or change_id in self._maps)

    def snapshot(self, path: str, base: Optional[str], block_size: int = BLOCK_SIZE) -> Snapshot:
        """Issue the change id of the source as it is now, with the areas changed since `base`."""
        self.check(path)
        size = self._stamp[1] if self._stamp is not None else os.path.getsize(path)
        changed: Optional[list[Extent]] = None
        if base and base in self._issued:
            since = self._issued[base]
            blocks = sorted(i for i, g in self._written.items() if g > since and i * block_size < size)
            changed = []
            for index in blocks:
                offset = index * block_size
                length = min(block_size, size - offset)
                if changed and changed[-1].end == offset:
                    changed[-1] = Extent(changed[-1].offset, changed[-1].length + length)
                else:
                    changed.append(Extent(offset, length))
        change_id = self._next_id()
        self._issued[change_id] = self._generation
        self._generation += 1
        while len(self._issued) > HISTORY:
            del self._issued[next(iter(self._issued))]
        # A write no remembered change id precedes can never be "changed since" one of them again.
        oldest = min(self._issued.values())
        self._written = {i: g for i, g in self._written.items() if g > oldest}
        return Snapshot(change_id, changed)

    # -- block maps -----------------------------------------------------------------------------------

    def record(self, block_map: BlockMap) -> str:
        """Remember what was just sent and name it with the next change id."""
        change_id = self._next_id()
        self._maps[change_id] = block_map
        while len(self._maps) > HISTORY:
            del self._maps[next(iter(self._maps))]
        return change_id

    def untracked(self) -> str:
        """The next change id, standing for nothing (change tracking off): its incremental is full."""
        return self._next_id()

    def lookup(self, change_id: Optional[str]) -> Optional[BlockMap]:
        return self._maps.get(change_id) if change_id else None

    def change_ids(self) -> list[str]:
        return list(self._maps) + list(self._issued)

    def reset(self) -> None:
        """Forget every change id (as vSphere does when CBT is reset): the next copy is full."""
        self._maps.clear()
        self._issued.clear()
        self._written.clear()
