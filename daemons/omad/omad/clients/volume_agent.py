"""volume-agent's socket API as calls: repository shares, immutability, CloudStack volumes, and ending a
revoked VMA's tunnel sessions.

The shapes are volume-agent's contract, declared once in oma_common.contracts.volume_agent and
volume_agent_volumes (its handlers use the same classes; its OpenAPI document is at GET /openapi.json on its
socket). Requests are built from the contract's dataclasses and every answer is parsed into them (a misfit
is the agent failing: Unavailable).
"""

from __future__ import annotations

from urllib.parse import quote

from oma_common.contracts.volume_agent import (
    Locked,
    LockStatus,
    Mounted,
    MountIn,
    PathsIn,
    SessionIn,
    ShareMounts,
    TerminateIn,
    Terminated,
    Unmounted,
    UnmountIn,
)
from oma_common.contracts.volume_agent_volumes import (
    Deleted,
    RevertIn,
    SnapshotDeleted,
    SnapshotIn,
    SnapshotView,
    StampIn,
    StampView,
    VolumeCreateIn,
    VolumesListing,
    VolumeView,
)
from oma_common.rpc import AgentClient


def _v(volume_id: str) -> str:
    return f"/volumes/{quote(volume_id, safe='')}"


class VolumeAgent:
    def __init__(self, client: AgentClient, *, mount_timeout: float = 90.0) -> None:
        self.client = client
        self.mount_timeout = mount_timeout

    # -- repository shares and immutability --------------------------------------------------------------

    async def mount_share(self, share: MountIn) -> Mounted:
        return await self.client.typed(Mounted, "POST", "/repositories/mount", body=share, timeout=self.mount_timeout)

    async def unmount_share(self, mount_point: str) -> Unmounted:
        return await self.client.typed(Unmounted, "POST", "/repositories/unmount", body=UnmountIn(mount_point),
                                       timeout=self.mount_timeout)

    async def share_mounts(self) -> ShareMounts:
        return await self.client.typed(ShareMounts, "GET", "/repositories/mounts")

    async def lock_files(self, paths: list[str]) -> Locked:
        return await self.client.typed(Locked, "POST", "/immutability/lock", body=PathsIn(paths),
                                       timeout=self.mount_timeout)

    async def unlock_files(self, paths: list[str]) -> Locked:
        return await self.client.typed(Locked, "POST", "/immutability/unlock", body=PathsIn(paths),
                                       timeout=self.mount_timeout)

    async def files_status(self, paths: list[str]) -> LockStatus:
        """Whether each file is immutable, once any change still under way on it has ended (504
        `outcome_unknown` while one has not)."""
        return await self.client.typed(LockStatus, "POST", "/immutability/status", body=PathsIn(paths),
                                       timeout=self.mount_timeout)

    async def end_tunnel_sessions(self, sessions: list[SessionIn]) -> Terminated:
        """Stop the sshd sessions of the VMA tunnel user started by these per-connection sshd processes."""
        return await self.client.typed(Terminated, "POST", "/tunnels/terminate", body=TerminateIn(sessions))

    # -- CloudStack volumes (replication) ------------------------------------------------------------------

    async def create_volume(self, vm_name: str, disk_unit: int, size_bytes: int) -> VolumeView:
        return await self.client.typed(VolumeView, "POST", "/volumes",
                                       body=VolumeCreateIn(vm_name, disk_unit, size_bytes), timeout=self.mount_timeout)

    async def volume(self, volume_id: str) -> VolumeView:
        return await self.client.typed(VolumeView, "GET", _v(volume_id))

    async def attach_volume(self, volume_id: str) -> VolumeView:
        return await self.client.typed(VolumeView, "POST", _v(volume_id) + "/attach", timeout=self.mount_timeout)

    async def detach_volume(self, volume_id: str) -> VolumeView:
        return await self.client.typed(VolumeView, "POST", _v(volume_id) + "/detach", timeout=self.mount_timeout)

    async def delete_volume(self, volume_id: str) -> Deleted:
        return await self.client.typed(Deleted, "DELETE", _v(volume_id), timeout=self.mount_timeout)

    async def volumes(self) -> VolumesListing:
        return await self.client.typed(VolumesListing, "GET", "/volumes")

    async def read_stamp(self, volume_id: str) -> str:
        """The sync stamp at the end of an attached volume's device ("" when there is none)."""
        return (await self.client.typed(StampView, "GET", _v(volume_id) + "/stamp")).stamp

    async def write_stamp(self, volume_id: str, stamp: str) -> None:
        await self.client.typed(StampView, "PUT", _v(volume_id) + "/stamp", body=StampIn(stamp),
                                timeout=self.mount_timeout)

    async def snapshot_volume(self, volume_id: str, name: str = "") -> SnapshotView:
        return await self.client.typed(SnapshotView, "POST", _v(volume_id) + "/snapshots", body=SnapshotIn(name),
                                       timeout=self.mount_timeout)

    async def revert_volume(self, volume_id: str, snapshot_id: str) -> VolumeView:
        return await self.client.typed(VolumeView, "POST", _v(volume_id) + "/revert", body=RevertIn(snapshot_id),
                                       timeout=self.mount_timeout)

    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> SnapshotDeleted:
        return await self.client.typed(SnapshotDeleted, "DELETE",
                                       f"{_v(volume_id)}/snapshots/{quote(snapshot_id, safe='')}",
                                       timeout=self.mount_timeout)
