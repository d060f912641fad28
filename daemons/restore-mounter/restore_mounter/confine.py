"""Resolving a user's path inside one mounted filesystem, never leaving it: openat2(2) or a checked walk.

Every path a caller gives is first made a clean relative path (`clean`): NUL bytes, `..` components and
over-long names are refused outright. It is then resolved from an O_PATH descriptor of the filesystem's
root. With openat2(2) (Linux 5.6+) the kernel does it: RESOLVE_BENEATH refuses absolute symlinks and any
`..` that would climb above the root, RESOLVE_NO_MAGICLINKS refuses /proc-style links, RESOLVE_NO_XDEV
refuses crossing into another mount. Where openat2 is missing (ENOSYS) or filtered (EPERM), `WalkResolver`
does the same one component at a time with O_PATH|O_NOFOLLOW and openat semantics (`dir_fd=`), reading
each symlink itself. A symlink that stays inside is followed; one that points out (`/etc/shadow`,
`../../..` past the root) makes the request fail with `Escape`. The symlink itself can always be listed.

Files are opened for reading only after fstat of their O_PATH descriptor says "regular file", through
/proc/self/fd with O_NONBLOCK (a FIFO cannot block us), and checked again: device nodes, FIFOs and sockets
are never opened.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import stat
from typing import Protocol

from oma_common import errors

log = logging.getLogger(__name__)

MAX_PATH = 4096
MAX_NAME = 255
MAX_SYMLINKS = 40  # the kernel's own limit (path_resolution(7))

# linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
SYS_OPENAT2 = 437  # the same number on every architecture that has it (asm-generic unified table)
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV


class BadPath(errors.Invalid):
    """The path is malformed (NUL, `..`, too long)."""

    code = "invalid_path"


class Escape(errors.Forbidden):
    """Resolving the path would leave the mounted filesystem (absolute or climbing symlink, another mount)."""

    code = "path_escapes_mount"


class NotAllowed(errors.Forbidden):
    """The path names something that is never opened (device node, FIFO, socket)."""

    code = "special_file"


def clean(path: str) -> str:
    """A user's path as a clean relative path ("" for the root); raise BadPath for anything suspicious.

    "/" and "" both mean the root; a leading "/" is the root of the backup, never the host's.
    """
    if not isinstance(path, str) or "\0" in path:
        raise BadPath("invalid path", "the path must not contain NUL bytes")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise BadPath("invalid path", f"the path is longer than {MAX_PATH} bytes")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadPath("invalid path", "the path must not contain '..' components")
    for p in parts:
        if len(p.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise BadPath("invalid path", f"a path component is longer than {MAX_NAME} bytes")
    return "/".join(parts)


def _raise_for(e: OSError, path: str) -> None:
    shown = "/" + path
    if e.errno == errno.EXDEV:
        raise Escape("path leaves the backup", f"{shown} resolves outside the mounted filesystem "
                                               "(an absolute symlink or one pointing above its root)") from e
    if e.errno == errno.ELOOP:
        raise Escape("symlink not followed", f"{shown}: too many symlinks, or a link that may not be followed") \
            from e
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        raise errors.NotFound("no such file or directory", f"{shown} does not exist in the backup") from e
    if e.errno == errno.EACCES:
        raise errors.Forbidden("permission denied", f"{shown} cannot be read") from e
    if e.errno == errno.ENAMETOOLONG:
        raise BadPath("invalid path", f"{shown} is too long") from e
    raise errors.Internal("cannot read the backup", f"{shown}: {e.strerror}") from e


class Resolver(Protocol):
    name: str

    def open(self, root_fd: int, rel: str, *, follow: bool) -> int:
        """An O_PATH descriptor of `rel` (a `clean` path) beneath `root_fd`; with follow=False a final
        symlink is not followed (the descriptor is the link). Raises OSError as open(2) would."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2) through syscall(2): glibc 2.36 (Debian 12) has no wrapper and Python none either."""
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


class Openat2Resolver:
    """The kernel resolves the whole path under RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV."""

    name = "openat2"

    def open(self, root_fd: int, rel: str, *, follow: bool) -> int:
        flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        for _ in range(8):
            try:
                return openat2(root_fd, rel or ".", flags, RESOLVE)
            except OSError as e:
                # EAGAIN: a concurrent rename or mount moved something during a BENEATH lookup; retry.
                if e.errno != errno.EAGAIN:
                    raise
        return openat2(root_fd, rel or ".", flags, RESOLVE)


class WalkResolver:
    """The same rules in user space: one O_PATH|O_NOFOLLOW openat per component, symlinks read and spliced."""

    name = "walk"

    def open(self, root_fd: int, rel: str, *, follow: bool) -> int:
        root_dev = os.fstat(root_fd).st_dev
        parts = collections.deque(p for p in rel.split("/") if p)
        stack = [os.dup(root_fd)]  # directories from the root down to where we are
        hops = 0
        try:
            while parts:
                name = parts.popleft()
                if name in ("", "."):
                    continue
                if name == "..":
                    if len(stack) == 1:
                        raise OSError(errno.EXDEV, "climbs above the root", rel)
                    os.close(stack.pop())
                    continue
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                try:
                    st = os.fstat(fd)
                    if st.st_dev != root_dev:
                        raise OSError(errno.EXDEV, "crosses into another mount", rel)
                    last = not any(p not in ("", ".") for p in parts)
                    if stat.S_ISLNK(st.st_mode) and (follow or not last):
                        hops += 1
                        if hops > MAX_SYMLINKS:
                            raise OSError(errno.ELOOP, "too many symlinks", rel)
                        target = os.readlink(name, dir_fd=stack[-1])
                        if target.startswith("/"):
                            raise OSError(errno.EXDEV, "absolute symlink", rel)
                        parts.extendleft(reversed(target.split("/")))
                        continue
                    if last:
                        result, fd = fd, -1
                        return result
                    if not stat.S_ISDIR(st.st_mode):
                        raise OSError(errno.ENOTDIR, "not a directory", rel)
                    stack.append(fd)
                    fd = -1
                finally:
                    if fd >= 0:
                        os.close(fd)
            return os.dup(stack[-1])
        finally:
            for d in stack:
                os.close(d)


def default_resolver() -> Resolver:
    """openat2 when the kernel offers it, the walk otherwise."""
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        os.close(openat2(root, ".", os.O_PATH | os.O_CLOEXEC, RESOLVE))
    except OSError as e:
        log.warning("openat2 unavailable (%s); resolving paths component by component", e.strerror)
        return WalkResolver()
    finally:
        os.close(root)
    return Openat2Resolver()


class Confined:
    """One mounted filesystem, opened by its root; every lookup stays beneath it."""

    def __init__(self, root: str, dev: int | None, resolver: Resolver) -> None:
        self.root = root  # host path of the mount point (trusted: under the root-only mount root)
        self.dev = dev  # st_dev of the mounted filesystem, when known: a vanished mount is noticed
        self.resolver = resolver

    def open_root(self) -> int:
        try:
            fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise errors.Unavailable("filesystem not mounted", f"{self.root}: {e.strerror}") from e
        if self.dev is not None and os.fstat(fd).st_dev != self.dev:
            os.close(fd)
            raise errors.Unavailable("filesystem not mounted", f"{self.root} is no longer the mounted filesystem")
        return fd

    def open_path(self, rel: str, *, follow: bool) -> int:
        """An O_PATH descriptor of `rel` (already `clean`), mapped to domain errors."""
        root_fd = self.open_root()
        try:
            return self.resolver.open(root_fd, rel, follow=follow)
        except OSError as e:
            _raise_for(e, rel)
            raise  # unreachable: _raise_for always raises
        finally:
            os.close(root_fd)

    def open_dir(self, rel: str) -> int:
        """A descriptor of the directory `rel` that can be listed (symlinks inside followed)."""
        fd = self.open_path(rel, follow=True)
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise errors.Invalid("not a directory", f"/{rel} is not a directory")
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        except OSError as e:
            _raise_for(e, rel)
            raise
        finally:
            os.close(fd)

    def open_file(self, rel: str) -> tuple[int, os.stat_result]:
        """A read-only descriptor of the regular file `rel`, and its stat."""
        fd = self.open_path(rel, follow=True)
        try:
            return open_regular(fd, rel)
        finally:
            os.close(fd)


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char_device"), (stat.S_ISBLK, "block_device"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def open_regular(path_fd: int, rel: str) -> tuple[int, os.stat_result]:
    """Upgrade an O_PATH descriptor to O_RDONLY only if it is a regular file; check again once open."""
    st = os.fstat(path_fd)
    if stat.S_ISDIR(st.st_mode):
        raise errors.Invalid("is a directory", f"/{rel} is a directory; download it as an archive")
    if not stat.S_ISREG(st.st_mode):
        raise NotAllowed("not a regular file", f"/{rel} is a {kind_of(st.st_mode).replace('_', ' ')}; "
                                               "only regular files are read")
    try:
        # open(2): an O_PATH descriptor is re-opened through its /proc/self/fd link.
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        _raise_for(e, rel)
        raise
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise NotAllowed("not a regular file", f"/{rel} changed while it was opened")
    os.set_blocking(fd, True)
    return fd, st2


def open_child_file(dir_fd: int, name: str, expected: os.stat_result, rel: str) -> int:
    """Open the regular file `name` of an open directory for reading, refusing anything that is not the
    regular file `expected` (from its lstat) — used by the archive walk, which never follows symlinks."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
        os.close(fd)
        raise OSError(errno.EPERM, "not the regular file listed", rel)
    os.set_blocking(fd, True)
    return fd
