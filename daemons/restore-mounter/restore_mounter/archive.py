"""zip and tar.gz of a directory written to a non-seekable stream: no temporary file, bounded memory.

zipfile writes to an unseekable file with data descriptors after each member (ZipFile docs: "streams");
tarfile in stream mode ("w|") never seeks, and gzip.GzipFile compresses on the way (tarfile's own "w|gz"
hard-codes level 9, too slow for this). Symlinks are stored as links (zip: Unix mode S_IFLNK in the
external attributes, the target as the data, as Info-ZIP does). What is not archived (device nodes, FIFOs,
sockets, unreadable entries) is listed in a last member, `SKIPPED_NAME`, present only when something was.
Memory: one read buffer, the compressor's state, the tree walk's open directories (files.archive_items),
at most `SKIPPED_LISTED` skipped entries (the rest only counted). What the formats' writers keep per
member stays out of memory: tarfile's member list is emptied as it goes, and zip's central directory,
which the format writes at the end, waits in an anonymous temporary file (zipindex).
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

from . import zipindex
from .files import Item

log = logging.getLogger(__name__)

FORMATS = {"zip": ("application/zip", ".zip"), "tar.gz": ("application/gzip", ".tar.gz")}
SKIPPED_NAME = "OMA-RESTORE-SKIPPED.json"
CHUNK = 1024 * 1024
SKIPPED_LISTED = 10000  # entries named in the manifest; further ones are counted (a hostile tree of FIFOs)


def _copy(fd: int, dst: IO[bytes], size: int, name: str) -> None:
    """Exactly `size` bytes (the file cannot change: the filesystem is mounted read-only)."""
    done = 0
    while done < size:
        data = os.read(fd, min(CHUNK, size - done))
        if not data:
            raise OSError(f"{name}: file ended at {done} of {size} bytes")
        dst.write(data)
        done += len(data)


class Skipped:
    """What was left out of an archive: the first SKIPPED_LISTED with their reasons, and how many in all."""

    def __init__(self) -> None:
        self.listed: list[dict[str, str]] = []
        self.count = 0

    def add(self, path: str, reason: str) -> None:
        self.count += 1
        if len(self.listed) < SKIPPED_LISTED:
            self.listed.append({"path": path, "reason": reason})

    def filter(self, items: Iterable[Item]) -> Iterator[Item]:
        for item in items:
            if item.kind == "skip":
                self.add(item.name, item.reason)
            else:
                yield item

    def manifest(self) -> bytes:
        doc: dict[str, Any] = {"skipped": self.listed}
        if self.count > len(self.listed):
            doc["not_listed"] = self.count - len(self.listed)
        return json.dumps(doc, indent=1).encode() + b"\n"


def _zip_time(t: float) -> tuple[int, int, int, int, int, int]:
    return time.gmtime(max(t, 315532800))[:6]  # the DOS date format starts in 1980


def write_zip(out: IO[bytes], items: Iterable[Item], level: int = 6) -> int:
    # No `with`: after a failure (the client went away) the central directory must not be written.
    zf = zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, allowZip64=True, compresslevel=level,
                         strict_timestamps=False)
    index = zipindex.spill(zf)
    try:
        return _write_zip(zf, items)
    finally:
        index.close()


def _write_zip(zf: zipfile.ZipFile, items: Iterable[Item]) -> int:
    skipped = Skipped()
    for item in skipped.filter(items):
        assert item.st is not None
        try:
            item.name.encode("utf-8")
        except UnicodeEncodeError:
            skipped.add(item.name, "name is not valid UTF-8")
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
                skipped.add(item.name, f"cannot open: {e.strerror or e}")
                continue
            with open(fd, "rb", buffering=0, closefd=True):
                zi = zipfile.ZipInfo(item.name, _zip_time(item.st.st_mtime))
                zi.external_attr = (stat.S_IFREG | stat.S_IMODE(mode)) << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                zi.file_size = item.st.st_size  # decides zip64 up front: the stream cannot be rewritten
                with zf.open(zi, "w") as dst:
                    _copy(fd, dst, item.st.st_size, item.name)
    if skipped.count:
        zi = zipfile.ZipInfo(SKIPPED_NAME, _zip_time(time.time()))
        zi.external_attr = (stat.S_IFREG | 0o644) << 16
        zf.writestr(zi, skipped.manifest())
    zf.close()
    return skipped.count


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


def write_targz(out: IO[bytes], items: Iterable[Item], level: int = 6) -> int:
    skipped = Skipped()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as gz, \
            tarfile.open(fileobj=cast(IO[bytes], gz), mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:
        for item in skipped.filter(items):
            # TarFile keeps every member it wrote (for reading back); a stream needs none. (typeshed omits it)
            tar.members.clear()  # type: ignore[attr-defined]
            ti = _tarinfo(item)
            if item.kind != "file":
                tar.addfile(ti)
                continue
            try:
                fd = item.open_file()
            except OSError as e:
                skipped.add(item.name, f"cannot open: {e.strerror or e}")
                continue
            with open(fd, "rb", closefd=True) as f:
                tar.addfile(ti, f)
        if skipped.count:
            data = skipped.manifest()
            ti = tarfile.TarInfo(SKIPPED_NAME)
            ti.size, ti.mtime, ti.mode = len(data), int(time.time()), 0o644
            tar.addfile(ti, io.BytesIO(data))
    return skipped.count


def write(fmt: str, out: IO[bytes], items: Iterable[Item], level: int = 6) -> int:
    """Write the archive; the number of entries left out (listed in its SKIPPED_NAME member)."""
    writer = write_zip if fmt == "zip" else write_targz
    return writer(out, items, level)
