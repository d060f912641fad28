"""The device directory (/dev/disk/by-id): the `virtio-<serial>` link udev makes for a hot-plugged virtio disk,
the block device it leads to, and a watch for a link to appear or go (polled: cheap, and no inotify on /dev
needed)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import time
from pathlib import Path

PREFIX = "virtio-"
SERIAL_LENGTH = 20


def serial_of(volume_id: str) -> str:
    """KVM gives a CloudStack volume's disk the serial <id without hyphens, first 20 characters>."""
    return volume_id.replace("-", "")[:SERIAL_LENGTH]


@dataclasses.dataclass(frozen=True)
class Device:
    link: Path  # <device_dir>/virtio-<serial>
    path: Path  # the block device it resolves to
    rdev: str  # "major:minor"


class DeviceDir:
    def __init__(self, directory: Path, poll_interval: float = 0.1) -> None:
        self.directory = directory
        self.poll_interval = poll_interval

    def link(self, serial: str) -> Path:
        return self.directory / f"{PREFIX}{serial}"

    def find(self, serial: str) -> Device | None:
        """The block device behind the serial's link, if the link exists and leads to one."""
        link = self.link(serial)
        real = Path(os.path.realpath(link))
        try:
            st = os.stat(real)
        except OSError:
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        return Device(link, real, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")

    def serials(self) -> set[str]:
        """The serials of every virtio link present now."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return set()
        return {n[len(PREFIX):] for n in names if n.startswith(PREFIX) and "-part" not in n}

    async def wait_present(self, serial: str, timeout: float) -> Device | None:
        deadline = time.monotonic() + timeout
        while True:
            found = await asyncio.to_thread(self.find, serial)
            if found is not None or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(self.poll_interval)

    async def wait_gone(self, serial: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if not self.link(serial).is_symlink() and not self.link(serial).exists():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.poll_interval)
