"""volume-agent's socket API: network shares for omad's backup repositories (CloudStack volumes come later)."""

from __future__ import annotations

from typing import Any

from oma_common.contracts.volume_agent import (
    Locked,
    LockStatus,
    Mounted,
    MountIn,
    PathsIn,
    ShareMounts,
    Unmounted,
    UnmountIn,
)
from oma_common.rpc import peer_credentials
from oma_common.web import Auth, Call, route

from .immutability import Immutability
from .repositories import RepositoryMounts, Share


class RepositoriesApi:
    def __init__(self, mounts: RepositoryMounts) -> None:
        self.mounts = mounts

    @route("POST", "/repositories/mount", body=MountIn, response=Mounted, auth=Auth.PEER)
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

    @route("POST", "/repositories/unmount", body=UnmountIn, response=Unmounted, auth=Auth.PEER)
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

    @route("POST", "/immutability/lock", body=PathsIn, response=Locked, auth=Auth.PEER)
    async def lock(self, call: Call) -> dict[str, Any]:
        """Set the immutable attribute (chattr +i): nobody, root included, can change or remove the files."""
        return await self.immutability.set(call.body.paths, True)

    @route("POST", "/immutability/unlock", body=PathsIn, response=Locked, auth=Auth.PEER)
    async def unlock(self, call: Call) -> dict[str, Any]:
        """Clear the immutable attribute (chattr -i)."""
        return await self.immutability.set(call.body.paths, False)

    @route("POST", "/immutability/status", body=PathsIn, response=LockStatus, auth=Auth.PEER)
    async def status(self, call: Call) -> dict[str, Any]:
        """Whether each file is immutable (lsattr)."""
        return await self.immutability.status(call.body.paths)
