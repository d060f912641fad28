"""Build small raw disk images (GPT/MBR; ext4, xfs, NTFS, FAT) from file trees without mounting anything."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .filetree import (
    CHUNK,
    Dir,
    File,
    Node,
    Pattern,
    Symlink,
    Tree,
    check_path,
    dir_manifest,
    dir_sha256,
    materialize,
    normalize,
    tree_manifest,
    tree_sha256,
)
from .ntfs3g import NtfsVolume

__all__ = [
    "Dir",
    "DiskImage",
    "Ext4Stat",
    "File",
    "MiB",
    "Partition",
    "Pattern",
    "Symlink",
    "ToolError",
    "Tree",
    "dir_manifest",
    "dir_sha256",
    "ext4_extract",
    "ext4_list",
    "ext4_manifest",
    "ext4_modify",
    "extract_partition",
    "gpt_ntfs",
    "gpt_two_ext4",
    "gpt_xfs",
    "materialize",
    "mbr_ext4",
    "mbr_fat",
    "normalize",
    "partition_table",
    "raw_sha256",
    "run",
    "to_qcow2",
    "tree_manifest",
    "tree_sha256",
    "whole_disk_ext4",
]

MiB = 1024 * 1024
SECTOR = 512
CLUSTER = 64 * 1024  # qcow2's default cluster size: the unit to_qcow2 compares and writes

# Partition type codes as sfdisk takes them.
_GPT_TYPE = {
    "ext4": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",  # Linux filesystem
    "xfs": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",  # Microsoft basic data
    "vfat": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
}
_MBR_TYPE = {"ext4": "83", "xfs": "83", "ntfs": "7", "vfat": "c"}  # c: FAT32 (LBA)

# Room for metadata on top of the data when sizing automatically (journal/log, inode tables, MFT, FATs).
_OVERHEAD = {"ext4": 32 * MiB, "xfs": 96 * MiB, "ntfs": 32 * MiB, "vfat": 8 * MiB}


class ToolError(RuntimeError):
    """An external program failed; carries its argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str, stdout: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        # Some tools (mcopy) put their complaint on stdout; show its end when stderr is silent.
        said = stderr.strip() or stdout.strip()[-2000:] or "(no output)"
        super().__init__(f"{argv[0]} failed ({returncode}): {said}; argv={argv}")


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program (argv list, no shell) and return its output; raise ToolError if it fails."""
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(
        args,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
        check=False,
    )
    if proc.returncode != 0:
        raise ToolError(args, proc.returncode, _text(proc.stderr), _text(proc.stdout))
    return proc


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


@contextlib.contextmanager
def _workdir(beside: Path) -> Iterator[Path]:
    """A temporary directory next to `beside` (same filesystem, so sparse files stay cheap)."""
    with tempfile.TemporaryDirectory(dir=beside.parent, prefix=f".{beside.name}.") as name:
        yield Path(name)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _copy_sparse(
    src: Path, dst: Path, *, dst_offset: int = 0, src_offset: int = 0, length: int | None = None
) -> None:
    """Copy `length` bytes of `src` from `src_offset` into `dst` at `dst_offset`, leaving holes and
    all-zero clusters unwritten (so the destination range must already read as zeros)."""
    zero = bytes(CLUSTER)
    with open(src, "rb") as s, open(dst, "r+b") as d:
        fd = s.fileno()
        end = os.fstat(fd).st_size if length is None else src_offset + length
        pos = src_offset
        while pos < end:
            start = _next_data(fd, pos, end)
            stop = min(end, os.lseek(fd, start, os.SEEK_HOLE)) if start < end else end
            for off in range(start, stop, CLUSTER):
                block = os.pread(fd, min(CLUSTER, stop - off), off)
                if block != zero[: len(block)]:
                    os.pwrite(d.fileno(), block, dst_offset + off - src_offset)
            pos = stop


def _next_data(fd: int, pos: int, end: int) -> int:
    """The first offset >= pos that holds data (SEEK_DATA), or `end` if only a hole is left."""
    try:
        return min(end, os.lseek(fd, pos, os.SEEK_DATA))
    except OSError as e:
        if e.errno == errno.ENXIO:
            return end
        raise


# ---------------------------------------------------------------------------------------------------
# Disk layout


@dataclass(frozen=True)
class Partition:
    number: int  # slot in the partition table, 1-based; 0 for a filesystem on the whole disk
    offset: int  # bytes from the start of the image
    size: int  # bytes
    fstype: str  # "ext4", "xfs", "ntfs" or "vfat"
    label: str  # filesystem label (also the GPT partition name)
    skipped: tuple[str, ...] = ()  # tree paths this filesystem cannot hold and that were left out


@dataclass(frozen=True)
class DiskImage:
    path: Path  # the raw, sparse image
    size: int
    table: str | None  # "gpt", "dos" or None for a bare filesystem
    partitions: tuple[Partition, ...]

    def partition(self, number: int) -> Partition:
        return next(p for p in self.partitions if p.number == number)


@dataclass(frozen=True)
class _Spec:
    fstype: str
    tree: Tree
    label: str
    size: int | None  # filesystem bytes; None: fit the tree, but no less than `floor`
    floor: int = 62 * MiB


def _fit(spec: _Spec) -> int:
    """Filesystem size for a tree: its data plus generous metadata room, at least the spec's floor."""
    nodes = normalize(spec.tree).values()
    data = sum(_round_up(n.size, 4096) for n in nodes if isinstance(n, File))
    need = data + data // 8 + 4096 * len(nodes) + _OVERHEAD[spec.fstype]
    return max(spec.floor, _round_up(need, MiB))


def partition_table(image: Path) -> dict[str, Any]:
    """The image's partition table as `sfdisk --json` reports it (the "partitiontable" object)."""
    table: dict[str, Any] = json.loads(run(["sfdisk", "--json", image]).stdout)["partitiontable"]
    return table


def extract_partition(image: Path | str, partition: Partition, dest: Path | str) -> Path:
    """Copy one partition of a raw image into a new sparse file (for tools that take no offset)."""
    dest = Path(dest)
    _sparse_file(dest, partition.size)
    _copy_sparse(Path(image), dest, src_offset=partition.offset, length=partition.size)
    return dest


def _write_table(image: Path, table: str, specs: Sequence[_Spec], layout: Sequence[tuple[int, int]]) -> None:
    lines = [f"label: {table}"]
    for spec, (offset, size) in zip(specs, layout, strict=True):
        line = f"start={offset // SECTOR}, size={size // SECTOR}"
        if table == "gpt":
            if re.search(r'[",\\]', spec.label):
                raise ValueError(f"label unusable as a GPT partition name: {spec.label!r}")
            line += f', type={_GPT_TYPE[spec.fstype]}, name="{spec.label}"'
        else:
            line += f", type={_MBR_TYPE[spec.fstype]}"
        lines.append(line)
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image],
        input="\n".join(lines).encode() + b"\n",
    )
    found = [
        (int(p["start"]) * SECTOR, int(p["size"]) * SECTOR) for p in partition_table(image)["partitions"]
    ]
    if found != list(layout):
        raise RuntimeError(f"sfdisk laid out {found}, expected {list(layout)}")


def _build(path: Path | str, table: str | None, specs: Sequence[_Spec]) -> DiskImage:
    path = Path(path).absolute()
    sizes = [spec.size if spec.size is not None else _fit(spec) for spec in specs]
    if any(size % MiB for size in sizes):
        raise ValueError(f"filesystem sizes must be whole MiB: {sizes}")
    margin = MiB if table else 0  # 1 MiB alignment in front, room for the backup GPT behind
    layout, offset = [], margin
    for size in sizes:
        layout.append((offset, size))
        offset += size
    disk_size = offset + margin
    try:
        with _workdir(path) as work:
            _sparse_file(path, disk_size)
            if table:
                _write_table(path, table, specs, layout)
            partitions = []
            for number, (spec, (offset, size)) in enumerate(zip(specs, layout, strict=True), start=1):
                skipped = _WRITERS[spec.fstype](path, offset, size, spec, work)
                partitions.append(
                    Partition(number if table else 0, offset, size, spec.fstype, spec.label, tuple(skipped))
                )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return DiskImage(path, disk_size, table, tuple(partitions))


def _fs_size(size: int | None, table: bool, parts: int = 1) -> int | None:
    """Per-filesystem size for a requested disk size (None: fit each tree)."""
    if size is None:
        return None
    if size % MiB:
        raise ValueError(f"image size must be whole MiB: {size}")
    usable = size - (2 * MiB if table else 0)
    return usable // parts // MiB * MiB


# ---------------------------------------------------------------------------------------------------
# Filesystem writers: (image, offset, size, spec, workdir) -> paths left out


def _write_ext4(image: Path, offset: int, size: int, spec: _Spec, work: Path) -> list[str]:
    src = work / "ext4-root"
    src.mkdir(mode=0o755)
    src.chmod(0o755)  # the root directory's mode comes from here; mkdir's is filtered by the umask
    materialize(spec.tree, src)
    # -E offset writes straight into the disk image (mke2fs(8)); -d copies modes, owners, mtimes, symlinks.
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", spec.label, "-d", src,
         "-E", f"offset={offset}", image, f"{size // 1024}k"])  # fmt: skip
    shutil.rmtree(src)
    return []


def _xfs_mode(node: Node) -> str:
    """The six-character mode of mkfs.xfs(8)'s protofile: type, setuid, setgid, three octal digits."""
    kind = "l" if isinstance(node, Symlink) else "d" if isinstance(node, Dir) else "-"
    mode = 0o777 if isinstance(node, Symlink) else node.mode
    suid = "u" if mode & stat.S_ISUID else "-"
    sgid = "g" if mode & stat.S_ISGID else "-"
    return f"{kind}{suid}{sgid}{mode & 0o777:03o}"


def _xfs_protofile(nodes: Mapping[str, Node], sources: Mapping[str, str]) -> str:
    children: dict[str, list[str]] = {"": []}
    for path in nodes:
        parent = path.rpartition("/")[0]
        children[parent].append(path)
        if isinstance(nodes[path], Dir):
            children[path] = []
    lines = ["oma-diskimages", "0 0", "d--755 0 0"]  # boot image (unused), block/inode counts (ignored), root

    def emit(directory: str, depth: int) -> None:
        for path in children[directory]:
            node, name = nodes[path], path.rpartition("/")[2]
            # The protofile is whitespace-separated and "$" closes a directory: such names cannot be said.
            for token in (name, node.target if isinstance(node, Symlink) else ""):
                if re.search(r"\s", token) or token == "$":
                    raise ValueError(f"xfs protofile cannot express {path!r} (whitespace or '$')")
            words = [name, _xfs_mode(node), str(node.uid), str(node.gid)]
            if isinstance(node, File):
                words.append(sources[path])
            elif isinstance(node, Symlink):
                words.append(node.target)
            lines.append("  " * depth + " ".join(words))
            if isinstance(node, Dir):
                emit(path, depth + 1)
                lines.append("  " * depth + "$")

    emit("", 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def _xfs_fixups(nodes: Mapping[str, Node]) -> list[str]:
    """xfs_db commands for what a protofile cannot set: the sticky bit and mtimes."""
    commands: list[str] = []
    for path, node in nodes.items():
        edits = []
        if not isinstance(node, Symlink) and node.mode & stat.S_ISVTX:
            kind = stat.S_IFDIR if isinstance(node, Dir) else stat.S_IFREG
            edits.append(f"write core.mode 0{kind | node.mode:o}")
        if node.mtime is not None:
            # With bigtime (forced at mkfs) the on-disk value is nanoseconds since 1901-12-13 (2**31 s before
            # the epoch), and xfs_db writes it raw (xfs_db(8): "timestamp fields ... bigtime").
            edits.append(f"write core.mtime.sec {(node.mtime + 2**31) * 10**9}")
        if edits:
            commands += [f"path /{path}", *edits]
    return commands


def _write_xfs(image: Path, offset: int, size: int, spec: _Spec, work: Path) -> list[str]:
    nodes = normalize(spec.tree)
    sources: dict[str, str] = {}
    data = work / "xfs-data"
    data.mkdir()
    for index, (path, node) in enumerate(nodes.items()):
        if isinstance(node, File):
            sources[path] = str(index)  # relative to cwd: the protofile cannot quote a path with spaces
            with open(data / str(index), "wb") as f:
                for chunk in node.chunks():
                    f.write(chunk)
    proto = work / "xfs.proto"
    proto.write_text(_xfs_protofile(nodes, sources))
    part = work / "xfs.img"
    _sparse_file(part, size)
    run(["mkfs.xfs", "-q", "-f", "-m", "bigtime=1", "-L", spec.label, "-p", proto, part], cwd=data)
    shutil.rmtree(data)
    fixups = _xfs_fixups(nodes)
    if fixups:
        proc = run(["xfs_db", "-x", part], input="\n".join(fixups).encode() + b"\n")
        if proc.stderr.strip():  # xfs_db reports a failed command on stderr and still exits 0
            raise ToolError(["xfs_db", "-x", str(part)], 0, _text(proc.stderr))
    _copy_sparse(part, image, dst_offset=offset)
    part.unlink()
    return []


def _write_ntfs(image: Path, offset: int, size: int, spec: _Spec, work: Path) -> list[str]:
    nodes = normalize(spec.tree)
    part = work / "ntfs.img"
    _sparse_file(part, size)
    # -p/-H/-S fill the boot sector's geometry as Windows expects it; a plain file has none to detect.
    run(["mkntfs", "-q", "-Q", "-F", "-s", str(SECTOR), "-p", str(offset // SECTOR), "-H", "255", "-S", "63",
         "-L", spec.label, part])  # fmt: skip
    with NtfsVolume(part) as volume:
        for path, node in nodes.items():
            if isinstance(node, Dir):
                volume.mkdir(path)
    source = work / "ntfs-file"
    env = {"LC_ALL": "C.UTF-8"}  # ntfscp converts names with the locale's multibyte charset
    for path, node in nodes.items():
        if isinstance(node, File):
            with open(source, "wb") as f:
                for chunk in node.chunks():
                    f.write(chunk)
            if node.mtime is not None:
                os.utime(source, (node.mtime, node.mtime))
            run(["ntfscp", "-q", "-t", part, source, f"/{path}"], env=env)  # -t copies the mtime
            source.unlink()
    _copy_sparse(part, image, dst_offset=offset)
    part.unlink()
    # ntfs-3g's tools make no symlinks (Windows ones are reparse points); modes and owners do not exist.
    return [path for path, node in nodes.items() if isinstance(node, Symlink)]


def _write_fat(image: Path, offset: int, size: int, spec: _Spec, work: Path) -> list[str]:
    nodes = normalize(spec.tree)
    skipped = [path for path, node in nodes.items() if isinstance(node, Symlink)]  # FAT has no symlinks
    kept = {path: node for path, node in nodes.items() if not isinstance(node, Symlink)}
    folded: dict[str, str] = {}
    for path in kept:
        # Characters VFAT names cannot hold; mtools would rename or drop them ("a:b" reads as drive a:).
        if re.search(r'[\x00-\x1f"*:<>?\\|]', path):
            raise ValueError(f"FAT cannot hold the name {path!r}")
        other = folded.setdefault(path.casefold(), path)
        if other != path:  # mcopy would stop and ask what to do
            raise ValueError(f"FAT names are case-insensitive: {other!r} and {path!r} collide")
    fat32 = ["mkfs.vfat", "-F", "32", "--offset", str(offset // SECTOR), "-n", spec.label]
    run([*fat32, image, str(size // 1024)])
    src = work / "fat-root"
    src.mkdir()
    materialize(kept, src)
    top = [src / path for path in kept if "/" not in path]
    if top:
        # TZ=UTC: FAT stores local time. MTOOLS_SKIP_CHECK: a partition file has no geometry to check.
        env = {"LC_ALL": "C.UTF-8", "TZ": "UTC", "MTOOLS_SKIP_CHECK": "1"}
        run(["mcopy", "-s", "-m", "-i", f"{image}@@{offset}", *top, "::/"], env=env)
    shutil.rmtree(src)
    return skipped


_WRITERS = {"ext4": _write_ext4, "xfs": _write_xfs, "ntfs": _write_ntfs, "vfat": _write_fat}


# ---------------------------------------------------------------------------------------------------
# Builders. `size` is the whole image in bytes (whole MiB); None fits the trees. Images are sparse.


def gpt_two_ext4(
    path: Path | str,
    tree1: Tree,
    tree2: Tree,
    *,
    size: int | None = None,
    labels: tuple[str, str] = ("root", "data"),
) -> DiskImage:
    """GPT with two ext4 partitions; a given `size` is split evenly between them (default ~128 MiB)."""
    each = _fs_size(size, True, 2)
    specs = [_Spec("ext4", tree1, labels[0], each, 63 * MiB), _Spec("ext4", tree2, labels[1], each, 63 * MiB)]
    return _build(path, "gpt", specs)


def mbr_ext4(path: Path | str, tree: Tree, *, size: int | None = None, label: str = "root") -> DiskImage:
    """MBR (dos) with one ext4 partition (default 64 MiB)."""
    return _build(path, "dos", [_Spec("ext4", tree, label, _fs_size(size, True))])


def whole_disk_ext4(
    path: Path | str, tree: Tree, *, size: int | None = None, label: str = "data"
) -> DiskImage:
    """ext4 on the whole disk, no partition table (default 64 MiB)."""
    return _build(path, None, [_Spec("ext4", tree, label, _fs_size(size, False), 64 * MiB)])


def gpt_xfs(path: Path | str, tree: Tree, *, size: int | None = None, label: str = "data") -> DiskImage:
    """GPT with one xfs partition; mkfs.xfs needs 300 MiB, so the sparse image is 302 MiB by default."""
    # mkfs.xfs >= 5.19 refuses filesystems under 300 MiB ("Filesystem must be larger than 300MB").
    return _build(path, "gpt", [_Spec("xfs", tree, label, _fs_size(size, True), 300 * MiB)])


def gpt_ntfs(path: Path | str, tree: Tree, *, size: int | None = None, label: str = "Windows") -> DiskImage:
    """GPT with one NTFS partition (default 64 MiB); symlinks are skipped, modes and owners ignored."""
    return _build(path, "gpt", [_Spec("ntfs", tree, label, _fs_size(size, True))])


def mbr_fat(path: Path | str, tree: Tree, *, size: int | None = None, label: str = "OMAFAT") -> DiskImage:
    """MBR with one FAT32 partition (default 64 MiB); symlinks are skipped, modes and owners ignored."""
    return _build(path, "dos", [_Spec("vfat", tree, label, _fs_size(size, True))])


# ---------------------------------------------------------------------------------------------------
# ext4 through debugfs(8): read and change a filesystem inside a raw image without mounting it


def _debugfs_quote(text: str) -> str:
    # debugfs splits commands with libss: double quotes group words, "" inside them is a literal quote.
    if any(c in text for c in "\0\n"):
        raise ValueError(f"debugfs cannot take {text!r}")
    return '"' + text.replace('"', '""') + '"'


def _debugfs(image: Path, offset: int, commands: Sequence[str], *, write: bool = False) -> list[list[str]]:
    """Run debugfs commands on the filesystem at `offset`; return each command's output lines."""
    if "?" in str(image):
        raise ValueError(f"debugfs reads '?' in {image} as the start of its options")
    argv = ["debugfs", *(["-w"] if write else []), "-f", "-", f"{image}?offset={offset}"]
    proc = run(argv, input="".join(c + "\n" for c in commands).encode())
    # debugfs exits 0 even when a command fails; the failure is on stderr, after its version banner.
    errors = [line for line in _text(proc.stderr).splitlines() if line and not line.startswith("debugfs ")]
    if errors:
        raise ToolError(argv, 0, "\n".join(errors))
    outputs: list[list[str]] = []
    for line in _text(proc.stdout).splitlines():
        if line.startswith("debugfs: "):  # the echo of the next command
            outputs.append([])
        elif outputs:
            outputs[-1].append(line)
    if len(outputs) != len(commands):
        raise RuntimeError(f"debugfs echoed {len(outputs)} of {len(commands)} commands")
    return outputs


@dataclass(frozen=True)
class Ext4Stat:
    mode: int  # st_mode, file type bits included
    uid: int
    gid: int
    size: int  # 0 for directories

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


# debugfs "ls -p" prints /inode/mode/uid/gid/name/size/ (size empty for directories).
_LS_P = re.compile(r"^/(\d+)/(\d+)/(\d+)/(\d+)/([^/]*)/(\d*)/$")


def ext4_list(image: Path, offset: int = 0) -> dict[str, Ext4Stat]:
    """Every entry of the ext4 filesystem at `offset` (lost+found included), by relative path."""
    found: dict[str, Ext4Stat] = {}
    level = [""]
    while level:  # one debugfs run per directory depth
        outputs = _debugfs(image, offset, [f"ls -p {_debugfs_quote('/' + d)}" for d in level])
        deeper = []
        for directory, lines in zip(level, outputs, strict=True):
            for line in filter(None, lines):
                match = _LS_P.match(line)
                if not match:
                    raise RuntimeError(f"unexpected debugfs ls -p line: {line!r}")
                _, mode, uid, gid, name, size = match.groups()
                if name in (".", ".."):
                    continue
                path = f"{directory}/{name}" if directory else name
                found[path] = Ext4Stat(int(mode, 8), int(uid), int(gid), int(size or 0))
                if stat.S_ISDIR(int(mode, 8)):
                    deeper.append(path)
        level = deeper
    return found


def ext4_extract(image: Path, offset: int, dest: Path) -> None:
    """Copy the whole filesystem into the existing directory `dest` with debugfs rdump.

    rdump keeps contents, symlink targets, owners and mtimes, but drops setuid/setgid (it chowns after
    chmod); take modes from ext4_list.
    """
    _debugfs(image, offset, [f"rdump / {_debugfs_quote(str(dest))}"])


def ext4_manifest(
    image: Path, offset: int = 0, *, modes: bool = True, skip: Iterable[str] = ("lost+found",)
) -> dict[str, str]:
    """tree_manifest-style description of the filesystem at `offset`, comparable with a Tree's."""
    image = Path(image).absolute()
    entries = ext4_list(image, offset)
    with _workdir(image) as work:
        ext4_extract(image, offset, work)
        manifest = dir_manifest(work, modes=False)
    skipped = tuple(skip)
    result: dict[str, str] = {}
    for path, line in manifest.items():
        if any(path == s or path.startswith(s + "/") for s in skipped):
            continue
        kind, _, rest = line.partition(" ")
        if modes and kind in ("file", "dir"):
            line = f"{kind} {stat.S_IMODE(entries[path].mode):04o}" + (f" {rest}" if rest else "")
        result[path] = line
    return result


def _ext4_rm(path: str, existing: Mapping[str, Ext4Stat]) -> list[str]:
    """debugfs commands removing `path` and, for a directory, everything below it (deepest first)."""
    below = sorted((p for p in existing if p.startswith(path + "/")), key=lambda p: -p.count("/"))
    commands = []
    for p in [*below, path]:
        commands.append(f"{'rmdir' if existing[p].is_dir else 'rm'} {_debugfs_quote('/' + p)}")
    return commands


def _ext4_attrs(path: str, node: Node) -> list[str]:
    quoted = _debugfs_quote("/" + path)
    commands = [f"sif {quoted} uid {node.uid}", f"sif {quoted} gid {node.gid}"]
    if isinstance(node, Dir):
        commands.append(f"sif {quoted} mode 0{stat.S_IFDIR | node.mode:o}")
    elif isinstance(node, File):
        commands.append(f"sif {quoted} mode 0{stat.S_IFREG | node.mode:o}")
    if node.mtime is not None:
        commands += [f"sif {quoted} mtime @{node.mtime}", f"sif {quoted} atime @{node.mtime}"]
    return commands


def ext4_modify(
    image: Path | str, partition_offset: int, add: Tree | None = None, remove: Iterable[str] = ()
) -> None:
    """Change an unmounted ext4 filesystem inside a raw image with `debugfs -w`.

    `remove` is applied first (directories recursively; a missing path raises FileNotFoundError), then
    `add`: new entries are created, existing ones replaced; a Dir over an existing directory only sets its
    attributes. Parents implied by `add` are created only where missing and otherwise left untouched.
    """
    image = Path(image).absolute()
    existing = ext4_list(image, partition_offset)
    commands: list[str] = []

    def drop(path: str) -> None:
        commands.extend(_ext4_rm(path, existing))
        for p in [p for p in existing if p == path or p.startswith(path + "/")]:
            del existing[p]

    for path in remove:
        if check_path(path) not in existing:
            raise FileNotFoundError(
                f"{path!r} is not in the filesystem at offset {partition_offset} of {image}"
            )
        drop(path)
    wanted = dict(add or {})
    with _workdir(image) as work:
        for index, (path, node) in enumerate(normalize(wanted).items()):
            current = existing.get(path)
            quoted = _debugfs_quote("/" + path)
            if current is not None and isinstance(node, Dir) and current.is_dir:
                if path in wanted:
                    commands += _ext4_attrs(path, node)
                continue
            if current is not None:
                drop(path)
            if isinstance(node, Dir):
                commands.append(f"mkdir {quoted}")
            elif isinstance(node, File):
                source = work / str(index)
                with open(source, "wb") as f:
                    for chunk in node.chunks():
                        f.write(chunk)
                commands.append(f"write {_debugfs_quote(str(source))} {quoted}")
            else:
                commands.append(f"symlink {quoted} {_debugfs_quote(node.target)}")
            commands += _ext4_attrs(path, node)
        if commands:
            _debugfs(image, partition_offset, commands, write=True)


# ---------------------------------------------------------------------------------------------------
# Images as a backup chain sees them


def raw_sha256(path: Path | str, offset: int = 0, length: int | None = None) -> str:
    """sha256 hex of `length` bytes (default: to the end) of a file from `offset`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size if length is None else offset + length
        pos = offset
        while pos < end:
            chunk = os.pread(f.fileno(), min(CHUNK, end - pos), pos)
            if not chunk:
                raise EOFError(f"{path} ends at {pos}, before {end}")
            digest.update(chunk)
            pos += len(chunk)
    return digest.hexdigest()


def _changed_ranges(new: Path, old: Path, limit: int = 32 * MiB) -> list[tuple[int, int, bool]]:
    """(offset, length, all_zero) of the CLUSTER-aligned runs, at most `limit` long, where `new` differs
    from `old`."""
    ranges: list[tuple[int, int, bool]] = []
    zero = bytes(CLUSTER)
    with open(new, "rb") as a, open(old, "rb") as b:
        end = os.fstat(a.fileno()).st_size
        pos = 0
        while pos < end:
            nxt = min(_next_data(a.fileno(), pos, end), _next_data(b.fileno(), pos, end))
            pos = max(pos, nxt // CLUSTER * CLUSTER)  # skip what is a hole in both
            if pos >= end:
                break
            x = os.pread(a.fileno(), CLUSTER, pos)
            y = os.pread(b.fileno(), CLUSTER, pos)
            if x != y.ljust(len(x), b"\0"):
                is_zero = x == zero[: len(x)]
                last = ranges[-1] if ranges else None
                if last and last[0] + last[1] == pos and last[2] == is_zero and last[1] < limit:
                    ranges[-1] = (last[0], last[1] + len(x), is_zero)
                else:
                    ranges.append((pos, len(x), is_zero))
            pos += CLUSTER
    return ranges


def to_qcow2(raw: Path | str, qcow2: Path | str, backing: Path | str | None = None) -> Path:
    """Convert a raw image to qcow2; with `backing`, make an overlay holding only what differs from it.

    The backing file is recorded relative to the overlay's directory, so a chain can be moved as a whole.
    qemu-img convert -B cannot do this (it copies every allocated cluster of a raw source), so the clusters
    that differ from the backing chain are found here and written with qemu-io.
    """
    raw, qcow2 = Path(raw).absolute(), Path(qcow2).absolute()
    try:
        if backing is None:
            run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, qcow2])
        else:
            _overlay(raw, qcow2, Path(backing).absolute())
    except BaseException:
        qcow2.unlink(missing_ok=True)
        raise
    return qcow2


def _overlay(raw: Path, qcow2: Path, backing: Path) -> None:
    """Create `qcow2` over `backing` and write into it the clusters where `raw` differs from the chain."""
    size = raw.stat().st_size
    with _workdir(qcow2) as work:
        base = work / "backing.raw"
        run(["qemu-img", "convert", "-q", "-O", "raw", backing, base])  # follows the whole chain
        if base.stat().st_size != size:
            raise ValueError(f"{raw} is {size} bytes but {backing} is {base.stat().st_size}")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.relpath(backing, qcow2.parent),
             "-F", "qcow2", qcow2, str(size)])  # fmt: skip
        commands = []
        with open(raw, "rb") as f:
            for index, (offset, length, is_zero) in enumerate(_changed_ranges(raw, base)):
                if is_zero:
                    commands.append(f"write -q -z {offset} {length}")
                else:
                    # qemu-io splits commands on spaces, so payloads get short names relative to cwd
                    (work / f"r{index}").write_bytes(os.pread(f.fileno(), length, offset))
                    commands.append(f"write -q -s r{index} {offset} {length}")
        for batch in range(0, len(commands), 200):
            args = [arg for command in commands[batch : batch + 200] for arg in ("-c", command)]
            run(["qemu-io", "-f", "qcow2", *args, qcow2], cwd=work)
