"""MBR and GPT partition tables read in user space, for kernels that do not parse them (struct, no tools).

Numbering follows the kernel and partx: GPT partitions are numbered by their slot in the entry array
(1-based, empty slots skipped but counted); MBR primaries are 1-4 by slot and logical partitions in an
extended partition are 5, 6, ... in chain order. Layouts: UEFI spec 2.10 ch. 5 (GPT, protective MBR),
and the classic MBR/EBR layout.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

GPT_SIGNATURE = b"EFI PART"
MBR_SIGNATURE = b"\x55\xaa"
MBR_PROTECTIVE = 0xEE
MBR_EXTENDED = (0x05, 0x0F, 0x85)
MAX_GPT_ENTRIES = 1024  # the spec minimum is 128; refuse absurd headers instead of reading megabytes
MAX_LOGICAL = 128  # bound the EBR chain walk (a loop in a corrupt chain must end)

ReadAt = Callable[[int, int], bytes]  # (offset, length) -> bytes, short at end of device


class PartitionTableError(Exception):
    """The table exists but is inconsistent (bad CRCs on both GPT copies, entries outside the disk)."""


@dataclasses.dataclass(frozen=True)
class PartitionEntry:
    number: int
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # GPT: type GUID, upper case; MBR: "0x83"
    name: str = ""  # GPT partition name
    uuid: str = ""  # GPT unique partition GUID


@dataclasses.dataclass(frozen=True)
class PartitionTable:
    scheme: str  # "gpt", "mbr" or "none"
    sector_size: int
    partitions: tuple[PartitionEntry, ...]
    disk_id: str = ""  # GPT disk GUID or MBR signature as 0x%08x


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw)).upper()


def _parse_gpt_header(sector: bytes) -> dict[str, int | str] | None:
    if len(sector) < 92 or sector[:8] != GPT_SIGNATURE:
        return None
    (hsize,) = struct.unpack_from("<I", sector, 12)
    if hsize < 92 or hsize > len(sector):
        return None
    (crc,) = struct.unpack_from("<I", sector, 16)
    if zlib.crc32(sector[:16] + b"\0\0\0\0" + sector[20:hsize]) != crc:
        return None
    my_lba, alt_lba, first, last = struct.unpack_from("<QQQQ", sector, 24)
    disk_guid = _guid(sector[56:72])
    entries_lba, count, esize, ecrc = struct.unpack_from("<QIII", sector, 72)
    return {
        "my_lba": my_lba, "alt_lba": alt_lba, "first": first, "last": last, "disk_guid": disk_guid,
        "entries_lba": entries_lba, "count": count, "esize": esize, "ecrc": ecrc,
    }  # fmt: skip


def _gpt_entries(read_at: ReadAt, hdr: dict[str, int | str], ss: int, disk_size: int) -> tuple[PartitionEntry, ...] | None:
    count, esize = int(hdr["count"]), int(hdr["esize"])
    if count > MAX_GPT_ENTRIES or esize < 128 or esize % 8:
        return None
    raw = read_at(int(hdr["entries_lba"]) * ss, count * esize)
    if len(raw) != count * esize or zlib.crc32(raw) != int(hdr["ecrc"]):
        return None
    out = []
    for i in range(count):
        e = raw[i * esize : (i + 1) * esize]
        if e[:16] == b"\0" * 16:
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        if last < first or (last + 1) * ss > disk_size:
            raise PartitionTableError(f"GPT entry {i + 1} lies outside the disk (LBA {first}-{last})")
        name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        out.append(PartitionEntry(i + 1, first * ss, (last - first + 1) * ss, _guid(e[:16]), name, _guid(e[16:32])))
    return tuple(out)


def _read_gpt(read_at: ReadAt, disk_size: int, ss: int) -> PartitionTable | None:
    primary = _parse_gpt_header(read_at(ss, ss))
    candidates = [primary] if primary else []
    # The backup header sits in the last LBA; use it when the primary is damaged.
    last_lba = disk_size // ss - 1
    if primary is None and last_lba > 1:
        backup = _parse_gpt_header(read_at(last_lba * ss, ss))
        if backup:
            candidates.append(backup)
    for hdr in candidates:
        entries = _gpt_entries(read_at, hdr, ss, disk_size)
        if entries is not None:
            return PartitionTable("gpt", ss, entries, str(hdr["disk_guid"]))
    if candidates:
        raise PartitionTableError("GPT header found but its partition entries fail their CRC")
    return None


def _mbr_slots(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sectors) of the four slots of an MBR or EBR."""
    slots = []
    for i in range(4):
        off = 446 + 16 * i
        ptype = sector[off + 4]
        lba, count = struct.unpack_from("<II", sector, off + 8)
        slots.append((ptype, lba, count))
    return slots


def _read_mbr(read_at: ReadAt, mbr: bytes, disk_size: int, ss: int) -> PartitionTable:
    out: list[PartitionEntry] = []
    extended: tuple[int, int] | None = None
    for i, (ptype, lba, count) in enumerate(_mbr_slots(mbr)):
        if ptype == 0 or count == 0:
            continue
        if ptype in MBR_EXTENDED:
            extended = (lba, count)
            # partx and the kernel list the extended container itself, as a 1 KiB stub.
            out.append(PartitionEntry(i + 1, lba * ss, min(count * ss, 2 * ss if ss == 512 else ss), f"0x{ptype:02x}"))
            continue
        out.append(PartitionEntry(i + 1, lba * ss, count * ss, f"0x{ptype:02x}"))
    if extended is not None:
        out += _read_logical(read_at, extended[0], ss)
    for p in out:
        if p.start + p.size > disk_size:
            raise PartitionTableError(f"MBR partition {p.number} lies outside the disk")
    (sig,) = struct.unpack_from("<I", mbr, 440)
    return PartitionTable("mbr", ss, tuple(out), f"0x{sig:08x}")


def _read_logical(read_at: ReadAt, ext_start: int, ss: int) -> list[PartitionEntry]:
    out: list[PartitionEntry] = []
    ebr_lba = ext_start
    seen: set[int] = set()
    number = 5
    while ebr_lba not in seen and len(seen) < MAX_LOGICAL:
        seen.add(ebr_lba)
        ebr = read_at(ebr_lba * ss, 512)
        if len(ebr) < 512 or ebr[510:512] != MBR_SIGNATURE:
            break
        slots = _mbr_slots(ebr)
        ptype, lba, count = slots[0]
        if ptype != 0 and count != 0:
            out.append(PartitionEntry(number, (ebr_lba + lba) * ss, count * ss, f"0x{ptype:02x}"))
            number += 1
        ntype, nlba, _ = slots[1]
        if ntype not in MBR_EXTENDED or nlba == 0:
            break
        ebr_lba = ext_start + nlba  # next EBR: relative to the start of the extended partition
    return out


def parse_table(read_at: ReadAt, disk_size: int, sector_size: int = 512) -> PartitionTable:
    """Read the table through `read_at`. A protective MBR means GPT; a valid GPT wins over a hybrid MBR."""
    mbr = read_at(0, 512)
    if len(mbr) < 512:
        return PartitionTable("none", sector_size, ())
    has_mbr = mbr[510:512] == MBR_SIGNATURE
    gpt = _read_gpt(read_at, disk_size, sector_size)
    if gpt is not None:
        return gpt
    if has_mbr:
        slots = _mbr_slots(mbr)
        if any(t == MBR_PROTECTIVE for t, _, _ in slots):
            # Protective MBR without a readable GPT at this sector size: try the other common one.
            other = 4096 if sector_size == 512 else 512
            gpt = _read_gpt(read_at, disk_size, other)
            if gpt is not None:
                return gpt
            raise PartitionTableError("protective MBR but no valid GPT")
        if all(t == 0 for t, _, _ in slots):
            return PartitionTable("none", sector_size, ())
        return _read_mbr(read_at, mbr, disk_size, sector_size)
    return PartitionTable("none", sector_size, ())


def read_partition_table(path: Path, sector_size: int | None = None) -> PartitionTable:
    """Open a device or image file read-only and parse its table (blocking: call it in an executor)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if sector_size is None:
            sector_size = _logical_sector_size(path)

        def read_at(offset: int, length: int) -> bytes:
            # A table names offsets up to 2^64 sectors: past the end nothing is there (pread would overflow).
            if offset >= size:
                return b""
            return os.pread(fd, min(length, size - offset), offset)

        return parse_table(read_at, size, sector_size)
    finally:
        os.close(fd)


def _logical_sector_size(path: Path) -> int:
    # Block devices report theirs in sysfs; image files use 512, as a loop device over them would.
    try:
        real = Path(os.path.realpath(path))
        if real.parent == Path("/dev"):
            return int(Path(f"/sys/class/block/{real.name}/queue/logical_block_size").read_text())
    except (OSError, ValueError):
        pass
    return 512
