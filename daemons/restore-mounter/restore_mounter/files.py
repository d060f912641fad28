"""Browsing a mount: where a path lives (which filesystem), listing, stat, opening a file. Blocking: run in
an executor. Every lookup goes through `confine`; listings never follow symlinks, they show them."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import mimetypes
import os
import stat
import struct
from collections.abc import Generator, Iterator
from typing import Any

from oma_common import errors

from .confine import Confined, clean, kind_of, open_child_file
from .dirstream import DirStream
from .mounts import Mount, rfc3339


@dataclasses.dataclass(frozen=True)
class Place:
    """A cleaned path resolved to its filesystem: `fs` None is the list of filesystems of a multi-fs mount."""

    fs: Confined | None
    rel: str  # inside fs
    shown: str  # as the caller sees it: "/etc/passwd", "/part2/data"

    @property
    def name(self) -> str:
        return self.shown.rstrip("/").rpartition("/")[2] or "/"


class BadCursor(errors.Invalid):
    """The continuation cursor is malformed or belongs to another directory."""

    code = "invalid_cursor"


class Cursor:
    """Where the next page of a directory starts: the directory's inode, the readdir position after the
    last entry listed (dirstream), and how many entries were listed before it (for `total_count`). Opaque to
    callers (base64url); a forged one can only seek within the directory it names, which is checked."""

    _FORMAT = struct.Struct(">QqQ")

    @classmethod
    def encode(cls, ino: int, position: int, seen: int) -> str:
        return base64.urlsafe_b64encode(cls._FORMAT.pack(ino, position, seen)).rstrip(b"=").decode()

    @classmethod
    def decode(cls, cursor: str, ino: int) -> tuple[int, int]:
        """(entries listed before, readdir position) of a cursor issued for the directory `ino`."""
        try:
            got_ino, position, seen = cls._FORMAT.unpack(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        except (binascii.Error, struct.error, ValueError) as e:
            raise BadCursor("invalid cursor", "the cursor is not one this service issued; start again without it") \
                from e
        if got_ino != ino:
            raise BadCursor("invalid cursor", "the cursor belongs to another directory; start again without it")
        return seen, position


def locate(m: Mount, path: str) -> Place:
    rel = clean(path)
    single = m.single
    if single is not None:
        return Place(single, rel, "/" + rel)
    if not rel:
        return Place(None, "", "/")
    first, _, rest = rel.partition("/")
    fs = m.roots.get(first)
    if fs is None:
        raise errors.NotFound("no such file or directory",
                              f"/{rel} does not exist; this backup's filesystems are {', '.join(sorted(m.roots))}")
    return Place(fs, rest, "/" + rel)


def _join(shown: str, name: str) -> str:
    return shown.rstrip("/") + "/" + name


def mime_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def entry(name: str, shown: str, st: os.stat_result, target: str | None = None) -> dict[str, Any]:
    kind = kind_of(st.st_mode)
    out: dict[str, Any] = {
        "name": name, "path": shown, "type": kind, "size": st.st_size if kind == "file" else 0,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": st.st_uid, "gid": st.st_gid,
        "mtime": st.st_mtime, "modified_at": rfc3339(st.st_mtime), "symlink_target": target,
    }
    if kind == "file":
        out["mime_type"] = mime_type(name)
    return out


def _entry_at(dir_fd: int, name: str, shown: str) -> tuple[dict[str, Any], os.stat_result | None]:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
    except OSError as e:
        return {"name": name, "path": shown, "type": "unknown", "error": e.strerror}, None
    return entry(name, shown, st, target), st


class Browser:
    def __init__(self, max_entries: int = 10000, max_depth: int = 32) -> None:
        self.max_entries = max_entries
        self.max_depth = max_depth

    def stat(self, m: Mount, path: str) -> dict[str, Any]:
        """What `path` is; a final symlink is described, not followed."""
        place = locate(m, path)
        if place.fs is None:
            return entry("/", "/", os.stat(m.record.mount_path))
        fd = place.fs.open_path(place.rel, follow=False)
        try:
            st = os.fstat(fd)
            target = os.readlink("", dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
        finally:
            os.close(fd)
        return entry(place.name, place.shown, st, target)

    def listing(self, m: Mount, path: str, *, recursive: bool = False, depth: int | None = None, offset: int = 0,
                limit: int = 1000, cursor: str | None = None) -> dict[str, Any]:
        """One page of a directory: at most `limit` entries after `cursor` (and `offset` more skipped),
        sorted by name within the page, in the directory's own order from page to page; `next_cursor`
        continues, null at the end. Recursive: depth-first by name, at most `depth` levels and
        `max_entries` entries (then `truncated`), paged with offset/limit, never continued by a cursor."""
        place = locate(m, path)
        if recursive:
            if cursor is not None:
                raise BadCursor("invalid cursor", "a recursive listing is not continued by a cursor; "
                                                  "it stops at the entry limit (truncated)")
            levels = min(depth or self.max_depth, self.max_depth)
            found: list[dict[str, Any]] = []
            truncated = self._collect(m, place, levels, found)
            return {"path": place.shown, "files": found[offset:offset + limit], "total_count": len(found),
                    "offset": offset, "limit": limit, "recursive": True, "depth": levels, "truncated": truncated,
                    "next_cursor": None}
        files, count, next_cursor = self._page(m, place, offset, limit, cursor)
        return {"path": place.shown, "files": files, "total_count": count, "offset": offset, "limit": limit,
                "recursive": False, "depth": 1, "truncated": False, "next_cursor": next_cursor}

    def _page(self, m: Mount, place: Place, offset: int, limit: int,
              cursor: str | None) -> tuple[list[dict[str, Any]], int, str | None]:
        """Entries, the count listed up to this page's end, and the cursor after it. Reads at most
        offset + limit + 1 names from the directory, whatever its size."""
        if place.fs is None:  # the filesystems of a multi-fs mount: a handful, never continued
            if cursor is not None:
                raise BadCursor("invalid cursor", "/ lists the backup's filesystems; it has no further pages")
            roots = sorted(m.roots.items())[offset:offset + limit]
            return [entry(name, "/" + name, os.stat(fs.root)) for name, fs in roots], offset + len(roots), None
        dfd = place.fs.open_dir(place.rel)
        try:
            ino = os.fstat(dfd).st_ino
            seen, position = Cursor.decode(cursor, ino) if cursor is not None else (0, 0)
            picked: list[tuple[str, int]] = []
            more = False
            with DirStream(dfd, position) as names:
                for name, after in names:
                    if offset:
                        offset -= 1
                        seen += 1
                        continue
                    if len(picked) == limit:
                        more = True
                        break
                    picked.append((name, after))
            seen += len(picked)
            found = sorted((_entry_at(dfd, name, _join(place.shown, name))[0] for name, _ in picked),
                           key=lambda e: str(e["name"]))
            return found, seen, Cursor.encode(ino, picked[-1][1], seen) if more else None
        finally:
            os.close(dfd)

    def _collect(self, m: Mount, place: Place, levels: int, out: list[dict[str, Any]]) -> bool:
        if place.fs is None:
            for name, fs in sorted(m.roots.items()):
                if len(out) >= self.max_entries:
                    return True
                shown = "/" + name
                out.append(entry(name, shown, os.stat(fs.root)))
                if levels > 1 and self._collect(m, Place(fs, "", shown), levels - 1, out):
                    return True
            return False
        dfd = place.fs.open_dir(place.rel)
        try:
            return self._walk(dfd, place.shown, os.fstat(dfd).st_dev, levels, out, 0)
        finally:
            os.close(dfd)

    def _walk(self, dfd: int, shown: str, dev: int, levels: int, out: list[dict[str, Any]], held: int) -> bool:
        """Depth-first, each directory sorted by name. Names read but not yet listed (`held`, this
        directory's and its ancestors') count against `max_entries` too: memory stays bounded by it even
        when one directory holds millions of entries (then only the first ones read are listed)."""
        budget = self.max_entries - len(out) - held
        names: list[str] = []
        truncated = False
        with DirStream(dfd) as entries:
            for name, _ in entries:
                if len(names) >= budget:
                    truncated = True
                    break
                names.append(name)
        names.sort()
        for i, name in enumerate(names):
            e, st = _entry_at(dfd, name, _join(shown, name))
            out.append(e)
            if levels > 1 and st is not None and stat.S_ISDIR(st.st_mode):
                try:
                    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError:
                    continue
                try:
                    if os.fstat(child).st_dev == dev and \
                            self._walk(child, e["path"], dev, levels - 1, out, held + len(names) - i - 1):
                        return True
                finally:
                    os.close(child)
        return truncated

    def check_dir(self, m: Mount, path: str) -> str:
        """The name of the directory `path` (symlinks inside followed), or an error if it is none."""
        place = locate(m, path)
        if place.fs is not None:
            os.close(place.fs.open_dir(place.rel))
        return place.name

    def open(self, m: Mount, path: str) -> tuple[int, os.stat_result, str]:
        """A read-only descriptor of a regular file (symlinks followed only inside), its stat, its name."""
        place = locate(m, path)
        if place.fs is None:
            raise errors.Invalid("is a directory", "/ is a directory; download it as an archive")
        fd, st = place.fs.open_file(place.rel)
        return fd, st, place.name


# --- the archive walk ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Item:
    kind: str  # "dir", "file", "link" or "skip"
    name: str  # archive member name
    st: os.stat_result | None = None
    target: str = ""  # link target
    reason: str = ""  # why skipped
    dir_fd: int = -1  # "file": open its `base` in here with open_file()
    base: str = ""

    def open_file(self) -> int:
        assert self.st is not None
        return open_child_file(self.dir_fd, self.base, self.st, self.name)


def archive_items(m: Mount, path: str, top: str, max_depth: int = 256) -> Generator[Item, None, None]:
    """Everything under `path`, depth-first by name, named `top/...`; symlinks as links, never followed;
    device nodes, FIFOs and sockets as "skip" items. The directory descriptors close with the generator."""
    place = locate(m, path)
    if place.fs is None:
        yield Item("dir", top, os.stat(m.record.mount_path))
        for name, fs in sorted(m.roots.items()):
            yield from _tree(fs, "", f"{top}/{name}", max_depth)
        return
    yield from _tree(place.fs, place.rel, top, max_depth)


def _tree(fs: Confined, rel: str, top: str, max_depth: int) -> Iterator[Item]:
    dfd = fs.open_dir(rel)
    try:
        st = os.fstat(dfd)
        yield Item("dir", top, st)
        yield from _below(dfd, top, st.st_dev, max_depth)
    finally:
        os.close(dfd)


def _below(dfd: int, arc: str, dev: int, depth: int) -> Iterator[Item]:
    # os.scandir reads the directory in bounded chunks as it goes: a directory of millions of entries is
    # never held whole. Members therefore come in the directory's own order, not sorted.
    with os.scandir(dfd) as names:
        for de in names:
            yield from _member(dfd, de.name, arc, dev, depth)


def _member(dfd: int, name: str, arc: str, dev: int, depth: int) -> Iterator[Item]:
    """One entry of an archived directory; a directory is descended into (it is an Item itself first)."""
    member = f"{arc}/{name}"
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError as e:
        yield Item("skip", member, reason=f"cannot stat: {e.strerror}")
        return
    if stat.S_ISREG(st.st_mode):
        yield Item("file", member, st, dir_fd=dfd, base=name)
    elif stat.S_ISLNK(st.st_mode):
        try:
            yield Item("link", member, st, target=os.readlink(name, dir_fd=dfd))
        except OSError as e:
            yield Item("skip", member, reason=f"cannot read the link: {e.strerror}")
    elif stat.S_ISDIR(st.st_mode):
        if depth <= 0:
            yield Item("skip", member, reason="directory nested too deep")
            return
        try:
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            yield Item("skip", member, reason=f"cannot open: {e.strerror}")
            return
        try:
            if os.fstat(child).st_dev != dev:
                yield Item("skip", member, reason="another filesystem is mounted here")
                return
            yield Item("dir", member, st)
            yield from _below(child, member, dev, depth - 1)
        finally:
            os.close(child)
    else:
        yield Item("skip", member, st, reason=f"{kind_of(st.st_mode).replace('_', ' ')}: never read")
