"""The kernel's mount table as /proc/self/mountinfo lists it (proc(5)); cheap and non-blocking to read."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclasses.dataclass(frozen=True)
class MountEntry:
    mount_point: Path
    fstype: str  # "ext4", "nfs4", "fuseblk", "fuse.fusefat", ...
    source: str  # the device, the share, or whatever a FUSE server named itself
    options: str = ""  # per-mount options ("ro,nosuid,nodev,noexec,relatime")
    dev: str = ""  # "major:minor" of the mounted filesystem
    mount_id: int = 0  # the kernel's id of the mount (first field)

    @property
    def is_fuse(self) -> bool:
        """Any FUSE mount: a plain one ("fuse", "fuse.<subtype>") or one over a block device ("fuseblk")."""
        return self.fstype in ("fuse", "fuseblk") or self.fstype.startswith(("fuse.", "fuseblk."))

    @property
    def read_only(self) -> bool:
        return "ro" in self.options.split(",")


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo (proc(5)).
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[MountEntry]:
    """Every well-formed line of a mountinfo text, in its order (a later mount hides an earlier one)."""
    out = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)  # the optional fields end with a lone "-"
            out.append(MountEntry(Path(_unescape(fields[4])), fields[sep + 1], _unescape(fields[sep + 2]),
                                  fields[5], fields[2], int(fields[0])))
        except (ValueError, IndexError):
            continue
    return out


def read(path: Path = MOUNTINFO) -> list[MountEntry]:
    return parse(path.read_text())


def find(mount_point: Path, path: Path = MOUNTINFO) -> MountEntry | None:
    """The topmost mount at `mount_point`, if any (the last one listed is the one visible)."""
    found = [m for m in read(path) if m.mount_point == mount_point]
    return found[-1] if found else None


def is_mounted(mount_point: Path, path: Path = MOUNTINFO) -> bool:
    return any(m.mount_point == mount_point for m in read(path))


def under(root: Path, path: Path = MOUNTINFO, *, include_root: bool = False) -> list[MountEntry]:
    """Mounts below `root` (and at it, with include_root), innermost first (the order to unmount them in)."""
    found = [m for m in read(path) if m.mount_point.is_relative_to(root) and (include_root or m.mount_point != root)]
    return sorted(found, key=lambda m: len(m.mount_point.parts), reverse=True)
