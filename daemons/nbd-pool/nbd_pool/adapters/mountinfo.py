"""Mounts as /proc/self/mountinfo lists them (proc(5)), and unmounting the FUSE exports we leave behind."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from oma_common.process import CommandFailed, run

log = logging.getLogger("nbd_pool.mountinfo")

MOUNTINFO = Path("/proc/self/mountinfo")
UMOUNT = "umount"


@dataclasses.dataclass(frozen=True)
class MountEntry:
    mount_id: int
    mount_point: Path
    fstype: str
    source: str

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash in paths as \ooo.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    out = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)  # optional fields end with a lone "-"
            out.append(MountEntry(int(fields[0]), Path(_unescape(fields[4])), fields[sep + 1], _unescape(fields[sep + 2])))
        except (ValueError, IndexError):
            continue
    return out


def read_mounts(path: Path = MOUNTINFO) -> list[MountEntry]:
    """Current mounts (procfs: cheap and non-blocking)."""
    return parse_mountinfo(path.read_text())


def is_mounted(mount_point: Path, path: Path = MOUNTINFO) -> bool:
    return any(m.mount_point == mount_point for m in read_mounts(path))


def fuse_mounts_under(root: Path, path: Path = MOUNTINFO) -> list[MountEntry]:
    """FUSE mounts at or below `root`, innermost first (the order to unmount them)."""
    found = [m for m in read_mounts(path) if m.is_fuse and m.mount_point.is_relative_to(root)]
    return sorted(found, key=lambda m: len(m.mount_point.parts), reverse=True)


async def unmount(mount_point: Path, *, resource_id: str = "") -> None:
    """Unmount; fall back to a lazy unmount when the FUSE server is gone or the mount is busy.

    A FUSE mount whose server died answers ENOTCONN to everything but can still be unmounted; if something
    still holds it open, MNT_DETACH hides it now and the kernel frees it with the last reference.
    """
    try:
        await run([UMOUNT, "--", str(mount_point)], timeout=30, resource_id=resource_id)
    except CommandFailed as first:
        if not is_mounted(mount_point):
            return
        log.warning("%s: umount %s failed (%s); unmounting lazily", resource_id, mount_point, first.stderr.strip())
        await run([UMOUNT, "--lazy", "--", str(mount_point)], timeout=30, resource_id=resource_id)
    log.info("%s: unmounted %s", resource_id, mount_point)
