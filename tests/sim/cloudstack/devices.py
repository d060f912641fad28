"""The hypervisor side of "attach to this appliance": a volume's data is a sparse file, attaching binds it to a
loop device and links `virtio-<serial>` to it in the device directory, as udev does for a virtio disk on KVM."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from oma_common.blockdev import list_loops
from oma_common.command import run

log = logging.getLogger("cloudstack_sim.devices")


def serial_of(volume_id: str) -> str:
    """KVM hands a volume's id (no hyphens, 20 characters) to the guest as the virtio disk's serial."""
    return volume_id.replace("-", "")[:20]


class DeviceHost:
    """Files under `data_dir` (volumes/, snapshots/), links in `device_dir`."""

    def __init__(self, data_dir: Path, device_dir: Path) -> None:
        self.data_dir = data_dir
        self.device_dir = device_dir
        self.loops: dict[str, str] = {}  # volume id → /dev/loopN, bound by us

    def volume_file(self, volume_id: str) -> Path:
        return self.data_dir / "volumes" / f"{volume_id}.raw"

    def snapshot_file(self, snapshot_id: str) -> Path:
        return self.data_dir / "snapshots" / f"{snapshot_id}.raw"

    def link(self, volume_id: str) -> Path:
        return self.device_dir / f"virtio-{serial_of(volume_id)}"

    def provision(self, volume_id: str, size: int) -> Path:
        """The volume's storage: created sparse on its first attach (CloudStack allocates it then)."""
        f = self.volume_file(volume_id)
        f.parent.mkdir(parents=True, exist_ok=True)
        if not f.exists():
            with open(f, "wb") as out:
                out.truncate(size)
        return f

    async def plug(self, volume_id: str, size: int) -> str:
        """Bind the volume's file to a loop device and link it; returns the device."""
        f = self.provision(volume_id, size)
        res = await run(["losetup", "--find", "--show", "--", str(f)], timeout=30)
        device = res.text.strip()
        self.loops[volume_id] = device
        self.device_dir.mkdir(parents=True, exist_ok=True)
        link = self.link(volume_id)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(device)
        log.info("volume %s: %s on %s, linked as %s", volume_id, f, device, link)
        return device

    async def unplug(self, volume_id: str) -> None:
        """Remove the link and the loop device (a loop still open is cleared by the kernel on last close)."""
        with contextlib.suppress(FileNotFoundError):
            self.link(volume_id).unlink()
        device = self.loops.pop(volume_id, None)
        if device is not None:
            await run(["losetup", "--detach", device], timeout=30, check=False)
            log.info("volume %s: %s detached", volume_id, device)

    async def copy(self, src: Path, dst: Path) -> None:
        """A sparse (reflinked where the filesystem can) copy of a volume's data."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        await run(["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(tmp)], timeout=600)
        os.replace(tmp, dst)

    async def snapshot(self, volume_id: str, snapshot_id: str, size: int) -> None:
        await self.copy(self.provision(volume_id, size), self.snapshot_file(snapshot_id))

    async def revert(self, volume_id: str, snapshot_id: str) -> None:
        await self.copy(self.snapshot_file(snapshot_id), self.volume_file(volume_id))

    def forget_volume(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.volume_file(volume_id).unlink()

    def forget_snapshot(self, snapshot_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.snapshot_file(snapshot_id).unlink()

    async def cleanup(self) -> None:
        """Every link and every loop device on our files goes (those a test bound by hand on them too)."""
        for volume_id in list(self.loops):
            await self.unplug(volume_id)
        for loop in await list_loops():
            if loop.backed_under(self.data_dir):
                await run(["losetup", "--detach", loop.device], timeout=30, check=False)
                log.info("left-over %s on %s detached", loop.device, loop.back_file)
