"""zip and tar.gz of a directory written to a non-seekable stream: no temporary file, bounded memory.

zipfile writes to an unseekable file with data descriptors after each member (ZipFile docs: "streams");
tarfile in stream mode ("w|") never seeks, and gzip.GzipFile compresses on the way (tarfile's own "w|gz"
hard-codes level 9, too slow for this). Symlinks are stored as links (zip: Unix mode S_IFLNK in the
external attributes, the target as the data, as Info-ZIP does). What is not archived (device nodes, FIFOs,
sockets, unreadable entries) is listed in a last member, `SKIPPED_NAME`, present only when something was.
Memory: one read buffer, the compressor's state, and for zip its central directory (about 100 bytes per
member, kept until the end by the format).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import stat
import tarfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from typing import IO, Any, cast

from .files import Item

log = logging.getLogger(__name__)

FORMATS = {"zip": ("application/zip", ".zip"), "tar.gz": ("application/gzip", ".tar.gz")}
SKIPPED_NAME = "OMA-RESTORE-SKIPPED.json"
CHUNK = 1024 * 1024


def _copy(fd: int, dst: IO[bytes], size: int, name: str) -> None:
    """Exactly `size` bytes (the file cannot change: the filesystem is mounted read-only)."""
    done = 0
    while done < size:
        data = os.read(fd, min(CHUNK, size - done))
        if not data:
            raise OSError(f"{name}: file ended at {done} of {size} bytes")
        dst.write(data)
        done += len(data)


def _skipped(items: Iterable[Item], skipped: list[dict[str, str]]) -> Iterator[Item]:
    for item in items:
        if item.kind == "skip":
            skipped.append({"path": item.name, "reason": item.reason})
        else:
            yield item


def _manifest(skipped: list[dict[str, str]]) -> bytes:
    return json.dumps({"skipped": skipped}, indent=1).encode() + b"\n"


def _zip_time(t: float) -> tuple[int, int, int, int, int, int]:
    return time.gmtime(max(t, 315532800))[:6]  # the DOS date format starts in 1980


def write_zip(out: IO[bytes], items: Iterable[Item], level: int = 6) -> list[dict[str, str]]:
    skipped: list[dict[str, str]] = []
    # No `with`: after a failure (the client went away) the central directory must not be written.
    zf = zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, allowZip64=True, compresslevel=level,
                         strict_timestamps=False)
    for item in _skipped(items, skipped):
        assert item.st is not None
        try:
            item.name.encode("utf-8")
        except UnicodeEncodeError:
            skipped.append({"path": item.name, "reason": "name is not valid UTF-8"})
            continue
        mode = item.st.st_mode
        if item.kind == "dir":
            zi = zipfile.ZipInfo(item.name + "/", _zip_time(item.st.st_mtime))
            zi.external_attr = ((stat.S_IFDIR | stat.S_IMODE(mode)) << 16) | 0x10  # 0x10: MS-DOS directory
            zf.writestr(zi, b"")
        elif item.kind == "link":
            zi = zipfile.ZipInfo(item.name, _zip_time(item.st.st_mtime))
            zi.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(zi, os.fsencode(item.target), compress_type=zipfile.ZIP_STORED)
        else:
            try:
                fd = item.open_file()
            except OSError as e:
                skipped.append({"path": item.name, "reason": f"cannot open: {e.strerror or e}"})
                continue
            with open(fd, "rb", buffering=0, closefd=True):
                zi = zipfile.ZipInfo(item.name, _zip_time(item.st.st_mtime))
                zi.external_attr = (stat.S_IFREG | stat.S_IMODE(mode)) << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                zi.file_size = item.st.st_size  # decides zip64 up front: the stream cannot be rewritten
                with zf.open(zi, "w") as dst:
                    _copy(fd, dst, item.st.st_size, item.name)
    if skipped:
        zi = zipfile.ZipInfo(SKIPPED_NAME, _zip_time(time.time()))
        zi.external_attr = (stat.S_IFREG | 0o644) << 16
        zf.writestr(zi, _manifest(skipped))
    zf.close()
    return skipped


def _tarinfo(item: Item) -> tarfile.TarInfo:
    assert item.st is not None
    ti = tarfile.TarInfo(item.name)
    ti.mode = stat.S_IMODE(item.st.st_mode)
    ti.uid, ti.gid = item.st.st_uid, item.st.st_gid
    ti.mtime = int(item.st.st_mtime)
    ti.uname = ti.gname = ""
    if item.kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif item.kind == "link":
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, item.target, 0o777
    else:
        ti.type, ti.size = tarfile.REGTYPE, item.st.st_size
    return ti


def write_targz(out: IO[bytes], items: Iterable[Item], level: int = 6) -> list[dict[str, str]]:
    skipped: list[dict[str, str]] = []
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as gz, \
            tarfile.open(fileobj=cast(IO[bytes], gz), mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:
        for item in _skipped(items, skipped):
            ti = _tarinfo(item)
            if item.kind != "file":
                tar.addfile(ti)
                continue
            try:
                fd = item.open_file()
            except OSError as e:
                skipped.append({"path": item.name, "reason": f"cannot open: {e.strerror or e}"})
                continue
            with open(fd, "rb", closefd=True) as f:
                tar.addfile(ti, f)
        if skipped:
            data = _manifest(skipped)
            ti = tarfile.TarInfo(SKIPPED_NAME)
            ti.size, ti.mtime, ti.mode = len(data), int(time.time()), 0o644
            tar.addfile(ti, io.BytesIO(data))
    return skipped


def write(fmt: str, out: IO[bytes], items: Iterable[Item], level: int = 6) -> list[dict[str, str]]:
    writer: Any = write_zip if fmt == "zip" else write_targz
    result: list[dict[str, str]] = writer(out, items, level)
    return result
