"""Loop devices through losetup(8): attach a file read-only, detach, list with backing files."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from oma_common.process import run

log = logging.getLogger("nbd_pool.loopdev")

LOSETUP = "losetup"


class LoopError(Exception):
    """A loop device could not be set up or did not go away."""


@dataclasses.dataclass(frozen=True)
class LoopDevice:
    device: str  # /dev/loopN
    back_file: str  # as the kernel reports it; a deleted file ends in " (deleted)"
    read_only: bool
    autoclear: bool  # set by a detach that the kernel deferred because the device is still open

    @property
    def name(self) -> str:
        return Path(self.device).name

    def backed_under(self, root: Path) -> bool:
        back = self.back_file.removesuffix(" (deleted)")
        return bool(back) and Path(back).is_relative_to(root)


def _flag(value: Any) -> bool:
    # losetup's JSON writes booleans in recent util-linux and "0"/"1" strings in older ones.
    if isinstance(value, str):
        return value.strip() in ("1", "true")
    return bool(value)


def parse_losetup_json(text: str) -> list[LoopDevice]:
    if not text.strip():
        return []  # losetup prints nothing at all when no device is bound
    data = json.loads(text)
    return [
        LoopDevice(d["name"], d.get("back-file") or "", _flag(d.get("ro")), _flag(d.get("autoclear")))
        for d in data.get("loopdevices", [])
    ]


async def list_loops() -> list[LoopDevice]:
    res = await run([LOSETUP, "--list", "--json", "--output", "NAME,BACK-FILE,RO,AUTOCLEAR"], timeout=30)
    return parse_losetup_json(res.text)


async def loops_under(root: Path) -> list[LoopDevice]:
    """Loop devices whose backing file lies under `root` (for reconciliation)."""
    return [d for d in await list_loops() if d.backed_under(root)]


async def attach_read_only(file: Path, *, resource_id: str = "") -> str:
    """Bind `file` to a free loop device, read-only; return /dev/loopN. losetup -f retries its own races."""
    res = await run([LOSETUP, "--read-only", "--show", "--find", "--", str(file)], timeout=30, resource_id=resource_id)
    device = res.text.strip()
    if not device.startswith("/dev/loop"):
        raise LoopError(f"losetup printed {device!r} for {file}")
    log.info("%s: %s attached read-only to %s", resource_id, file, device)
    return device


def bound_file(device: str) -> str | None:
    """The backing file of a loop device from sysfs, or None if the device is not bound (cheap, non-blocking)."""
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


async def detach(device: str, *, expect_file: str | None = None, timeout: float = 5.0, resource_id: str = "") -> None:
    """losetup --detach, then wait until the kernel has really unbound the device.

    The kernel defers the detach (sets autoclear) while the device is open; we wait up to `timeout` for the
    last opener to go and raise LoopError if it does not. With `expect_file`, a device already rebound to
    another file in the meantime is left alone.
    """
    current = bound_file(device)
    if current is None or (expect_file is not None and current.removesuffix(" (deleted)") != expect_file):
        return
    res = await run([LOSETUP, "--detach", device], timeout=30, check=False, resource_id=resource_id)
    if res.returncode != 0 and bound_file(device) == current:
        raise LoopError(f"losetup --detach {device} failed: {res.stderr.decode('utf-8', 'replace').strip()}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        current = bound_file(device)
        if current is None or (expect_file is not None and current.removesuffix(" (deleted)") != expect_file):
            log.info("%s: %s detached", resource_id, device)
            return
        if loop.time() >= deadline:
            raise LoopError(f"{device} still bound to {current} {timeout:g}s after detach (still open?)")
        await asyncio.sleep(0.05)
