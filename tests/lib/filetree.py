"""Describe a file tree in code, write it to a directory, and fingerprint trees and directories."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Pattern:
    """Deterministic pseudo-random content of `size` bytes, produced in 1 MiB chunks (for big files)."""

    size: int
    seed: int = 0

    def chunks(self) -> Iterator[bytes]:
        # One random MiB per seed; each chunk starts with its index so a misplaced chunk is detected.
        base = random.Random(self.seed).randbytes(CHUNK)
        for index, start in enumerate(range(0, self.size, CHUNK)):
            chunk = struct.pack("<Q", index) + base[8:]
            yield chunk[: min(CHUNK, self.size - start)]


@dataclass(frozen=True)
class File:
    data: bytes | Pattern = b""
    mode: int = 0o644  # permission bits, including setuid/setgid/sticky
    mtime: int | None = None  # seconds since the epoch; None leaves the build time
    uid: int = 0
    gid: int = 0

    @property
    def size(self) -> int:
        return self.data.size if isinstance(self.data, Pattern) else len(self.data)

    def chunks(self) -> Iterator[bytes]:
        if isinstance(self.data, Pattern):
            yield from self.data.chunks()
        elif self.data:
            yield self.data


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    mtime: int | None = None
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Symlink:
    target: str  # stored verbatim: "/etc/shadow" and "../../.." are kept as written
    mtime: int | None = None
    uid: int = 0
    gid: int = 0


Node = File | Dir | Symlink
# Keys are relative POSIX paths ("etc/passwd"); bytes is short for File(bytes). Missing parents are
# implied as Dir().
Tree = Mapping[str, "bytes | Node"]


def check_path(path: str) -> str:
    """Return `path` if it is a clean relative POSIX path, else raise ValueError."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"tree path must be relative and normalised: {path!r}")
    if any(c in path for c in "\0\n"):
        raise ValueError(f"tree path holds NUL or newline: {path!r}")
    return path


def normalize(tree: Tree) -> dict[str, Node]:
    """Return the tree with bytes turned into File and implied parents added, parents first."""
    nodes: dict[str, Node] = {}
    for path, value in tree.items():
        nodes[check_path(path)] = File(value) if isinstance(value, bytes) else value
    for path in list(nodes):
        for parent in PurePosixPath(path).parents:
            key = str(parent)
            if key == ".":
                break
            if key not in nodes:
                nodes[key] = Dir()
            elif not isinstance(nodes[key], Dir):
                raise ValueError(f"{key!r} is the parent of {path!r} but is not a Dir")
    return {path: nodes[path] for path in sorted(nodes, key=lambda p: p.split("/"))}


def materialize(tree: Tree, root: Path) -> None:
    """Create the tree's entries under the existing directory `root` (ownership needs root)."""
    nodes = normalize(tree)
    for path, node in nodes.items():
        target = root / path
        if isinstance(node, Dir):
            target.mkdir()
        elif isinstance(node, File):
            with open(target, "wb") as f:
                for chunk in node.chunks():
                    f.write(chunk)
        else:
            target.symlink_to(node.target)
    # Deepest first, so that creating children neither meets a read-only parent nor bumps its mtime.
    for path, node in reversed(nodes.items()):
        target = root / path
        if (node.uid, node.gid) != (os.geteuid(), os.getegid()):
            os.chown(target, node.uid, node.gid, follow_symlinks=False)
        if not isinstance(node, Symlink):
            os.chmod(target, node.mode)  # after chown, which clears setuid/setgid
        if node.mtime is not None:
            os.utime(target, (node.mtime, node.mtime), follow_symlinks=False)


def file_sha256(node: File) -> str:
    digest = hashlib.sha256()
    for chunk in node.chunks():
        digest.update(chunk)
    return digest.hexdigest()


def path_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(tree: Tree) -> dict[str, str]:
    """{path: sha256 hex} of the tree's regular files."""
    return {p: file_sha256(n) for p, n in normalize(tree).items() if isinstance(n, File)}


def walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield (relative POSIX path, absolute path) for everything under `root`, never following links."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            yield full.relative_to(root).as_posix(), full


def dir_sha256(root: Path) -> dict[str, str]:
    """{path: sha256 hex} of the regular files under a host directory (symlinks are not followed)."""
    return {rel: path_sha256(full) for rel, full in walk(root) if full.is_file() and not full.is_symlink()}


def describe(node: Node, *, modes: bool = True, sha256: str | None = None) -> str:
    """One comparable line for an entry: "file 0644 <sha256>", "dir 0755", "link -> <target>"."""
    if isinstance(node, Symlink):
        return f"link -> {node.target}"
    kind = "dir" if isinstance(node, Dir) else "file"
    words = [kind]
    if modes:
        words.append(f"{node.mode:04o}")
    if isinstance(node, File):
        words.append(sha256 or file_sha256(node))
    return " ".join(words)


def tree_manifest(tree: Tree, *, modes: bool = True, symlinks: bool = True) -> dict[str, str]:
    """{path: describe(entry)} for every entry of the tree, implied parents included."""
    return {
        path: describe(node, modes=modes)
        for path, node in normalize(tree).items()
        if symlinks or not isinstance(node, Symlink)
    }


def dir_manifest(root: Path, *, modes: bool = True) -> dict[str, str]:
    """The same description as tree_manifest for what is under a host directory."""
    manifest: dict[str, str] = {}
    for rel, full in walk(root):
        st = full.lstat()
        node: Node
        if stat.S_ISLNK(st.st_mode):
            node = Symlink(os.readlink(full))
        elif stat.S_ISDIR(st.st_mode):
            node = Dir(mode=stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            node = File(mode=stat.S_IMODE(st.st_mode))
            manifest[rel] = describe(node, modes=modes, sha256=path_sha256(full))
            continue
        else:
            raise ValueError(f"{full}: neither file, directory nor symlink")
        manifest[rel] = describe(node, modes=modes)
    return manifest
