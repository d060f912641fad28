"""Which paths nbd-pool accepts: regular files and block devices inside the configured roots (classification).

What is accepted is then opened by descriptor, each layer of an image beneath its root (images.py); this
module decides the kind of a request and vouches for block devices.

omad (an unprivileged user) names the paths; nbd-pool (root) opens them. So a path must lie inside a root
as written, and where its links lead must lie inside a root too; `..` and links cannot lead out, and
nothing outside the roots is looked at (the answer would tell omad what root can see there). One exception
serves the volume device directory: a udev link such as /dev/disk/by-id/virtio-<serial> points at /dev/vdX,
outside its root, and is followed when it leads to a block device and the directory holding it is writable
by root alone and reached without a link, so a link that omad plants in a repository it writes to is never
followed to a disk. And a
block device is exported only when volume-agent vouches for it (vouched.py): attached here for a CloudStack
volume, and not in use by this system.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from oma_common import beneath
from oma_common.errors import Invalid, NotFound

from .vouched import DeviceGuard, root_only

log = logging.getLogger("nbd_pool.roots")

FILE = "file"
BLOCK = "block"


@dataclasses.dataclass(frozen=True)
class Resolved:
    requested: str  # as the caller named it
    path: Path  # every symlink resolved: what qemu is given
    kind: str  # FILE or BLOCK


class Roots:
    def __init__(self, roots: Sequence[str], devices: DeviceGuard | None = None) -> None:
        """`devices` vouches for block devices; without one, no block device is accepted."""
        self.devices = devices
        # Compared both as configured and resolved: a root may itself be reached through a link (one root made).
        self.paths = beneath.RootPaths(roots)
        self.configured, self.resolved = self.paths.configured, self.paths.resolved
        for r in self.configured:
            if not r.is_dir():
                log.warning("export root %s does not exist (yet)", r)

    def describe(self) -> str:
        return ", ".join(map(str, self.configured)) or "(none configured)"

    def resolve(self, requested: str, *, allow_block: bool = True) -> Resolved:
        """The real path of `requested` if it may be opened; Invalid (or NotFound) otherwise.

        nbd-pool runs as root and omad does not: nothing outside the roots is looked at for a caller, so that
        the answer never tells whether something there exists, what it is or where a link leads. A path must
        lie inside a root as written; where it leads is examined only when that is inside a root too, or when
        the link sits in a root-only directory of a root (a udev link, see `_trusted_directory`)."""
        if not requested.startswith("/"):
            raise Invalid("invalid path", f"{requested!r} is not an absolute path")
        lexical = Path(os.path.normpath(requested))
        if not self.paths.written_inside(lexical):
            raise self._outside(requested)
        inside = False
        try:
            # realpath can fail with EINVAL when a component changes between its lstat and readlink.
            real = Path(os.path.realpath(requested))
            inside = self.paths.really_inside(real)
            if not inside and not self._trusted_directory(lexical.parent):
                raise self._outside(requested)
            st = os.stat(real)
        except FileNotFoundError as exc:
            if not inside:
                raise self._outside(requested) from None
            raise NotFound("path not found", f"{requested} does not exist") from exc
        except OSError as exc:
            if not inside:
                raise self._outside(requested) from None
            raise Invalid("invalid path", f"{requested}: {exc.strerror}") from exc
        if stat.S_ISREG(st.st_mode):
            kind = FILE
        elif stat.S_ISBLK(st.st_mode) and allow_block:
            kind = BLOCK
        else:
            what = "a regular file or a block device" if allow_block else "a regular file"
            raise Invalid("not an image", f"{requested} is not {what}")
        if inside or (kind == BLOCK and lexical != real):
            return self._vouched(Resolved(requested, real, kind))
        raise self._outside(requested)

    def _outside(self, requested: str) -> Invalid:
        return Invalid("path outside the export roots",
                       f"{requested} is not inside an export root ({self.describe()})")

    def _trusted_directory(self, directory: Path) -> bool:
        """Whether links in `directory` may be followed out of the roots: it is root's alone, and reached
        without leaving the roots (not through a link omad planted in a repository it owns)."""
        return root_only(directory) and self.paths.really_inside(os.path.realpath(directory))

    def _vouched(self, resolved: Resolved) -> Resolved:
        if resolved.kind == BLOCK:
            if self.devices is None:
                raise Invalid("block devices not exported", "nbd-pool has no registry of vouched devices configured")
            self.devices.check(resolved.requested, resolved.path)
        return resolved
