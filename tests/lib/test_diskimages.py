"""Tests for the disk image builders: every image is read back with user-space tools, never mounted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from .diskimages import (
    Dir,
    DiskImage,
    File,
    MiB,
    Partition,
    Pattern,
    Symlink,
    ToolError,
    Tree,
    dir_manifest,
    ext4_list,
    ext4_manifest,
    ext4_modify,
    extract_partition,
    gpt_ntfs,
    gpt_two_ext4,
    gpt_xfs,
    mbr_ext4,
    mbr_fat,
    partition_table,
    raw_sha256,
    run,
    to_qcow2,
    tree_manifest,
    tree_sha256,
    whole_disk_ext4,
)

TOOLS = ["sfdisk", "mkfs.ext4", "debugfs", "e2fsck", "mkfs.xfs", "xfs_db", "xfs_repair", "mkntfs", "ntfscp",
         "ntfsls", "ntfscat", "ntfsinfo", "mkfs.vfat", "fsck.vfat", "mcopy", "mtype", "blkid", "qemu-img",
         "qemu-io"]  # fmt: skip
pytestmark = [
    pytest.mark.timeout(20),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the trees own files as uids 0, 42 and 1000: chown needs root"
    ),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS),
        reason=f"needs {', '.join(t for t in TOOLS if shutil.which(t) is None)}",
    ),
]

SHADOW_MTIME = 1_000_000_000
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"

# What restore tests meet on a Linux guest: modes, owners, mtimes, empty things and hostile symlinks.
LINUX_TREE: Tree = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/shadow": File(b"root:$6$secret\n", mode=0o640, mtime=SHADOW_MTIME, gid=42),
    "usr/bin/su": File(b"#!suid\n", mode=0o4755),
    "tmp": Dir(mode=0o1777, mtime=1_100_000_000),
    "var/empty": Dir(mode=0o700),
    "empty.txt": b"",
    "home/user/notes.txt": File(b"line\n" * 1000, uid=1000, gid=1000),
    "home/user/evil": Symlink("/etc/shadow"),
    "home/user/up": Symlink("../../.."),
    "home/user/with space.txt": b"spaces are fine\n",
}
SECOND_TREE: Tree = {"data/readme": b"second partition\n", "data/blob.bin": os.urandom(300_000)}
# What a Windows guest holds: no symlinks, no modes; the two symlinks here must be reported as skipped.
WINDOWS_TREE: Tree = {
    "Windows/System32/drivers/etc/hosts": b"127.0.0.1 localhost\r\n",
    "Users/Public/Documents/report.docx": os.urandom(70_000),
    "Users/Public/empty.txt": b"",
    "Users/Public/Desktop": Dir(),
    "Users/Public/Caf\u00e9 na\u00efve.txt": File(b"unicode name\r\n", mtime=SHADOW_MTIME),
    "Users/Public/link": Symlink("C:/Windows"),
    "Users/Public/up": Symlink("../../.."),
}


def _no_space(tree: Tree) -> Tree:
    return {path: node for path, node in tree.items() if " " not in path}


def _blkid(image: Path, partition: Partition) -> dict[str, str]:
    """Filesystem type and label at the partition's offset, probed by libblkid (no mount, no kernel)."""
    out = run(["blkid", "-p", "-o", "export", "-O", str(partition.offset), image]).stdout.decode()
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _check_table(image: DiskImage, label: str, types: list[str]) -> list[dict[str, str | int]]:
    table = partition_table(image.path)
    assert table["label"] == label
    parts: list[dict[str, str | int]] = table["partitions"]
    found = [(int(p["start"]) * 512, int(p["size"]) * 512) for p in parts]
    assert found == [(p.offset, p.size) for p in image.partitions]
    assert [str(p["type"]).upper() for p in parts] == types
    assert all(p.offset % MiB == 0 for p in image.partitions)
    assert image.path.stat().st_size == image.size
    return parts


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _e2fsck_clean(image: Path, offset: int) -> None:
    run(["e2fsck", "-f", "-n", f"{image}?offset={offset}"])  # exit 0: nothing to fix


def _debugfs_stat(image: Path, offset: int, path: str) -> str:
    return run(["debugfs", "-R", f'stat "/{path}"', f"{image}?offset={offset}"]).stdout.decode()


# --- ext4 -------------------------------------------------------------------------------------------


def test_gpt_two_ext4(tmp_path: Path) -> None:
    image = gpt_two_ext4(tmp_path / "disk.raw", LINUX_TREE, SECOND_TREE)
    assert image.size == 128 * MiB and image.table == "gpt"
    parts = _check_table(image, "gpt", [LINUX, LINUX])
    assert [p["name"] for p in parts] == ["root", "data"]
    for partition, tree in zip(image.partitions, [LINUX_TREE, SECOND_TREE], strict=True):
        probe = _blkid(image.path, partition)
        assert (probe["TYPE"], probe["LABEL"]) == ("ext4", partition.label)
        assert ext4_manifest(image.path, partition.offset) == tree_manifest(tree)
        _e2fsck_clean(image.path, partition.offset)
    root = image.partition(1).offset
    entries = ext4_list(image.path, root)
    assert (entries["etc/shadow"].uid, entries["etc/shadow"].gid) == (0, 42)
    assert (entries["home/user/notes.txt"].uid, entries["home/user/notes.txt"].gid) == (1000, 1000)
    assert f"mtime: {SHADOW_MTIME:#x}" in _debugfs_stat(image.path, root, "etc/shadow")
    assert f"mtime: {1_100_000_000:#x}" in _debugfs_stat(image.path, root, "tmp")
    assert 'Fast link dest: "/etc/shadow"' in _debugfs_stat(image.path, root, "home/user/evil")
    dumped = tmp_path / "shadow"
    run(["debugfs", "-R", f"dump /etc/shadow {dumped}", f"{image.path}?offset={root}"])
    assert dumped.read_bytes() == b"root:$6$secret\n"
    assert _allocated(image.path) < 16 * MiB  # sparse: 128 MiB apparent
    assert sorted(os.listdir(tmp_path)) == ["disk.raw", "shadow"]  # no temporary files left


def test_mbr_ext4(tmp_path: Path) -> None:
    image = mbr_ext4(tmp_path / "disk.raw", LINUX_TREE)
    assert image.size == 64 * MiB and image.table == "dos"
    _check_table(image, "dos", ["83"])
    (partition,) = image.partitions
    assert (partition.number, partition.offset, partition.fstype) == (1, MiB, "ext4")
    assert _blkid(image.path, partition)["TYPE"] == "ext4"
    assert ext4_manifest(image.path, partition.offset) == tree_manifest(LINUX_TREE)
    _e2fsck_clean(image.path, partition.offset)


def test_whole_disk_ext4(tmp_path: Path) -> None:
    image = whole_disk_ext4(tmp_path / "disk.raw", LINUX_TREE, label="bare")
    assert image.size == 64 * MiB
    assert image.table is None and image.partitions == (Partition(0, 0, image.size, "ext4", "bare"),)
    with pytest.raises(ToolError, match="partition table"):
        partition_table(image.path)
    probe = _blkid(image.path, image.partitions[0])
    assert (probe["TYPE"], probe["LABEL"]) == ("ext4", "bare")
    assert ext4_manifest(image.path) == tree_manifest(LINUX_TREE)
    _e2fsck_clean(image.path, 0)


def test_big_file_grows_the_filesystem(tmp_path: Path) -> None:
    big = Pattern(200 * MiB, seed=3)
    start = time.monotonic()
    image = whole_disk_ext4(tmp_path / "disk.raw", {"var/big.bin": File(big), "small": b"s"})
    assert time.monotonic() - start < 10
    assert image.size > 200 * MiB
    entries = ext4_list(image.path)
    assert entries["var/big.bin"].size == 200 * MiB
    dumped = tmp_path / "big.out"
    run(["debugfs", "-R", f"dump /var/big.bin {dumped}", f"{image.path}?offset=0"])
    assert raw_sha256(dumped) == tree_sha256({"big": File(big)})["big"]


def test_explicit_size_is_split_between_partitions(tmp_path: Path) -> None:
    image = gpt_two_ext4(tmp_path / "disk.raw", {}, {}, size=256 * MiB)
    assert image.size == 256 * MiB
    assert [(p.offset, p.size) for p in image.partitions] == [(MiB, 127 * MiB), (128 * MiB, 127 * MiB)]
    assert ext4_manifest(image.path, image.partition(2).offset) == {}
    with pytest.raises(ValueError, match="whole MiB"):
        mbr_ext4(tmp_path / "odd.raw", {}, size=64 * MiB + 512)


def test_explicit_size_too_small_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(ToolError) as failure:
        mbr_ext4(tmp_path / "disk.raw", {"big": File(Pattern(80 * MiB))}, size=64 * MiB)
    assert failure.value.argv[0] == "mkfs.ext4" and failure.value.stderr.strip()
    assert os.listdir(tmp_path) == []  # neither the image nor the work directory stays


# --- ext4_modify --------------------------------------------------------------------------------------


def test_ext4_modify_changes_exactly_what_was_asked(tmp_path: Path) -> None:
    image = mbr_ext4(tmp_path / "disk.raw", LINUX_TREE)
    offset = image.partition(1).offset
    ext4_modify(
        image.path,
        offset,
        add={
            "etc/passwd": b"root:x:0:0:changed\n",  # replaced
            "etc/new.conf": File(b"new\n", mode=0o600, mtime=1_300_000_000, uid=7),
            "srv/deep/er/file": b"nested",  # missing parents are created
            "home/user/evil": Symlink("/etc/gshadow"),  # a symlink replaced
            "tmp": Dir(mode=0o1770),  # attributes of an existing directory
            'odd "quoted" name': b"q",
        },
        remove=["usr", "empty.txt"],  # a directory, recursively, and a file
    )
    expected = {p: n for p, n in LINUX_TREE.items() if not p.startswith("usr/") and p != "empty.txt"}
    expected.update({
        "etc/passwd": b"root:x:0:0:changed\n",
        "etc/new.conf": File(b"new\n", mode=0o600),
        "srv/deep/er/file": b"nested",
        "home/user/evil": Symlink("/etc/gshadow"),
        "tmp": Dir(mode=0o1770),
        'odd "quoted" name': b"q",
    })  # fmt: skip
    assert ext4_manifest(image.path, offset) == tree_manifest(expected)
    entries = ext4_list(image.path, offset)
    assert entries["etc/new.conf"].uid == 7
    assert (entries["home/user/notes.txt"].uid, entries["home/user"].mode & 0o7777) == (1000, 0o755)
    assert f"mtime: {1_300_000_000:#x}" in _debugfs_stat(image.path, offset, "etc/new.conf")
    assert f"mtime: {SHADOW_MTIME:#x}" in _debugfs_stat(image.path, offset, "etc/shadow")  # untouched
    _e2fsck_clean(image.path, offset)
    with pytest.raises(FileNotFoundError):
        ext4_modify(image.path, offset, remove=["not/there"])
    assert sorted(os.listdir(tmp_path)) == ["disk.raw"]


def test_ext4_modify_only_touches_changed_blocks(tmp_path: Path) -> None:
    image = gpt_two_ext4(tmp_path / "disk.raw", LINUX_TREE, SECOND_TREE)
    second = image.partition(2)
    before = raw_sha256(image.path, second.offset, second.size)
    ext4_modify(image.path, image.partition(1).offset, add={"etc/hostname": b"vm1\n"})
    assert raw_sha256(image.path, second.offset, second.size) == before
    assert ext4_manifest(image.path, second.offset) == tree_manifest(SECOND_TREE)


# --- xfs ---------------------------------------------------------------------------------------------


def _xfs_db(part: Path, *commands: str) -> str:
    args = [arg for command in commands for arg in ("-c", command)]
    return run(["xfs_db", "-r", *args, part]).stdout.decode()


def _xfs_field(output: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)} = (.*)$", output, re.M)
    assert match, f"{name} not in {output!r}"
    return match.group(1)


def _xfs_read(part: Path, path: str, size: int, blocksize: int) -> bytes:
    """A regular file's bytes, from its block map and the partition file (what xfs_db can tell)."""
    data = bytearray(size)
    with open(part, "rb") as f:
        for line in _xfs_db(part, f"path /{path}", "bmap").splitlines():
            match = re.match(r"data offset (\d+) startblock (\d+) \(\S+\) count (\d+) flag (\d)", line)
            assert match, line
            offset, start, count, flag = map(int, match.groups())
            assert flag == 0  # written, not preallocated
            converted = _xfs_db(part, f"convert fsblock {start} byte")  # "0xc000 (49152)"
            byte = int(converted.split("(")[1].rstrip(")\n"))
            chunk = os.pread(f.fileno(), count * blocksize, byte)
            data[offset * blocksize : offset * blocksize + len(chunk)] = chunk
    return bytes(data[:size])


def _xfs_manifest(part: Path) -> dict[str, str]:
    """tree_manifest-style description of an xfs filesystem file, read with xfs_db only."""
    blocksize = int(_xfs_field(_xfs_db(part, "sb 0", "print blocksize"), "blocksize"))
    manifest: dict[str, str] = {}
    pending = [""]
    while pending:
        directory = pending.pop()
        for line in _xfs_db(part, f"ls /{directory}").splitlines()[1:]:
            _, _, kind, _, _, rest = line.split(maxsplit=5)
            name = rest.rsplit(" (", 1)[0]
            if name in (".", ".."):
                continue
            path = f"{directory}/{name}" if directory else name
            info = _xfs_db(part, f"path /{path}", "print core.mode core.size")
            mode = int(_xfs_field(info, "core.mode"), 8) & 0o7777
            if kind == "directory":
                manifest[path] = f"dir {mode:04o}"
                pending.append(path)
            elif kind == "symlink":
                target = _xfs_field(_xfs_db(part, f"path /{path}", "print u3.symlink"), "u3.symlink")
                manifest[path] = f"link -> {json.loads(target)}"
            else:
                assert kind == "regular", line
                content = _xfs_read(part, path, int(_xfs_field(info, "core.size")), blocksize)
                manifest[path] = f"file {mode:04o} {hashlib.sha256(content).hexdigest()}"
    return manifest


def test_gpt_xfs(tmp_path: Path) -> None:
    tree = {**_no_space(LINUX_TREE), "srv/data.bin": os.urandom(150_000)}
    image = gpt_xfs(tmp_path / "disk.raw", tree)
    _check_table(image, "gpt", [LINUX])
    (partition,) = image.partitions
    assert partition.size >= 300 * MiB and partition.fstype == "xfs"
    probe = _blkid(image.path, partition)
    assert (probe["TYPE"], probe["LABEL"]) == ("xfs", "data")
    part = extract_partition(image.path, partition, tmp_path / "part.xfs")
    run(["xfs_repair", "-n", "-f", part])  # exit 0: consistent
    assert dict(sorted(_xfs_manifest(part).items())) == dict(sorted(tree_manifest(tree).items()))
    shadow = _xfs_db(part, "path /etc/shadow", "print core.mtime.sec core.uid core.gid")
    when = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(SHADOW_MTIME))  # xfs_db prints ctime(3)
    assert _xfs_field(shadow, "core.mtime.sec") == when
    assert _xfs_field(shadow, "core.gid") == "42"
    assert _allocated(image.path) < 16 * MiB  # 302 MiB apparent; the zeroed log is not copied
    assert sorted(os.listdir(tmp_path)) == ["disk.raw", "part.xfs"]


def test_xfs_refuses_what_a_protofile_cannot_say(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        gpt_xfs(tmp_path / "disk.raw", {"a name": b""})
    assert os.listdir(tmp_path) == []


# --- NTFS --------------------------------------------------------------------------------------------


def _ntfs_manifest(part: Path) -> dict[str, str]:
    """tree_manifest(modes=False) description of an NTFS filesystem file, read with ntfsls and ntfscat."""
    listing = run(["ntfsls", "-R", "-F", part], env={"LC_ALL": "C.UTF-8"}).stdout.decode()
    manifest: dict[str, str] = {}
    for block in listing.strip().split("\n\n"):
        header, *names = block.splitlines()
        directory = header.rstrip(":").strip("/")
        for name in names:
            if name in ("./", "../"):
                continue
            path = f"{directory}/{name}".lstrip("/").rstrip("/")
            if name.endswith("/"):
                manifest[path] = "dir"
            else:
                content = run(["ntfscat", part, f"/{path}"], env={"LC_ALL": "C.UTF-8"}).stdout
                manifest[path] = f"file {hashlib.sha256(content).hexdigest()}"
    return manifest


def test_gpt_ntfs(tmp_path: Path) -> None:
    image = gpt_ntfs(tmp_path / "disk.raw", WINDOWS_TREE)
    _check_table(image, "gpt", [BASIC_DATA])
    (partition,) = image.partitions
    assert partition.skipped == ("Users/Public/link", "Users/Public/up")
    probe = _blkid(image.path, partition)
    assert (probe["TYPE"], probe["LABEL"]) == ("ntfs", "Windows")
    part = extract_partition(image.path, partition, tmp_path / "part.ntfs")
    run(["ntfsfix", "-n", part])
    assert _ntfs_manifest(part) == tree_manifest(WINDOWS_TREE, modes=False, symlinks=False)
    info = run(["ntfsinfo", "-F", "/Users/Public/Caf\u00e9 na\u00efve.txt", part], env={"LC_ALL": "C.UTF-8"})
    altered = re.search(r"File Altered Time:\s+(.*) UTC", info.stdout.decode())  # $STANDARD_INFORMATION first
    assert altered and altered.group(1) == time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(SHADOW_MTIME))
    # the boot sector knows where it lives (mkntfs -p), as Windows expects
    hidden = int.from_bytes(part.read_bytes()[0x1C:0x20], "little")
    assert hidden == partition.offset // 512
    assert sorted(os.listdir(tmp_path)) == ["disk.raw", "part.ntfs"]


# --- FAT ---------------------------------------------------------------------------------------------

MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "TZ": "UTC", "LC_ALL": "C.UTF-8"}


def test_mbr_fat(tmp_path: Path) -> None:
    tree = {**WINDOWS_TREE, "EFI/BOOT/BOOTX64.EFI": os.urandom(40_000), "EFI/empty": Dir()}
    image = mbr_fat(tmp_path / "disk.raw", tree)
    _check_table(image, "dos", ["C"])
    (partition,) = image.partitions
    assert partition.skipped == ("Users/Public/link", "Users/Public/up")
    probe = _blkid(image.path, partition)
    assert (probe["TYPE"], probe["LABEL"], probe["VERSION"]) == ("vfat", "OMAFAT", "FAT32")
    part = extract_partition(image.path, partition, tmp_path / "part.fat")
    run(["fsck.vfat", "-n", part])
    where = f"{image.path}@@{partition.offset}"
    hosts = run(["mtype", "-i", where, "::/Windows/System32/drivers/etc/hosts"], env=MTOOLS_ENV).stdout
    assert hosts == b"127.0.0.1 localhost\r\n"
    out = tmp_path / "out"
    out.mkdir()
    run(["mcopy", "-s", "-m", "-i", where, "::/*", out], env=MTOOLS_ENV)  # mtools reads, nothing is mounted
    assert dir_manifest(out, modes=False) == tree_manifest(tree, modes=False, symlinks=False)
    assert (out / "Users/Public/Caf\u00e9 na\u00efve.txt").stat().st_mtime == SHADOW_MTIME
    assert sorted(os.listdir(tmp_path)) == ["disk.raw", "out", "part.fat"]


def test_fat_refuses_names_it_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="case-insensitive"):
        mbr_fat(tmp_path / "disk.raw", {"README": b"1", "readme": b"2"})
    with pytest.raises(ValueError, match="cannot hold"):
        mbr_fat(tmp_path / "disk.raw", {"dir/a:b": b"mtools would write b"})
    assert os.listdir(tmp_path) == []


# --- qcow2 chains -------------------------------------------------------------------------------------


def _layer_bytes(qcow2: Path) -> int:
    """Bytes of guest data that this layer itself holds (qemu-img map depth 0, data)."""
    extents = json.loads(run(["qemu-img", "map", "--output=json", qcow2]).stdout)
    return sum(e["length"] for e in extents if e["depth"] == 0 and e["data"])


def test_to_qcow2_chain_holds_only_the_changes(tmp_path: Path) -> None:
    image = gpt_two_ext4(tmp_path / "v1.raw", LINUX_TREE, SECOND_TREE)
    base = to_qcow2(image.path, tmp_path / "base.qcow2")
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", image.path, base])
    v2 = tmp_path / "v2.raw"
    run(["cp", "--sparse=always", image.path, v2])
    offset = image.partition(1).offset
    ext4_modify(v2, offset, add={"etc/hostname": File(os.urandom(200_000))}, remove=["etc/passwd"])
    with open(v2, "r+b") as f:  # a range that held data and now reads as zeros
        os.pwrite(f.fileno(), bytes(64 * 1024), image.partition(2).offset + 64 * 1024 * 16)
    top = to_qcow2(v2, tmp_path / "top.qcow2", backing=base)
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", v2, top])
    run(["qemu-img", "check", top])
    info = json.loads(run(["qemu-img", "info", "--output=json", top]).stdout)
    assert info["backing-filename"] == "base.qcow2"  # relative: the chain can move as a whole
    assert 200_000 <= _layer_bytes(top) < 2 * MiB
    assert ext4_manifest(v2, offset)["etc/hostname"].startswith("file 0644")
    assert sorted(os.listdir(tmp_path)) == ["base.qcow2", "top.qcow2", "v1.raw", "v2.raw"]


def test_raw_sha256(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert raw_sha256(path) == hashlib.sha256(data).hexdigest()
    assert raw_sha256(path, 1000, 2 * MiB) == hashlib.sha256(data[1000 : 1000 + 2 * MiB]).hexdigest()
    with pytest.raises(EOFError):
        raw_sha256(path, 3 * MiB, MiB)
