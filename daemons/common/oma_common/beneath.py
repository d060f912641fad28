"""Opening what an untrusted caller names, beneath a root, without following symlinks: openat2(2).

The root agents are handed paths by omad, which they treat as untrusted: a path is resolved by the kernel
beneath a directory descriptor (RESOLVE_BENEATH), never through a symbolic link (RESOLVE_NO_SYMLINKS) and,
where asked, never into another mount (RESOLVE_NO_XDEV); what was opened is then checked with fstat(2)
and used through its descriptor, so nothing can be swapped between the check and the use.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

# linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
SYS_OPENAT2 = 437  # the same number on every architecture that has it (asm-generic unified table)
#: The strict rule for paths omad names: beneath the root, no symlink at all, no magic link, no other mount.
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2) through syscall(2): glibc 2.36 (Debian 12) has no wrapper and Python none either.

    EAGAIN (a concurrent rename or mount during a BENEATH lookup) is retried a few times.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    for _ in range(8):
        fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def relative_below(root: Path, path: str) -> str:
    """`path` (absolute and normalised) as a relative path strictly below `root`; ValueError otherwise."""
    if not path or not os.path.isabs(path) or os.path.normpath(path) != path or "\0" in path:
        raise ValueError(f"{path!r} is not a normalised absolute path")
    p = Path(path)
    if p == root or not p.is_relative_to(root):
        raise ValueError(f"{path} is not below {root}")
    return str(p.relative_to(root))


class RootReplaced(OSError):
    """The root directory is not the one it was (device and inode differ): someone swapped it."""


class RootUntrusted(OSError):
    """The way to a root goes through a symbolic link that someone other than root could have put there."""


MAX_ROOT_LINKS = 40  # the kernel's own limit (path_resolution(7))


def _root_only(dir_fd: int) -> bool:
    st = os.fstat(dir_fd)
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def open_root(root: Path) -> int:
    """An O_PATH descriptor of the configured directory `root` (the caller closes it).

    A root is configuration, but it may lie in a directory omad owns (/var/lib/oma/repositories in
    /var/lib/oma): there omad can put a symlink of its own in the root's place, to / or to a directory of
    root's, before an agent starts. So the path is walked one component at a time, and a symlink on the way
    is followed only when the directory holding it is root's and writable by nobody else (root made it);
    any other raises RootUntrusted."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    parts = list(reversed(Path(os.path.abspath(root)).parts[1:]))
    links = 0
    try:
        while parts:
            name = parts.pop()
            if name in ("", "."):
                continue
            nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            if stat.S_ISLNK(os.fstat(nxt).st_mode):
                os.close(nxt)
                links += 1
                if links > MAX_ROOT_LINKS or not _root_only(fd):
                    raise RootUntrusted(errno.ELOOP, "a symbolic link that omad could have planted leads to it",
                                        str(root))
                target = os.readlink(name, dir_fd=fd)  # (a root-only directory: nobody swaps it meanwhile)
                parts.extend(reversed(target.split("/")))
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                continue
            os.close(fd)
            fd = nxt
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(root))
    except BaseException:
        os.close(fd)
        raise
    return fd


def resolved_root(root: Path) -> Path:
    """Where the configured root `root` really is, reached as open_root reaches it; `root` itself while it is
    missing or reached through a link omad could have planted, so that such a link never widens what lies
    inside it."""
    try:
        fd = open_root(root)
    except OSError:
        return root
    try:
        return Path(os.readlink(fd_path(fd)))
    finally:
        os.close(fd)


class RootPaths:
    """Configured roots, each as configured and where it really is (resolved_root), for the rule the root agents
    apply to a path omad names: it must lie inside a root as written, and where its links lead must lie inside
    one as it really is, before anything there is looked at (the answer would tell omad what root can see)."""

    def __init__(self, roots: Iterable[str | Path]) -> None:
        self.configured = [Path(os.path.normpath(r)) for r in roots]
        self.resolved = [resolved_root(r) for r in self.configured]

    def __bool__(self) -> bool:
        return bool(self.configured)

    def written_inside(self, path: str | Path) -> bool:
        """Whether the absolute `path`, as written (normalised, no link followed), lies in a root."""
        p = Path(os.path.normpath(path))
        return any(p.is_relative_to(r) for r in (*self.configured, *self.resolved))

    def really_inside(self, real: str | Path) -> bool:
        """Whether `real` (every link already resolved) lies in a root as it really is."""
        return any(Path(real).is_relative_to(r) for r in self.resolved)


def identity(path: Path) -> tuple[int, int]:
    """(device, inode) of the root `path`, reached as open_root reaches it."""
    fd = open_root(path)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


def open_beneath(root: Path, rel: str, flags: int, resolve: int = STRICT, *,
                 root_identity: tuple[int, int] | None = None) -> int:
    """A descriptor of `rel` beneath `root` (the caller closes it). The root itself is configuration and is
    opened by name (open_root: through no symlink someone else could have planted); when it lies in a
    directory the caller does not trust, pass the (device, inode) it had when it was trusted and the opened
    root is checked against it (RootReplaced)."""
    root_fd = open_root(root)
    try:
        if root_identity is not None:
            st = os.fstat(root_fd)
            if (st.st_dev, st.st_ino) != root_identity:
                raise RootReplaced(errno.ESTALE, f"{root} is not the directory it was", str(root))
        return openat2(root_fd, rel, flags, resolve)
    finally:
        os.close(root_fd)


@contextlib.contextmanager
def opened(root: Path, rel: str, flags: int, resolve: int = STRICT, *,
           root_identity: tuple[int, int] | None = None) -> Iterator[int]:
    """`open_beneath` for the length of a with-block."""
    fd = open_beneath(root, rel, flags, resolve, root_identity=root_identity)
    try:
        yield fd
    finally:
        os.close(fd)


def is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def fd_path(fd: int) -> str:
    """The name a child that inherits `fd` opens it by: the kernel follows this magic link to the very
    object the descriptor holds, whatever happened to the path since."""
    return f"/proc/self/fd/{fd}"
