"""volume-agent's socket API: CloudStack volumes and their devices, network shares for omad's backup
repositories, immutable backup files, and ending a revoked VMA's tunnel sessions."""

from __future__ import annotations

from typing import Any

from oma_common.contracts.volume_agent import (
    Locked,
    LockStatus,
    Mounted,
    MountIn,
    PathsIn,
    ShareMounts,
    TerminateIn,
    Terminated,
    Unmounted,
    UnmountIn,
)
from oma_common.contracts.volume_agent_volumes import (
    Deleted,
    DevicesListing,
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
from oma_common.errors import CALLS_OUT, Conflict, NotFound, TimedOut, Unavailable
from oma_common.rpc import peer_credentials
from oma_common.web import Auth, Call, route

from .immutability import Immutability
from .repositories import RepositoryMounts, Share
from .tunnels import Session, TunnelSessions
from .volumes import Volumes


class RepositoriesApi:
    def __init__(self, mounts: RepositoryMounts) -> None:
        self.mounts = mounts

    @route("POST", "/repositories/mount", errors=(Conflict, *CALLS_OUT), body=MountIn, response=Mounted, auth=Auth.PEER)
    async def mount(self, call: Call) -> dict[str, Any]:
        """Mount a share (idempotent); a CIFS share's files belong to the caller."""
        b: MountIn = call.body
        options = b.options.split(",") if isinstance(b.options, str) else b.options
        kind = "cifs" if b.kind.lower() == "smb" else b.kind.lower()
        share = Share(kind=kind, server=b.server, mount_point=b.mount_point, export_path=b.export_path,
                      share_name=b.share_name, options=options, username=b.username, password=b.password,
                      domain=b.domain)
        _, uid, gid = peer_credentials(call.request)
        return await self.mounts.mount(share, owner_uid=uid, owner_gid=gid)

    @route("POST", "/repositories/unmount", errors=(Conflict, *CALLS_OUT), body=UnmountIn, response=Unmounted, auth=Auth.PEER)
    async def unmount(self, call: Call) -> dict[str, Any]:
        """Unmount a share mounted here (nothing mounted: success, `unmounted` false)."""
        return await self.mounts.unmount(call.body.mount_point)

    @route("GET", "/repositories/mounts", response=ShareMounts, auth=Auth.PEER)
    async def list(self, call: Call) -> dict[str, Any]:
        """The mount root and the shares mounted below it."""
        return await self.mounts.listing()


class ImmutabilityApi:
    def __init__(self, immutability: Immutability) -> None:
        self.immutability = immutability

    @route("POST", "/immutability/lock", errors=(NotFound, Unavailable, TimedOut), body=PathsIn, response=Locked, auth=Auth.PEER)
    async def lock(self, call: Call) -> dict[str, Any]:
        """Set the immutable attribute (chattr +i): nobody, root included, can change or remove the files.
        504 `outcome_unknown`: the filesystem did not answer in time and the change may still land; a later
        status waits for it."""
        return await self.immutability.set(call.body.paths, True)

    @route("POST", "/immutability/unlock", errors=(NotFound, Unavailable, TimedOut), body=PathsIn, response=Locked, auth=Auth.PEER)
    async def unlock(self, call: Call) -> dict[str, Any]:
        """Clear the immutable attribute (chattr -i); 504 `outcome_unknown` as for lock."""
        return await self.immutability.set(call.body.paths, False)

    @route("POST", "/immutability/status", errors=(NotFound, Unavailable, TimedOut), body=PathsIn, response=LockStatus, auth=Auth.PEER)
    async def status(self, call: Call) -> dict[str, Any]:
        """Whether each file is immutable (lsattr), once any change still under way on it has ended (504
        `outcome_unknown` while it has not)."""
        return await self.immutability.status(call.body.paths)


class VolumesApi:
    """CloudStack volumes for replication; each call on one volume waits for the one before it."""

    def __init__(self, volumes: Volumes) -> None:
        self.volumes = volumes

    @route("POST", "/volumes", errors=(NotFound, Conflict, *CALLS_OUT),
           body=VolumeCreateIn, response=VolumeView, status=201, auth=Auth.PEER)
    async def create(self, call: Call) -> VolumeView:
        """Create `migration-<vm>-disk-<unit>` in CloudStack (size rounded up to whole GiB); not attached yet."""
        b: VolumeCreateIn = call.body
        return await self.volumes.create(b.vm_name, b.disk_unit, b.size_bytes, b.disk_offering_id, b.zone_id)

    @route("GET", "/volumes", errors=CALLS_OUT, response=VolumesListing, auth=Auth.PEER)
    async def list(self, call: Call) -> VolumesListing:
        """The volumes this agent manages, and those CloudStack says are attached here that it does not."""
        return await self.volumes.listing()

    @route("GET", "/volumes/{volume_id}", errors=(NotFound, Conflict, *CALLS_OUT),
           response=VolumeView, auth=Auth.PEER)
    async def get(self, call: Call) -> VolumeView:
        """One managed volume, with its device when it is attached here (a volume whose device went away is
        checked with CloudStack first: detached or deleted there directly, its record says so)."""
        return await self.volumes.view(call.params["volume_id"])

    @route("POST", "/volumes/{volume_id}/attach", errors=(NotFound, Conflict, *CALLS_OUT), response=VolumeView, auth=Auth.PEER)
    async def attach(self, call: Call) -> VolumeView:
        """Attach to this appliance and answer once its device is present (504 if it never appears)."""
        return await self.volumes.attach(call.params["volume_id"])

    @route("POST", "/volumes/{volume_id}/detach", errors=(NotFound, Conflict, *CALLS_OUT), response=VolumeView, auth=Auth.PEER)
    async def detach(self, call: Call) -> VolumeView:
        """Detach from this appliance (stop its exports first); no longer vouched for from the start."""
        return await self.volumes.detach(call.params["volume_id"])

    @route("DELETE", "/volumes/{volume_id}", errors=(NotFound, Conflict, *CALLS_OUT),
           response=Deleted, auth=Auth.PEER)
    async def delete(self, call: Call) -> Deleted:
        """Delete a detached volume in CloudStack (409 while it is attached)."""
        return await self.volumes.delete(call.params["volume_id"])

    @route("POST", "/volumes/{volume_id}/snapshots", errors=(NotFound, Conflict, *CALLS_OUT),
           body=SnapshotIn, response=SnapshotView, status=201,
           auth=Auth.PEER)
    async def snapshot(self, call: Call) -> SnapshotView:
        """Take a CloudStack snapshot of the volume."""
        return await self.volumes.snapshot(call.params["volume_id"], call.body.name)

    @route("POST", "/volumes/{volume_id}/revert", errors=(NotFound, Conflict, *CALLS_OUT), body=RevertIn, response=VolumeView, auth=Auth.PEER)
    async def revert(self, call: Call) -> VolumeView:
        """Revert to a snapshot (attached here: detached, reverted, attached again; the device may change)."""
        return await self.volumes.revert(call.params["volume_id"], call.body.snapshot_id)

    @route("DELETE", "/volumes/{volume_id}/snapshots/{snapshot_id}", errors=(NotFound, Conflict, *CALLS_OUT),
           response=SnapshotDeleted, auth=Auth.PEER)
    async def delete_snapshot(self, call: Call) -> SnapshotDeleted:
        """Delete one of the volume's snapshots."""
        return await self.volumes.delete_snapshot(call.params["volume_id"], call.params["snapshot_id"])

    @route("GET", "/volumes/{volume_id}/stamp", errors=(NotFound, Conflict, Unavailable), response=StampView,
           auth=Auth.PEER)
    async def read_stamp(self, call: Call) -> StampView:
        """The sync stamp in the last 4 KiB of the volume's device (attached here), "" when there is none."""
        return await self.volumes.read_stamp(call.params["volume_id"])

    @route("PUT", "/volumes/{volume_id}/stamp", errors=(NotFound, Conflict, Unavailable), body=StampIn,
           response=StampView, auth=Auth.PEER)
    async def write_stamp(self, call: Call) -> StampView:
        """Write a sync stamp into the last 4 KiB of the volume's device (attached here), flushed."""
        return await self.volumes.write_stamp(call.params["volume_id"], call.body.stamp)

    @route("GET", "/devices", response=DevicesListing, auth=Auth.PEER)
    async def devices(self, call: Call) -> DevicesListing:
        """Which device belongs to which volume: the devices attached here for CloudStack volumes (those
        nbd-pool may export)."""
        return await self.volumes.checked_vouched()


class TunnelsApi:
    def __init__(self, sessions: TunnelSessions) -> None:
        self.sessions = sessions

    @route("POST", "/tunnels/terminate", errors=(Unavailable,), body=TerminateIn, response=Terminated, auth=Auth.PEER)
    async def terminate(self, call: Call) -> Terminated:
        """End these sshd sessions of the VMA tunnel user (anything else named is skipped, with the reason)."""
        b: TerminateIn = call.body
        return await self.sessions.terminate([Session(s.pid, s.start_time) for s in b.sessions])
