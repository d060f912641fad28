"""Create directories in an unmounted NTFS volume file through libntfs-3g (ntfscp cannot)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
from pathlib import Path, PurePosixPath
from types import TracebackType

_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("ntfs-3g")
        if name is None:
            raise OSError("libntfs-3g not found (apt-get install libntfs-3g89 / ntfs-3g)")
        lib = ctypes.CDLL(name, use_errno=True)
        # Prototypes from ntfs-3g's include/ntfs-3g/{volume,inode,dir}.h; every handle is opaque here.
        lib.ntfs_mount.restype = ctypes.c_void_p
        lib.ntfs_mount.argtypes = [ctypes.c_char_p, ctypes.c_ulong]
        lib.ntfs_umount.restype = ctypes.c_int
        lib.ntfs_umount.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ntfs_pathname_to_inode.restype = ctypes.c_void_p
        lib.ntfs_pathname_to_inode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
        lib.ntfs_create.restype = ctypes.c_void_p
        lib.ntfs_create.argtypes = [
            ctypes.c_void_p,  # ntfs_inode *dir_ni
            ctypes.c_uint32,  # le32 securid: 0 gives the default "everyone" descriptor
            ctypes.c_char_p,  # const ntfschar *name (UTF-16LE, not NUL-terminated)
            ctypes.c_uint8,  # u8 name_len, in UTF-16 code units
            ctypes.c_uint32,  # mode_t type
        ]
        lib.ntfs_inode_close.restype = ctypes.c_int
        lib.ntfs_inode_close.argtypes = [ctypes.c_void_p]
        _lib = lib
    return _lib


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"libntfs-3g: {what}: {os.strerror(err)}")


class NtfsVolume:
    """A read-write libntfs-3g handle on a file holding one NTFS filesystem (no kernel mount)."""

    def __init__(self, path: Path) -> None:
        self._lib = _load()
        self._vol = self._lib.ntfs_mount(os.fsencode(path), 0)  # 0: NTFS_MNT_NONE, read-write
        if not self._vol:
            raise _oserror(f"ntfs_mount {path}")

    def __enter__(self) -> NtfsVolume:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._vol:
            vol, self._vol = self._vol, None
            if self._lib.ntfs_umount(vol, 0) != 0:
                raise _oserror("ntfs_umount")

    def mkdir(self, path: str) -> None:
        """Create directory `path` ("a/b"); its parent must exist."""
        rel = PurePosixPath(path)
        name = rel.name.encode("utf-16-le")
        if len(name) // 2 > 255:  # NTFS names hold at most 255 UTF-16 units
            raise ValueError(f"NTFS name too long: {rel.name!r}")
        where = "/" if str(rel.parent) == "." else f"/{rel.parent}"
        parent = self._lib.ntfs_pathname_to_inode(self._vol, None, os.fsencode(where))
        if not parent:
            raise _oserror(f"lookup {where}")
        try:
            child = self._lib.ntfs_create(parent, 0, name, len(name) // 2, stat.S_IFDIR)
            if not child:
                raise _oserror(f"create /{path}")
            self._lib.ntfs_inode_close(child)
        finally:
            self._lib.ntfs_inode_close(parent)
