"""Tests for the file tree description: normalising, writing to a directory, fingerprints."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from .filetree import (
    Dir,
    File,
    Pattern,
    Symlink,
    Tree,
    dir_manifest,
    dir_sha256,
    materialize,
    normalize,
    tree_manifest,
    tree_sha256,
)

pytestmark = pytest.mark.timeout(20)

TREE: Tree = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/shadow": File(b"root:$6$secret\n", mode=0o640, mtime=1_000_000_000, gid=42),
    "usr/bin/su": File(b"#!suid\n", mode=0o4755),
    "tmp": Dir(mode=0o1777, mtime=1_100_000_000),
    "empty": b"",
    "home/u/evil": Symlink("/etc/shadow", mtime=1_200_000_000),
    "home/u/up": Symlink("../../.."),
}


def test_normalize_adds_parents_in_order() -> None:
    nodes = normalize({"a/b/c": b"x", "a": Dir(mode=0o700)})
    assert list(nodes) == ["a", "a/b", "a/b/c"]
    assert nodes["a"] == Dir(mode=0o700)
    assert nodes["a/b"] == Dir()
    assert nodes["a/b/c"] == File(b"x")


@pytest.mark.parametrize("path", ["", "/abs", "a//b", "a/./b", "../x", "a/..", "a\nb"])
def test_normalize_rejects_unclean_paths(path: str) -> None:
    with pytest.raises(ValueError):
        normalize({path: b""})


def test_normalize_rejects_a_file_as_parent() -> None:
    with pytest.raises(ValueError, match="not a Dir"):
        normalize({"a": b"file", "a/b": b"child"})


def test_pattern_is_deterministic_and_sized() -> None:
    big = Pattern(3 * 1024 * 1024 + 5, seed=7)
    chunks = list(big.chunks())
    assert [len(c) for c in chunks] == [1 << 20, 1 << 20, 1 << 20, 5]
    assert b"".join(big.chunks()) == b"".join(chunks)
    assert chunks[0] != chunks[1]  # a misplaced MiB is visible
    assert next(Pattern(100, seed=8).chunks()) != chunks[0][:100]
    assert File(big).size == big.size


@pytest.mark.skipif(os.geteuid() != 0, reason="the tree owns a file as gid 42: chown needs root")
def test_materialize_writes_exactly_the_tree(tmp_path: Path) -> None:
    materialize(TREE, tmp_path)
    assert dir_manifest(tmp_path) == tree_manifest(TREE)
    assert dir_sha256(tmp_path) == tree_sha256(TREE)
    assert tree_sha256(TREE)["empty"] == hashlib.sha256(b"").hexdigest()
    shadow = (tmp_path / "etc/shadow").stat()
    assert (shadow.st_mtime, shadow.st_gid, stat.S_IMODE(shadow.st_mode)) == (1_000_000_000, 42, 0o640)
    assert stat.S_IMODE((tmp_path / "usr/bin/su").stat().st_mode) == 0o4755
    assert (tmp_path / "tmp").stat().st_mtime == 1_100_000_000
    assert os.readlink(tmp_path / "home/u/up") == "../../.."
    assert (tmp_path / "home/u/evil").lstat().st_mtime == 1_200_000_000


def test_manifest_lines() -> None:
    manifest = tree_manifest(TREE)
    assert manifest["tmp"] == "dir 1777"
    assert manifest["home/u/evil"] == "link -> /etc/shadow"
    assert manifest["empty"] == f"file 0644 {hashlib.sha256(b'').hexdigest()}"
    bare = tree_manifest(TREE, modes=False, symlinks=False)
    assert bare["tmp"] == "dir" and "home/u/evil" not in bare
