"""A directory's entries one at a time with their readdir(3) positions, resumable at a position.

os.scandir reads in bounded memory but cannot resume: DirEntry has no position and Python has no
telldir/seekdir. A directory's own positions are the `d_off` cookies of readdir(3) — the position *after*
each entry, what telldir(3) returns and seekdir(3) / lseek(2) accept, and what NFS servers hand out as
READDIR cookies (ext4: a 64-bit name hash; xfs, btrfs: an index; FUSE: the filesystem's own offset). They are
stable while the directory does not change, so a page that ends at an entry's `d_off` resumes after it
without re-reading the entries before. glibc's fdopendir/readdir64/seekdir are called through ctypes:
the same `struct dirent64` on every 64-bit architecture, no syscall numbers.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fdopendir.argtypes = [ctypes.c_int]
_libc.fdopendir.restype = ctypes.c_void_p
_libc.readdir64.argtypes = [ctypes.c_void_p]
_libc.readdir64.restype = ctypes.c_void_p
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.seekdir.restype = None
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.rewinddir.restype = None
_libc.closedir.argtypes = [ctypes.c_void_p]
_libc.closedir.restype = ctypes.c_int

# struct dirent64 (glibc, <bits/dirent.h>): u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[256]
_D_OFF = 8
_D_NAME = 19
POSITION_MAX = 2 ** 63 - 1


class DirStream:
    """Iterate `(name, position after it)` over an open directory; "." and ".." are left out.

    The caller's descriptor is duplicated (it stays the caller's to close); close() or `with` ends the
    stream. Memory: glibc's one readdir buffer (32 KiB), whatever the directory's size.
    """

    _dir: int | None = None  # the DIR *; a class default, so that __del__ works when __init__ failed early

    def __init__(self, dir_fd: int, position: int = 0) -> None:
        fd = os.dup(dir_fd)
        self._dir = _libc.fdopendir(fd)
        if not self._dir:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, os.strerror(err))
        # A duplicate shares the file offset with the caller's descriptor: start from where we are told,
        # never from where someone else left it.
        _libc.seekdir(self._dir, position)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        while True:
            if not self._dir:
                return
            ctypes.set_errno(0)
            ent = _libc.readdir64(self._dir)
            if not ent:
                err = ctypes.get_errno()
                if err:
                    raise OSError(err, os.strerror(err))
                return
            raw = ctypes.string_at(ent + _D_NAME)
            if raw in (b".", b".."):
                continue
            yield os.fsdecode(raw), ctypes.c_int64.from_address(ent + _D_OFF).value

    def close(self) -> None:
        if self._dir:
            _libc.rewinddir(self._dir)  # the shared file offset back at the start, as os.scandir leaves it
            _libc.closedir(self._dir)  # closes the duplicate too
            self._dir = None

    def __enter__(self) -> DirStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
