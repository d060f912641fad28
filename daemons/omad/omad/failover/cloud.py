"""What failover steps do in CloudStack and on this appliance, each idempotent: it looks before it acts.

The destination VM is found by its name (derived from the job), a snapshot by its name, a volume's
attachment by CloudStack's own answer — so a step run again after a crash finds what its first run made.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from oma_common.errors import Conflict, NotFound

from ..clients.cloudstack import Client
from ..clients.nbdpool import NbdPool
from ..clients.volume_agent import VolumeAgent

log = logging.getLogger(__name__)


def destination_name(vm_name: str, failover_type: str, job_id: str) -> str:
    """A CloudStack host name (letters, digits, hyphens, ≤ 63, starting with a letter) unique to the job."""
    base = re.sub(r"[^A-Za-z0-9-]+", "-", vm_name).strip("-")[:40] or "vm"
    if not base[0].isalpha():
        base = "vm-" + base
    tail = re.sub(r"[^a-z0-9]", "", job_id.lower())[-6:]
    return f"{base}-{failover_type}-{tail}"


def snapshot_name(job_id: str, disk_id: str) -> str:
    return f"failover-{job_id}-{disk_id}"


class Cloud:
    """One failover's view of CloudStack (a client for its config) and of this appliance's agents."""

    def __init__(self, cs: Client, volumes: VolumeAgent, pool: NbdPool) -> None:
        self.cs = cs
        self.volumes = volumes
        self.pool = pool

    # -- reads ---------------------------------------------------------------------------------------------

    async def vm(self, name: str) -> dict[str, Any] | None:
        found = [v for v in await self.cs.listing("listVirtualMachines", name=name) if v.get("name") == name]
        live = [v for v in found if v.get("state") not in ("Destroyed", "Expunging")]
        return live[0] if live else None

    async def volume(self, volume_id: str) -> dict[str, Any] | None:
        found = await self.cs.listing("listVolumes", id=volume_id)
        return found[0] if found else None

    async def snapshot(self, volume_id: str, name: str) -> dict[str, Any] | None:
        found = [s for s in await self.cs.listing("listSnapshots", volumeid=volume_id, name=name)
                 if s.get("name") == name]
        return found[0] if found else None

    # -- this appliance ----------------------------------------------------------------------------------

    async def stop_exports(self, devices: set[str]) -> list[int]:
        """Stop every NBD export of these devices (links or /dev paths); the pids stopped."""
        stopped = []
        for e in await self.pool.exports():
            if e.path in devices and e.pid:
                await self.pool.stop_export(pid=e.pid)
                stopped.append(e.pid)
        return stopped

    async def detach_here(self, volume_id: str) -> None:
        if (await self.volumes.volume(volume_id)).attached_here:
            await self.volumes.detach_volume(volume_id)

    async def attach_here(self, volume_id: str, vm_id: str | None = None) -> None:
        """Back on this appliance (detached from the failover VM `vm_id` first, if it is still there)."""
        cv = await self.volume(volume_id)
        if cv is None:
            raise NotFound("volume gone", f"CloudStack volume {volume_id} does not exist any more")
        on = cv.get("virtualmachineid")
        if (await self.volumes.volume(volume_id)).attached_here:
            return
        if on and vm_id and on == vm_id:
            await self.detach_from(volume_id, vm_id)
        await self.volumes.attach_volume(volume_id)

    # -- snapshots -------------------------------------------------------------------------------------

    async def take_snapshot(self, volume_id: str, name: str) -> str:
        found = await self.snapshot(volume_id, name)
        if found is not None:
            return str(found["id"])
        return (await self.volumes.snapshot_volume(volume_id, name)).snapshot_id

    async def revert(self, volume_id: str, name: str) -> bool:
        """Revert to the named snapshot; False when there is none (nothing to revert to)."""
        found = await self.snapshot(volume_id, name)
        if found is None:
            return False
        await self.volumes.revert_volume(volume_id, str(found["id"]))
        return True

    async def drop_snapshot(self, volume_id: str, name: str) -> None:
        found = await self.snapshot(volume_id, name)
        if found is not None:
            await self.volumes.delete_snapshot(volume_id, str(found["id"]))

    # -- the destination VM ----------------------------------------------------------------------------

    async def deploy(self, name: str, display_name: str, *, zone: str, offering: str, template: str,
                     networks: list[str], own: set[str]) -> str:
        """The VM, deployed stopped, with no root volume of its own (the template's one is removed: the
        replicated OS volume takes its place)."""
        vm = await self.vm(name)
        if vm is None:
            res = await self.cs.job("deployVirtualMachine", name=name, displayname=display_name, zoneid=zone,
                                    serviceofferingid=offering, templateid=template, networkids=",".join(networks),
                                    startvm="false")
            vm = res.get("virtualmachine") or await self.vm(name)
            if not vm:
                raise NotFound("VM not deployed", f"CloudStack deployed no VM named {name}")
        vm_id = str(vm["id"])
        await self.drop_template_root(vm_id, name, own)
        return vm_id

    async def drop_template_root(self, vm_id: str, name: str, own: set[str]) -> None:
        for v in await self.cs.listing("listVolumes", virtualmachineid=vm_id, type="ROOT"):
            if v["id"] not in own:
                await self.stop(vm_id)
                await self.cs.job("detachVolume", id=v["id"])
                await self.cs.call("deleteVolume", id=v["id"])
        for v in await self.cs.listing("listVolumes", name=f"ROOT-{name}"):
            if v["id"] not in own and not v.get("virtualmachineid"):
                await self.cs.call("deleteVolume", id=v["id"])

    async def attach_to(self, volume_id: str, vm_id: str, *, root: bool) -> None:
        cv = await self.volume(volume_id)
        if cv is None:
            raise NotFound("volume gone", f"CloudStack volume {volume_id} does not exist any more")
        on = cv.get("virtualmachineid")
        if on == vm_id:
            return
        if on:
            raise Conflict("volume attached elsewhere", f"volume {volume_id} is attached to "
                                                        f"{cv.get('vmname') or on}")
        params = {"deviceid": 0} if root else {}
        await self.cs.job("attachVolume", id=volume_id, virtualmachineid=vm_id, **params)

    async def detach_from(self, volume_id: str, vm_id: str) -> None:
        cv = await self.volume(volume_id)
        if cv is None or cv.get("virtualmachineid") != vm_id:
            return
        if cv.get("type") == "ROOT":
            await self.stop(vm_id)
        await self.cs.job("detachVolume", id=volume_id)

    async def start(self, vm_id: str) -> None:
        vm = (await self.cs.listing("listVirtualMachines", id=vm_id) or [{}])[0]
        if vm.get("state") != "Running":
            await self.cs.job("startVirtualMachine", id=vm_id)

    async def stop(self, vm_id: str) -> None:
        found = await self.cs.listing("listVirtualMachines", id=vm_id)
        if found and found[0].get("state") not in ("Stopped", "Destroyed", "Expunging"):
            await self.cs.job("stopVirtualMachine", id=vm_id)

    async def destroy(self, name: str, own: set[str]) -> None:
        """Stop and expunge the VM by name, our volumes detached from it first (a destroy deletes a root)."""
        vm = await self.vm(name)
        if vm is None:
            return
        vm_id = str(vm["id"])
        await self.stop(vm_id)
        for volume_id in own:
            await self.detach_from(volume_id, vm_id)
        await self.cs.job("destroyVirtualMachine", id=vm_id, expunge="true")
        await self.drop_template_root(vm_id, name, own)
