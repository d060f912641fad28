"""Browsing a mount: where a path lives (which filesystem), listing, stat, opening a file. Blocking: run in
an executor. Every lookup goes through `confine`; listings never follow symlinks, they show them."""

from __future__ import annotations

import dataclasses
import mimetypes
import os
import stat
from collections.abc import Generator, Iterator
from typing import Any

from oma_common import errors

from .confine import Confined, clean, kind_of, open_child_file
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
             limit: int = 1000) -> dict[str, Any]:
        """A page of the directory's entries, sorted by name; recursive: depth-first, at most `depth` levels
        and `max_entries` entries (then `truncated`)."""
        place = locate(m, path)
        levels = min(depth or self.max_depth, self.max_depth) if recursive else 1
        found: list[dict[str, Any]] = []
        truncated = self._collect(m, place, levels, found)
        return {"path": place.shown, "files": found[offset:offset + limit], "total_count": len(found),
                "offset": offset, "limit": limit, "recursive": recursive, "depth": levels, "truncated": truncated}

    def _collect(self, m: Mount, place: Place, levels: int, out: list[dict[str, Any]]) -> bool:
        cap = self.max_entries if levels > 1 else 1 << 62  # one directory is read whole, then paged
        if place.fs is None:
            for name, fs in sorted(m.roots.items()):
                if len(out) >= cap:
                    return True
                shown = "/" + name
                out.append(entry(name, shown, os.stat(fs.root)))
                if levels > 1 and self._collect(m, Place(fs, "", shown), levels - 1, out):
                    return True
            return False
        dfd = place.fs.open_dir(place.rel)
        try:
            return self._walk(dfd, place.shown, os.fstat(dfd).st_dev, levels, out, cap)
        finally:
            os.close(dfd)

    def _walk(self, dfd: int, shown: str, dev: int, levels: int, out: list[dict[str, Any]], cap: int) -> bool:
        for name in sorted(os.listdir(dfd)):
            if len(out) >= cap:
                return True
            e, st = _entry_at(dfd, name, _join(shown, name))
            out.append(e)
            if levels > 1 and st is not None and stat.S_ISDIR(st.st_mode):
                try:
                    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError:
                    continue
                try:
                    if os.fstat(child).st_dev == dev and self._walk(child, e["path"], dev, levels - 1, out, cap):
                        return True
                finally:
                    os.close(child)
        return False

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
    for name in sorted(os.listdir(dfd)):
        member = f"{arc}/{name}"
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            yield Item("skip", member, reason=f"cannot stat: {e.strerror}")
            continue
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
                continue
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as e:
                yield Item("skip", member, reason=f"cannot open: {e.strerror}")
                continue
            try:
                if os.fstat(child).st_dev != dev:
                    yield Item("skip", member, reason="another filesystem is mounted here")
                    continue
                yield Item("dir", member, st)
                yield from _below(child, member, dev, depth - 1)
            finally:
                os.close(child)
        else:
            yield Item("skip", member, st, reason=f"{kind_of(st.st_mode).replace('_', ' ')}: never read")
