"""restore-mounter's wire contract (its handlers: restore_mounter/api.py; omad's client: clients/restore_mounter.py)."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from ..filestream import FileMeta
from ..schema import spec

MOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A directory is listed a page at a time, never read whole (guest directories may hold millions of entries).
LIST_LIMIT_DEFAULT = 1000
LIST_LIMIT_MAX = 10000
CURSOR_PATTERN = r"[A-Za-z0-9_-]{1,64}"

# --- requests ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class MountIn:
    """Attach and mount an image."""

    image: str = spec(min_length=1, max_length=4096, description="absolute path of the image")
    mount_id: str | None = spec(None, pattern=MOUNT_ID.pattern,
                                description="the caller's id for the mount; generated when absent")


@dataclasses.dataclass
class UnmountQuery:
    force: bool = spec(False, description="cancel running downloads and archives first")


@dataclasses.dataclass
class ListQuery:
    path: str = spec("/", max_length=8192, description="directory inside the backup")
    recursive: bool = spec(False, description="descend into subdirectories")
    depth: int | None = spec(None, min=1, max=1024, description="levels when recursive")
    offset: int = spec(0, min=0, max=1_000_000_000,
                       description="entries skipped before the page (from the start, or from `cursor`)")
    limit: int = spec(LIST_LIMIT_DEFAULT, min=1, max=LIST_LIMIT_MAX, description="entries in the page at most")
    cursor: str | None = spec(None, max_length=64, pattern=CURSOR_PATTERN,
                              description="`next_cursor` of the previous page: the page continues after it "
                                          "(opaque; not with recursive)")


@dataclasses.dataclass
class PathQuery:
    path: str = spec(min_length=1, max_length=8192, description="path inside the backup")


@dataclasses.dataclass
class ArchiveQuery:
    path: str = spec("/", max_length=8192, description="directory inside the backup")
    format: Literal["zip", "tar.gz"] = spec("zip", description="archive format")


# --- answers ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Filesystem:
    """One partition (0 = the whole disk) and what was mounted from it."""

    partition: int
    device: str
    type: str | None
    label: str
    size: int
    mounted: bool
    driver: str | None
    path: str | None = spec(description="browse path: \"/\" or \"/part<N>\"; null if not mounted")
    reason: str | None = spec(description="why it is not mounted")


@dataclasses.dataclass
class Mount:
    """A restore mount. Reading it is not activity: it does not postpone expiry."""

    mount_id: str
    image: str
    mount_path: str
    # broken: what serves the mount died (`error` says what); its file operations answer 503 mount_broken
    # until it is unmounted.
    status: Literal["mounting", "mounted", "unmounting", "error", "broken"]
    device: str | None
    backend: str | None
    attachment_id: str | None
    filesystem_type: str | None
    created_at: str | None
    last_activity_at: str | None
    expires_at: str | None
    idle_timeout_seconds: float
    in_use: bool
    active_operations: int
    error: str | None
    filesystems: list[Filesystem]


@dataclasses.dataclass
class MountList:
    mounts: list[Mount]
    count: int


@dataclasses.dataclass
class Unmounted:
    mount_id: str
    status: str
    message: str


@dataclasses.dataclass
class Entry:
    """A file, directory, symlink or other entry of a backup (a symlink is described, never followed)."""

    name: str
    path: str
    type: Literal["file", "directory", "symlink", "char_device", "block_device", "fifo", "socket", "unknown"]
    size: int = 0
    mode: str | None = spec(None, description="permission bits, e.g. \"0644\"")
    uid: int | None = None
    gid: int | None = None
    mtime: float | None = spec(None, description="epoch seconds")
    modified_at: str | None = None
    symlink_target: str | None = None
    mime_type: str | None = spec(None, description="files only")
    error: str | None = spec(None, description="why an entry could not be read")


@dataclasses.dataclass
class Listing:
    """A page of a directory. Entries are sorted by name within the page; pages follow the directory's own
    order. `next_cursor` continues the listing; null when this page is the last. `total_count`: entries
    listed up to the end of this page, earlier pages included (the directory's size once `next_cursor` is
    null; recursive: all collected). `truncated`: a recursive listing stopped at its entry limit."""

    mount_id: str
    path: str
    files: list[Entry]
    total_count: int
    offset: int
    limit: int
    recursive: bool
    depth: int
    truncated: bool
    next_cursor: str | None = spec(None, description="pass as `cursor` for the next page; null at the end")


OpenedFile = FileMeta  # the body of GET /mounts/{id}/open; the descriptor rides on its bytes


@dataclasses.dataclass
class CleanupStatus:
    running: bool
    cleanup_interval: float
    sweeps: int
    expired_total: int
    last_sweep_at: float | None  # epoch seconds of the last sweep
    last_error: str | None
    idle_timeout: float
    active_mount_count: int
    expired_mount_count: int


@dataclasses.dataclass
class Device:
    mount_id: str
    device: str
    backend: str
    partitions: list[str]


@dataclasses.dataclass
class Resources:
    active_mounts: int
    slots_in_use: int
    max_mounts: int
    available_slots: int
    allocated_devices: list[Device]
    device_utilization: float
    attach_backend: str
