"""volume-agent's socket API as typed calls (volume_agent/api.py is the other side).

  POST /repositories/mount   {kind, server, mount_point, export_path?, share_name?, options?, username?,
                              password?, domain?}          → {mount_point, source, type, mounted, already_mounted}
  POST /repositories/unmount {mount_point}                 → {mount_point, unmounted, message}
  GET  /repositories/mounts                                → {mount_root, mounts: [{mount_point, source, type}]}
  POST /immutability/lock    {paths}                       → {paths, immutable: true}   (chattr +i)
  POST /immutability/unlock  {paths}                       → {paths, immutable: false}  (chattr -i)
  POST /volumes              {vm_name, disk_unit, size_bytes} → 201 VolumeView (oma_common.contracts.
                              volume_agent_volumes): {volume_id, name, size_bytes, serial, attached_here,
                              device_path, link_path, snapshots, operation}; 409 when the name exists
  GET  /volumes/{id}                                        → VolumeView; 404 unknown
  POST /volumes/{id}/attach                                 → VolumeView once its device is present (vouched)
  POST /volumes/{id}/detach                                 → VolumeView
  GET  /volumes → {volumes, unmanaged_attached}; POST /volumes/{id}/snapshots {name} → 201 SnapshotView;
  POST /volumes/{id}/revert {snapshot_id} → VolumeView; DELETE /volumes/{id}/snapshots/{snapshot_id}
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from oma_common.rpc import AgentClient


class VolumeAgent:
    def __init__(self, client: AgentClient, *, mount_timeout: float = 90.0) -> None:
        self.client = client
        self.mount_timeout = mount_timeout

    async def mount_share(self, share: dict[str, Any]) -> dict[str, Any]:
        return await self.client.call("POST", "/repositories/mount", json=share,  # type: ignore[no-any-return]
                                      timeout=self.mount_timeout)

    async def unmount_share(self, mount_point: str) -> dict[str, Any]:
        return await self.client.call("POST", "/repositories/unmount",  # type: ignore[no-any-return]
                                      json={"mount_point": mount_point}, timeout=self.mount_timeout)

    async def share_mounts(self) -> dict[str, Any]:
        return await self.client.call("GET", "/repositories/mounts")  # type: ignore[no-any-return]

    async def lock_files(self, paths: list[str]) -> dict[str, Any]:
        return await self.client.call("POST", "/immutability/lock",  # type: ignore[no-any-return]
                                      json={"paths": paths}, timeout=self.mount_timeout)

    async def unlock_files(self, paths: list[str]) -> dict[str, Any]:
        return await self.client.call("POST", "/immutability/unlock",  # type: ignore[no-any-return]
                                      json={"paths": paths}, timeout=self.mount_timeout)

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
