"""Block devices are exported only when volume-agent vouches for them: attached here for a CloudStack volume.

The list is volume-agent's registry file (vouched.json, written atomically by root in volume-agent's state
directory); omad can neither write nor read it. A block device is accepted when the registry lists its
major:minor, the file and its directory are root's alone, and the device is not in use by this system:
not a partition, not mounted (nor any partition of it), not held by device-mapper/md, not swap. Otherwise
nbd-pool would hand this appliance's own disks, writable, to whoever can write to its socket.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from oma_common.errors import Invalid

from .adapters.blockinfo import rdev_of, usage

log = logging.getLogger("nbd_pool.vouched")

KIND = "vouched-devices"


def root_only(path: Path) -> bool:
    """Owned by root and writable by nobody else (a directory: nobody else can add or swap its entries)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class DeviceGuard:
    def __init__(self, registry: Path) -> None:
        self.registry = registry

    def vouched(self) -> dict[str, dict[str, str]]:
        """The registry's entries by major:minor ({} when there is none, or it is not to be trusted)."""
        if not self.registry.exists():
            return {}
        if not (root_only(self.registry) and root_only(self.registry.parent)):
            log.warning("ignoring %s: it or its directory is not owned by root alone", self.registry)
            return {}
        try:
            doc = json.loads(self.registry.read_text())
            if doc.get("kind") != KIND:
                raise ValueError(f"not a {KIND} document")
            return {str(i["rdev"]): {k: str(v) for k, v in i.items()} for i in doc["items"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring %s: %s", self.registry, e)
            return {}

    def check(self, requested: str, device: Path) -> None:
        """Invalid unless volume-agent vouches for `device` and nothing on this system uses it."""
        st = os.stat(device)
        rdev = rdev_of(st.st_rdev)
        entry = self.vouched().get(rdev)
        if entry is None:
            raise Invalid("block device not vouched for",
                          f"{requested} ({device}, {rdev}) was not attached to this appliance by volume-agent for a "
                          f"CloudStack volume; only such devices are exported")
        reasons = usage(device, rdev).reasons()
        if reasons:
            raise Invalid("block device in use", f"{requested} ({device}) is not exported: {'; '.join(reasons)}")
        log.debug("%s: vouched for as volume %s", device, entry.get("volume_id"))
