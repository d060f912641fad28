"""Path confinement in-process, with both resolvers (openat2 and the component walk), on a host directory."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from oma_common import errors
from restore_mounter.confine import (
    BadPath,
    Confined,
    Escape,
    NotAllowed,
    Openat2Resolver,
    Resolver,
    WalkResolver,
    clean,
    default_resolver,
)

pytestmark = pytest.mark.timeout(10)

RESOLVERS = [pytest.param(WalkResolver(), id="walk"), pytest.param(Openat2Resolver(), id="openat2")]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"host secret\n")
    for d in ("etc", "home/user", "usr/lib", "deep"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"guest passwd\n")
    (root / "home" / "user" / "notes.txt").write_bytes(b"notes\n")
    (root / "usr" / "lib" / "libc.so").write_bytes(b"libc\n")
    links = {
        "home/user/evil": "/etc/shadow", "home/user/up": "../..", "home/user/escape": "../../..",
        "home/user/etcdir": "/etc", "home/user/proc": "/proc/self/root", "a": "b", "b": "../..",
        "loop1": "loop2", "loop2": "loop1", "lib": "usr/lib", "deep/x": "../home/user/notes.txt",
        "sib": "../outside/secret", "home/user/dots": "./../../etc/./passwd",
        "home/user/dots2": "./../../../etc/passwd",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    os.mkfifo(root / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock"))
    s.close()
    yield root


def read(fs: Confined, rel: str) -> bytes:
    fd, _ = fs.open_file(clean(rel))
    try:
        return os.read(fd, 1000)
    finally:
        os.close(fd)


@pytest.mark.parametrize("path,expected", [
    ("/", ""), ("", ""), ("./a/./b/", "a/b"), ("//etc//passwd", "etc/passwd"), ("a b/c\\d", "a b/c\\d"),
    ("%2e%2e/x", "%2e%2e/x"),  # never decoded a second time: a literal name
])
def test_clean_accepts(path: str, expected: str) -> None:
    assert clean(path) == expected


@pytest.mark.parametrize("path", [
    "..", "../etc/passwd", "/../etc/shadow", "a/../../b", "a/..", "a/b/../../..", "etc/passwd\0.txt",
    "x" * 5000, "a/" + "y" * 300,
])
def test_clean_refuses(path: str) -> None:
    with pytest.raises(BadPath):
        clean(path)


def test_default_resolver_is_openat2_here() -> None:
    assert default_resolver().name == "openat2"  # Linux >= 5.6 on every machine we run on


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_inside_paths_resolve(tree: Path, resolver: Resolver) -> None:
    fs = Confined(str(tree), None, resolver)
    assert read(fs, "etc/passwd") == b"guest passwd\n"
    assert read(fs, "/lib/libc.so") == b"libc\n"  # symlinked directory inside
    assert read(fs, "deep/x") == b"notes\n"  # relative symlink climbing, but staying inside
    assert read(fs, "home/user/up/etc/passwd") == b"guest passwd\n"  # ../.. from home/user is exactly the root
    assert read(fs, "home/user/dots") == b"guest passwd\n"
    os.close(fs.open_dir("home/user/up"))


@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("rel", [
    "home/user/evil", "home/user/escape/outside/secret", "home/user/etcdir/passwd", "home/user/proc/etc/shadow",
    "a", "sib", "home/user/evil/x", "home/user/dots2",
])
def test_escapes_are_refused(tree: Path, resolver: Resolver, rel: str) -> None:
    fs = Confined(str(tree), None, resolver)
    with pytest.raises(Escape):
        read(fs, rel)


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_escaping_directories_are_refused(tree: Path, resolver: Resolver) -> None:
    fs = Confined(str(tree), None, resolver)
    for rel in ("home/user/escape", "home/user/etcdir", "b"):
        with pytest.raises(Escape):
            fs.open_dir(rel)


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_symlink_loops_are_refused(tree: Path, resolver: Resolver) -> None:
    fs = Confined(str(tree), None, resolver)
    with pytest.raises(Escape, match="symlink"):
        read(fs, "loop1")


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_links_themselves_can_be_opened_without_following(tree: Path, resolver: Resolver) -> None:
    fs = Confined(str(tree), None, resolver)
    fd = fs.open_path("home/user/evil", follow=False)
    try:
        assert os.readlink("", dir_fd=fd) == "/etc/shadow"
    finally:
        os.close(fd)


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_fifos_and_sockets_are_never_opened(tree: Path, resolver: Resolver) -> None:
    fs = Confined(str(tree), None, resolver)
    for rel in ("fifo", "sock"):
        with pytest.raises(NotAllowed):
            read(fs, rel)  # a FIFO opened for reading would block: the timeout catches that


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_missing_and_wrong_kinds(tree: Path, resolver: Resolver) -> None:
    fs = Confined(str(tree), None, resolver)
    with pytest.raises(errors.NotFound):
        read(fs, "etc/nothing")
    with pytest.raises(errors.NotFound):
        read(fs, "etc/passwd/x")
    with pytest.raises(errors.Invalid, match="directory"):
        read(fs, "etc")
    with pytest.raises(errors.Invalid, match="not a directory"):
        fs.open_dir("etc/passwd")


def test_a_vanished_mount_is_noticed(tree: Path) -> None:
    fs = Confined(str(tree), os.stat(tree).st_dev + 1, Openat2Resolver())
    with pytest.raises(errors.Unavailable):
        fs.open_dir("")


@pytest.mark.root
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_another_mount_inside_is_not_entered(tree: Path, resolver: Resolver) -> None:
    inner = tree / "home" / "mnt"
    inner.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inner)], check=True)
    try:
        (inner / "f").write_bytes(b"other fs\n")
        fs = Confined(str(tree), None, resolver)
        with pytest.raises(Escape):
            read(fs, "home/mnt/f")
    finally:
        subprocess.run(["umount", str(inner)], check=True)
