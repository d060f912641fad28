"""Loop devices nbd-pool leaves behind: the ones backed under a root, and a detach that waits for the kernel."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from oma_common.blockdev import DELETED, LOSETUP, LoopDevice, LoopError, backing_file, list_loops
from oma_common.command import run

log = logging.getLogger("nbd_pool.loopdev")

__all__ = ["LoopError", "detach", "loops_under"]  # LoopError: what detach raises


async def loops_under(root: Path) -> list[LoopDevice]:
    """Loop devices whose backing file lies under `root` (for reconciliation)."""
    return [d for d in await list_loops() if d.backed_under(root)]


async def detach(device: str, *, expect_file: str | None = None, timeout: float = 5.0, resource_id: str = "") -> None:
    """losetup --detach, then wait until the kernel has really unbound the device.

    The kernel defers the detach (sets autoclear) while the device is open; we wait up to `timeout` for the
    last opener to go and raise LoopError if it does not. With `expect_file`, a device already rebound to
    another file in the meantime is left alone.
    """
    current = backing_file(device)
    if current is None or (expect_file is not None and current.removesuffix(DELETED) != expect_file):
        return
    res = await run([LOSETUP, "--detach", device], timeout=30, check=False, resource_id=resource_id)
    if res.returncode != 0 and backing_file(device) == current:
        raise LoopError(f"losetup --detach {device} failed: {res.stderr.decode('utf-8', 'replace').strip()}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        current = backing_file(device)
        if current is None or (expect_file is not None and current.removesuffix(DELETED) != expect_file):
            log.info("%s: %s detached", resource_id, device)
            return
        if loop.time() >= deadline:
            raise LoopError(f"{device} still bound to {current} {timeout:g}s after detach (still open?)")
        await asyncio.sleep(0.05)
