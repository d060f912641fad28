"""Tests for the user-space partition table reader, checked against partx's own reading of the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nbd_pool.adapters.partitions import PartitionTableError, parse_table, read_partition_table

pytestmark = [pytest.mark.timeout(30)]

MIB = 1024 * 1024


def partx_view(helpers: Any, disk: Path) -> list[tuple[int, int, int]]:
    """(number, start bytes, size bytes) as partx(8) reads the table (libblkid; works on plain files)."""
    out = helpers.sh("partx", "--bytes", "--raw", "--noheadings", "--output", "NR,START,SIZE", disk)
    rows = []
    for line in out.splitlines():
        nr, start, size = line.split()
        rows.append((int(nr), int(start) * 512, int(size)))
    return rows


def blank(path: Path, size: int = 64 * MIB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_gpt_with_two_partitions(tmp_path: Path, helpers: Any) -> None:
    disk, parts = helpers.build_gpt_disk(tmp_path)
    table = read_partition_table(disk)
    assert table.scheme == "gpt" and table.sector_size == 512
    assert [(p.number, p.start, p.size) for p in table.partitions] == [(1, *parts[0]), (2, *parts[1])]
    assert [(p.number, p.start, p.size) for p in table.partitions] == partx_view(helpers, disk)
    assert all(p.type == helpers.LINUX_FS for p in table.partitions)
    assert [p.name for p in table.partitions] == ["part1", "part2"]


def test_gpt_numbers_follow_slots_with_gaps(tmp_path: Path, helpers: Any) -> None:
    disk = blank(tmp_path / "gaps.img")
    script = f"label: gpt\n1: start=2048, size=4096, type={helpers.LINUX_FS}\n3: start=8192, size=4096, type={helpers.LINUX_FS}\n"
    helpers.sh("sfdisk", "-q", disk, input=script.encode())
    table = read_partition_table(disk)
    assert [p.number for p in table.partitions] == [1, 3]
    assert [(p.number, p.start, p.size) for p in table.partitions] == partx_view(helpers, disk)


def test_damaged_primary_gpt_falls_back_to_backup(tmp_path: Path, helpers: Any) -> None:
    disk, parts = helpers.build_gpt_disk(tmp_path)
    with open(disk, "r+b") as f:
        f.seek(512 + 16)  # the primary header's CRC field
        f.write(b"\xff\xff\xff\xff")
    table = read_partition_table(disk)
    assert table.scheme == "gpt"
    assert [(p.start, p.size) for p in table.partitions] == parts


def test_mbr_with_extended_and_logical_partitions(tmp_path: Path, helpers: Any) -> None:
    disk = blank(tmp_path / "mbr.img")
    script = (
        "label: dos\n"
        "start=2048, size=8192, type=83\n"
        "start=10240, size=8192, type=7\n"
        "start=18432, size=40960, type=5\n"
        "start=20480, size=8192, type=83\n"
        "start=30720, size=8192, type=82\n"
    )
    helpers.sh("sfdisk", "-q", disk, input=script.encode())
    table = read_partition_table(disk)
    assert table.scheme == "mbr"
    got = [(p.number, p.start, p.size) for p in table.partitions]
    assert [n for n, _, _ in got] == [1, 2, 3, 5, 6]
    # partx --show lists the extended container at full size; partx --add and the kernel create it as a
    # 1 KiB stub (2 sectors), which is what we report since the kernel's view is what we check against.
    assert got[2] == (3, 18432 * 512, 1024)
    assert [g for g in got if g[0] != 3] == [v for v in partx_view(helpers, disk) if v[0] != 3]
    assert [p.type for p in table.partitions] == ["0x83", "0x07", "0x05", "0x83", "0x82"]


def test_no_table(tmp_path: Path) -> None:
    assert read_partition_table(blank(tmp_path / "empty.img")).scheme == "none"
    short = tmp_path / "short.img"
    short.write_bytes(b"x" * 100)
    assert read_partition_table(short).partitions == ()


def test_protective_mbr_without_gpt_is_an_error(tmp_path: Path, helpers: Any) -> None:
    disk, _ = helpers.build_gpt_disk(tmp_path)
    size = disk.stat().st_size
    with open(disk, "r+b") as f:  # wipe both GPT headers, keep the protective MBR
        f.seek(512)
        f.write(bytes(512))
        f.seek(size - 512)
        f.write(bytes(512))
    with pytest.raises(PartitionTableError, match="protective"):
        read_partition_table(disk)


def test_entry_beyond_the_disk_is_an_error(tmp_path: Path, helpers: Any) -> None:
    disk, _ = helpers.build_gpt_disk(tmp_path)
    data = disk.read_bytes()
    # The same table on a disk cut to half its size: entries end past its last sector.
    with pytest.raises(PartitionTableError):
        parse_table(lambda off, n: data[off : off + n], 32 * MIB)


def test_ebr_chain_loop_terminates() -> None:
    disk = bytearray(8 * MIB)

    def slot(base: int, index: int, ptype: int, lba: int, count: int) -> None:
        off = base + 446 + 16 * index
        disk[off + 4] = ptype
        disk[off + 8 : off + 16] = lba.to_bytes(4, "little") + count.to_bytes(4, "little")

    disk[510:512] = b"\x55\xaa"
    slot(0, 0, 0x05, 2048, 4096)  # extended partition
    for ebr_lba in (2048, 3048):
        disk[ebr_lba * 512 + 510 : ebr_lba * 512 + 512] = b"\x55\xaa"
        slot(ebr_lba * 512, 0, 0x83, 1, 100)
        slot(ebr_lba * 512, 1, 0x05, 1000, 1000)  # next EBR: the second one, which points to itself
    data = bytes(disk)
    table = parse_table(lambda off, n: data[off : off + n], len(data))
    assert [p.number for p in table.partitions] == [1, 5, 6]
