"""volume-agent's socket API as calls: repository shares and immutability.

The shapes are volume-agent's contract, declared once in oma_common.contracts.volume_agent (its handlers
use the same classes; its OpenAPI document is at GET /openapi.json on its socket). Requests are built from
the contract's dataclasses and every answer is parsed against it (a misfit is the agent failing).
The tunnel and volume calls (POST /tunnels/terminate, /volumes…) still pass plain dicts: their shapes are in
oma_common.contracts.volume_agent_volumes and volume-agent's /openapi.json.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from oma_common import schema
from oma_common.contracts.volume_agent import Locked, Mounted, MountIn, PathsIn, ShareMounts, Unmounted, UnmountIn
from oma_common.rpc import AgentClient


class VolumeAgent:
    def __init__(self, client: AgentClient, *, mount_timeout: float = 90.0) -> None:
        self.client = client
        self.mount_timeout = mount_timeout

    async def mount_share(self, share: dict[str, Any]) -> dict[str, Any]:
        body = schema.parse(MountIn, share, what="share")
        answer = await self.client.typed(Mounted, "POST", "/repositories/mount", body=body, timeout=self.mount_timeout)
        return schema.to_dict(answer)  # type: ignore[no-any-return]

    async def unmount_share(self, mount_point: str) -> dict[str, Any]:
        answer = await self.client.typed(Unmounted, "POST", "/repositories/unmount", body=UnmountIn(mount_point),
                                         timeout=self.mount_timeout)
        return schema.to_dict(answer)  # type: ignore[no-any-return]

    async def share_mounts(self) -> dict[str, Any]:
        return schema.to_dict(await self.client.typed(ShareMounts, "GET", "/repositories/mounts"))  # type: ignore[no-any-return]

    async def lock_files(self, paths: list[str]) -> dict[str, Any]:
        answer = await self.client.typed(Locked, "POST", "/immutability/lock", body=PathsIn(paths),
                                         timeout=self.mount_timeout)
        return schema.to_dict(answer)  # type: ignore[no-any-return]

    async def unlock_files(self, paths: list[str]) -> dict[str, Any]:
        answer = await self.client.typed(Locked, "POST", "/immutability/unlock", body=PathsIn(paths),
                                         timeout=self.mount_timeout)
        return schema.to_dict(answer)  # type: ignore[no-any-return]

    async def end_tunnel_sessions(self, sessions: list[dict[str, Any]]) -> dict[str, Any]:
        """Stop the sshd sessions of the VMA tunnel user started by these per-connection sshd processes."""
        return await self.client.call("POST", "/tunnels/terminate",  # type: ignore[no-any-return]
                                      json={"sessions": sessions})
    # -- CloudStack volumes (replication) --------------------------------------------------------------

    async def create_volume(self, vm_name: str, disk_unit: int, size_bytes: int) -> dict[str, Any]:
        body = {"vm_name": vm_name, "disk_unit": disk_unit, "size_bytes": size_bytes}
        return await self.client.call("POST", "/volumes", json=body,  # type: ignore[no-any-return]
                                      timeout=self.mount_timeout)

    async def volume(self, volume_id: str) -> dict[str, Any]:
        return await self.client.call("GET", f"/volumes/{quote(volume_id, safe='')}")  # type: ignore[no-any-return]

    async def attach_volume(self, volume_id: str) -> dict[str, Any]:
        return await self.client.call("POST", f"/volumes/{quote(volume_id, safe='')}/attach",  # type: ignore[no-any-return]
                                      timeout=self.mount_timeout)

    async def detach_volume(self, volume_id: str) -> dict[str, Any]:
        return await self.client.call("POST", f"/volumes/{quote(volume_id, safe='')}/detach",  # type: ignore[no-any-return]
                                      timeout=self.mount_timeout)

    async def volumes(self) -> dict[str, Any]:
        """{volumes: [VolumeView], unmanaged_attached: [volume ids]}."""
        return await self.client.call("GET", "/volumes")  # type: ignore[no-any-return]

    async def read_stamp(self, volume_id: str) -> str:
        """The sync stamp at the end of an attached volume's device ("" when there is none)."""
        answer = await self.client.call("GET", f"/volumes/{quote(volume_id, safe='')}/stamp")
        return str(answer["stamp"])

    async def write_stamp(self, volume_id: str, stamp: str) -> None:
        await self.client.call("PUT", f"/volumes/{quote(volume_id, safe='')}/stamp", json={"stamp": stamp},
                               timeout=self.mount_timeout)

    async def snapshot_volume(self, volume_id: str, name: str = "") -> dict[str, Any]:
        return await self.client.call("POST", f"/volumes/{quote(volume_id, safe='')}/snapshots",  # type: ignore[no-any-return]
                                      json={"name": name}, timeout=self.mount_timeout)

    async def revert_volume(self, volume_id: str, snapshot_id: str) -> dict[str, Any]:
        return await self.client.call("POST", f"/volumes/{quote(volume_id, safe='')}/revert",  # type: ignore[no-any-return]
                                      json={"snapshot_id": snapshot_id}, timeout=self.mount_timeout)

    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> dict[str, Any]:
        return await self.client.call(  # type: ignore[no-any-return]
            "DELETE", f"/volumes/{quote(volume_id, safe='')}/snapshots/{quote(snapshot_id, safe='')}",
            timeout=self.mount_timeout)
