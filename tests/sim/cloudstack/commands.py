"""The API commands: parameters checked as CloudStack checks them, async commands run as jobs, faults injected.

A command answers a dict (the body of `<command>response`) or raises CloudStackError. An async command
validates its parameters at once (errors 431 before any job exists, as CloudStack's API layer does), answers
`{jobid}` (plus `id` for the create commands, whose row exists from the start), and runs its body as a job
that `queryAsyncJobResult` reports: pending, then succeeded with `jobresult`, or failed with its error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .devices import DeviceHost
from .state import (
    GIB,
    INTERNAL_ERROR,
    PARAM_ERROR,
    UNSUPPORTED_ACTION,
    CloudStackError,
    Inventory,
    Job,
    Nic,
    Snapshot,
    VirtualMachine,
    Volume,
    new_id,
    now,
)

log = logging.getLogger("cloudstack_sim")

Params = dict[str, str]
Body = Callable[[], Awaitable[dict[str, Any]]]


@dataclasses.dataclass
class Faults:
    """Misbehaviour on demand (set from a test, or POST /admin/faults)."""

    job_seconds: float = 0.0  # every async job stays pending this long before it runs
    fail: dict[str, str] = dataclasses.field(default_factory=dict)  # command (lower case) → errortext of a 530
    device_delay_seconds: float = 0.0  # the device of an attach appears this long after the job succeeded
    device_never: bool = False  # an attach to the appliance succeeds, but no device ever appears

    def update(self, data: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in data:
                value = data[f.name]
                setattr(self, f.name, {k.lower(): v for k, v in value.items()} if f.name == "fail" else value)


def _need(p: Params, name: str, command: str) -> str:
    value = p.get(name, "")
    if not value:
        raise CloudStackError(PARAM_ERROR, f"Unable to execute API command {command} due to missing parameter {name}")
    return value


def _int(p: Params, name: str, default: int | None = None) -> int | None:
    if name not in p or p[name] == "":
        return default
    try:
        return int(p[name])
    except ValueError:
        raise CloudStackError(PARAM_ERROR, f"Unable to execute API command due to invalid value {p[name]} for "
                                           f"parameter {name}") from None


def _listing(key: str, items: list[dict[str, Any]], p: Params) -> dict[str, Any]:
    """CloudStack's list answer: `{}` when empty, else `{count, <key>: [...]}`, paged with page/pagesize."""
    if not items:
        return {}
    total = len(items)
    page, size = _int(p, "page"), _int(p, "pagesize")
    if page is not None and size:
        items = items[(page - 1) * size: page * size]
    return {"count": total, key: items} if items else {}


def _match(p: Params, item: dict[str, Any], *fields: str) -> bool:
    for f in fields:
        if p.get(f) and str(item.get(f, "")) != p[f]:
            return False
    keyword = p.get("keyword", "").lower()
    return not keyword or keyword in str(item.get("name", "")).lower()


class Commands:
    def __init__(self, inv: Inventory, devices: DeviceHost, faults: Faults) -> None:
        self.inv = inv
        self.devices = devices
        self.faults = faults
        self._lock = asyncio.Lock()  # job bodies one at a time (CloudStack serialises per VM; simpler here)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending_plugs: dict[str, asyncio.Task[None]] = {}
        self.calls: list[str] = []  # every command received, in order (tests read it)
        self.table: dict[str, Callable[[Params], Awaitable[dict[str, Any]]]] = {
            name.lower(): getattr(self, name) for name in (
                "listCapabilities", "listZones", "listDomains", "listAccounts", "listNetworks",
                "listServiceOfferings", "listDiskOfferings", "listTemplates", "listVirtualMachines",
                "listVolumes", "listSnapshots", "createVolume", "attachVolume", "detachVolume", "deleteVolume",
                "createSnapshot", "revertSnapshot", "deleteSnapshot", "queryAsyncJobResult",
                "deployVirtualMachine", "startVirtualMachine", "stopVirtualMachine", "destroyVirtualMachine")}

    async def dispatch(self, command: str, p: Params) -> dict[str, Any]:
        self.calls.append(command)
        handler = self.table.get(command.lower())
        if handler is None:
            raise CloudStackError(UNSUPPORTED_ACTION, "The given command does not exist or it is not available "
                                                      "for user")
        fault = self.faults.fail.get(command.lower())
        if fault is not None and not command.lower().startswith(("create", "attach", "detach", "revert", "delete",
                                                                 "deploy", "start", "stop", "destroy")):
            raise CloudStackError(INTERNAL_ERROR, fault)
        return await handler(p)

    # -- jobs ------------------------------------------------------------------------------------------

    def _job(self, command: str, instancetype: str, instanceid: str, body: Body,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
        job = Inventory.add(self.inv.jobs, Job(new_id(), f"org.apache.cloudstack.api.command.user.{command}Cmd",
                                               instancetype, instanceid))
        task = asyncio.get_running_loop().create_task(self._run(job, command, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {**(extra or {}), "jobid": job.id}

    async def _run(self, job: Job, command: str, body: Body) -> None:
        await asyncio.sleep(self.faults.job_seconds)
        try:
            fault = self.faults.fail.get(command.lower())
            if fault is not None:
                raise CloudStackError(INTERNAL_ERROR, fault)
            async with self._lock:
                result = await body()
        except CloudStackError as e:
            job.status, job.resultcode, job.finished = 2, e.code, time.monotonic()
            job.result = {"errorcode": e.code, "errortext": e.text}
            log.info("job %s (%s) failed: %s", job.id, command, e.text)
            return
        except Exception as e:  # a bug or a host failure: what CloudStack reports as an internal error
            log.exception("job %s (%s) crashed", job.id, command)
            job.status, job.resultcode, job.finished = 2, INTERNAL_ERROR, time.monotonic()
            job.result = {"errorcode": INTERNAL_ERROR, "errortext": f"{type(e).__name__}: {e}"}
            return
        job.status, job.resultcode, job.result, job.finished = 1, 0, result, time.monotonic()

    async def queryAsyncJobResult(self, p: Params) -> dict[str, Any]:
        job = self.inv.jobs.get(_need(p, "jobid", "queryAsyncJobResult"))
        if job is None:
            raise CloudStackError(PARAM_ERROR, f"Unable to execute API command queryasyncjobresult due to invalid "
                                               f"value. Invalid parameter jobid value={p['jobid']} due to incorrect "
                                               f"long value format, or entity does not exist")
        acc = self.inv.account()
        out: dict[str, Any] = {"accountid": acc.id, "userid": acc.id, "cmd": job.cmd, "jobstatus": job.status,
                               "jobprocstatus": 0, "jobresultcode": job.resultcode, "jobinstancetype": job.instancetype,
                               "jobinstanceid": job.instanceid, "created": job.created, "jobid": job.id}
        if job.status != 0:
            out["jobresulttype"] = "object"
            out["jobresult"] = job.result
            out["completed"] = now()
        return out

    async def stop(self) -> None:
        for task in [*self._tasks, *self._pending_plugs.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._pending_plugs.values(), return_exceptions=True)
        self._pending_plugs.clear()

    # -- reading ---------------------------------------------------------------------------------------

    async def listCapabilities(self, p: Params) -> dict[str, Any]:
        return {"capability": {"cloudstackversion": "4.19.1.0-sim", "apilimitinterval": 1, "apilimitmax": 0,
                               "customdiskofferingmaxsize": 1024, "customdiskofferingminsize": 1,
                               "kvmsnapshotenabled": True, "allowusercreateprojects": True,
                               "userpublictemplateenabled": True, "supportELB": "false"}}

    async def listZones(self, p: Params) -> dict[str, Any]:
        items = [z.view() for z in self.inv.zones.values()]
        return _listing("zone", [i for i in items if _match(p, i, "id", "name")], p)

    async def listDomains(self, p: Params) -> dict[str, Any]:
        items = [d.view() for d in self.inv.domains.values()]
        return _listing("domain", [i for i in items if _match(p, i, "id", "name")], p)

    async def listAccounts(self, p: Params) -> dict[str, Any]:
        items = [a.view(self.inv.domains[a.domainid]) for a in self.inv.accounts.values()]
        return _listing("account", [i for i in items if _match(p, i, "id", "name", "domainid")], p)

    async def listNetworks(self, p: Params) -> dict[str, Any]:
        items = [n.view(self.inv.zones[n.zoneid]) for n in self.inv.networks.values()]
        return _listing("network", [i for i in items if _match(p, i, "id", "zoneid", "name")], p)

    async def listServiceOfferings(self, p: Params) -> dict[str, Any]:
        items = [s.view() for s in self.inv.service_offerings.values()]
        return _listing("serviceoffering", [i for i in items if _match(p, i, "id", "name")], p)

    async def listDiskOfferings(self, p: Params) -> dict[str, Any]:
        items = [d.view() for d in self.inv.disk_offerings.values()]
        return _listing("diskoffering", [i for i in items if _match(p, i, "id", "name")], p)

    async def listTemplates(self, p: Params) -> dict[str, Any]:
        flt = _need(p, "templatefilter", "listTemplates")
        if flt not in ("featured", "self", "selfexecutable", "sharedexecutable", "executable", "community", "all"):
            raise CloudStackError(PARAM_ERROR, f"Unable to execute API command listtemplates due to invalid value. "
                                               f"Invalid parameter templatefilter value={flt}")
        items = [t.view(self.inv.zones[t.zoneid]) for t in self.inv.templates.values()]
        return _listing("template", [i for i in items if _match(p, i, "id", "zoneid", "name")], p)

    async def listVirtualMachines(self, p: Params) -> dict[str, Any]:
        items = [self.inv.vm_view(v) for v in self.inv.vms.values() if v.state != "Expunging"]
        return _listing("virtualmachine", [i for i in items if _match(p, i, "id", "zoneid", "name", "state")], p)

    async def listVolumes(self, p: Params) -> dict[str, Any]:
        items = [self.inv.volume_view(v) for v in self.inv.volumes.values()]
        return _listing("volume", [i for i in items if _match(p, i, "id", "virtualmachineid", "type", "zoneid",
                                                               "name")], p)

    async def listSnapshots(self, p: Params) -> dict[str, Any]:
        items = [self.inv.snapshot_view(s) for s in self.inv.snapshots.values()]
        return _listing("snapshot", [i for i in items if _match(p, i, "id", "volumeid", "name")], p)

    # -- volumes ---------------------------------------------------------------------------------------

    async def createVolume(self, p: Params) -> dict[str, Any]:
        zone = self.inv.get(self.inv.zones, "zone", _need(p, "zoneid", "createVolume"), "zoneid")
        if not p.get("diskofferingid") and not p.get("snapshotid"):
            raise CloudStackError(PARAM_ERROR, "Either disk Offering Id or snapshot Id must be passed whilst "
                                               "creating volume")
        offering = self.inv.get(self.inv.disk_offerings, "disk offering", p.get("diskofferingid"), "diskofferingid")
        size_gb = _int(p, "size")
        if offering.iscustomized:
            if not size_gb or size_gb <= 0:
                raise CloudStackError(PARAM_ERROR, "This disk offering requires a custom size specified")
        else:
            if size_gb is not None and size_gb != offering.disksize:
                raise CloudStackError(PARAM_ERROR, "This disk offering does not allow custom size")
            size_gb = offering.disksize
        vol = Inventory.add(self.inv.volumes, Volume(new_id(), "", zone.id, size_gb * GIB, "DATADISK", offering.id))
        vol.name = p.get("name") or f"volume-{vol.id[:8]}"
        vol.state = "Allocated"

        async def body() -> dict[str, Any]:
            return {"volume": self.inv.volume_view(vol)}

        return self._job("CreateVolume", "Volume", vol.id, body, {"id": vol.id})

    async def attachVolume(self, p: Params) -> dict[str, Any]:
        vol: Volume = self.inv.get(self.inv.volumes, "volume", _need(p, "id", "attachVolume"))
        vm: VirtualMachine = self.inv.get(self.inv.vms, "vm", _need(p, "virtualmachineid", "attachVolume"),
                                          "virtualmachineid")
        deviceid = _int(p, "deviceid")

        async def body() -> dict[str, Any]:
            if vol.id not in self.inv.volumes:
                raise CloudStackError(PARAM_ERROR, f"Unable to find volume with ID: {vol.id}")
            if vol.virtualmachineid:
                raise CloudStackError(PARAM_ERROR, "Please specify a volume that is not attached to any VM.")
            if vm.state not in ("Running", "Stopped"):
                raise CloudStackError(PARAM_ERROR, "Please specify a VM that is either running or stopped.")
            if deviceid == 0:
                if vm.state != "Stopped" or any(v.type == "ROOT" for v in self.inv.volumes_of(vm.id)):
                    raise CloudStackError(PARAM_ERROR, "Vm already has root volume attached to it")
                vol.type = "ROOT"
            elif deviceid is not None and any(v.deviceid == deviceid for v in self.inv.volumes_of(vm.id)):
                raise CloudStackError(PARAM_ERROR, f"deviceId {deviceid} is used by VM {vm.name}")
            vol.virtualmachineid, vol.deviceid = vm.id, deviceid if deviceid is not None else \
                self.inv.free_deviceid(vm.id)
            vol.state, vol.attached = "Ready", now()
            self.devices.provision(vol.id, vol.size)
            if vm.id == self.inv.appliance_vm_id and vm.state == "Running":
                self._hotplug(vol)
            log.info("volume %s attached to %s as device %s", vol.id, vm.name, vol.deviceid)
            return {"volume": self.inv.volume_view(vol)}

        return self._job("AttachVolume", "Volume", vol.id, body)

    def _hotplug(self, vol: Volume) -> None:
        if self.faults.device_never:
            log.info("volume %s: fault: its device never appears", vol.id)
            return

        async def plug(delay: float) -> None:
            await asyncio.sleep(delay)
            await self.devices.plug(vol.id, vol.size)
            self._pending_plugs.pop(vol.id, None)

        self._pending_plugs[vol.id] = asyncio.get_running_loop().create_task(plug(self.faults.device_delay_seconds))

    async def _unplug(self, vol: Volume) -> None:
        pending = self._pending_plugs.pop(vol.id, None)
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await self.devices.unplug(vol.id)

    async def detachVolume(self, p: Params) -> dict[str, Any]:
        if p.get("id"):
            vol: Volume = self.inv.get(self.inv.volumes, "volume", p["id"])
        else:
            vm_id = _need(p, "virtualmachineid", "detachVolume")
            devid = _int(p, "deviceid")
            found = [v for v in self.inv.volumes_of(vm_id) if v.deviceid == devid]
            if not found:
                raise CloudStackError(PARAM_ERROR, "Unable to find volume with the given virtualmachineid and "
                                                   "deviceid")
            vol = found[0]

        async def body() -> dict[str, Any]:
            if not vol.virtualmachineid:
                raise CloudStackError(PARAM_ERROR, "Please specify a volume that is attached to a VM.")
            vm = self.inv.vms[vol.virtualmachineid]
            if vol.type == "ROOT" and vm.state != "Stopped":
                raise CloudStackError(PARAM_ERROR, "Root volume detach is allowed only when the VM is stopped")
            await self._unplug(vol)
            vol.virtualmachineid, vol.deviceid, vol.attached = None, None, None
            if vol.type == "ROOT":
                vol.type = "DATADISK"  # CloudStack keeps ROOT; a replacement root volume is reused as data here
            log.info("volume %s detached from %s", vol.id, vm.name)
            return {"volume": self.inv.volume_view(vol)}

        return self._job("DetachVolume", "Volume", vol.id, body)

    async def deleteVolume(self, p: Params) -> dict[str, Any]:
        vol: Volume = self.inv.get(self.inv.volumes, "volume", _need(p, "id", "deleteVolume"))
        fault = self.faults.fail.get("deletevolume")
        if fault is not None:
            raise CloudStackError(INTERNAL_ERROR, fault)
        if vol.virtualmachineid:
            raise CloudStackError(PARAM_ERROR, "Please specify a volume that is not attached to any VM.")
        del self.inv.volumes[vol.id]
        self.devices.forget_volume(vol.id)
        log.info("volume %s deleted", vol.id)
        return {"success": True}

    # -- snapshots -------------------------------------------------------------------------------------

    async def createSnapshot(self, p: Params) -> dict[str, Any]:
        vol: Volume = self.inv.get(self.inv.volumes, "volume", _need(p, "volumeid", "createSnapshot"), "volumeid")
        if vol.state != "Ready":
            raise CloudStackError(PARAM_ERROR, f"VolumeId: {vol.id} is not in Ready state but {vol.state}. "
                                               f"Cannot take snapshot.")
        vm = self.inv.vms.get(vol.virtualmachineid or "")
        name = p.get("name") or f"{vm.name if vm else 'detached'}_{vol.name}_{now().replace(':', '')[:15]}"
        snap = Inventory.add(self.inv.snapshots, Snapshot(new_id(), vol.id, name, state="Creating"))

        async def body() -> dict[str, Any]:
            await self.devices.snapshot(vol.id, snap.id, vol.size)
            snap.state = "BackedUp"
            return {"snapshot": self.inv.snapshot_view(snap)}

        return self._job("CreateSnapshot", "Snapshot", snap.id, body, {"id": snap.id})

    async def revertSnapshot(self, p: Params) -> dict[str, Any]:
        snap: Snapshot = self.inv.get(self.inv.snapshots, "snapshot", _need(p, "id", "revertSnapshot"))

        async def body() -> dict[str, Any]:
            vol = self.inv.volumes.get(snap.volumeid)
            if vol is None:
                raise CloudStackError(PARAM_ERROR, f"Snapshot {snap.id}'s volume does not exist any more")
            vm = self.inv.vms.get(vol.virtualmachineid or "")
            if vm is not None and vm.state != "Stopped":
                raise CloudStackError(PARAM_ERROR, f"Volume {vol.name} is attached to VM {vm.name} that is "
                                                   f"{vm.state}; detach the volume or stop the VM before reverting "
                                                   f"it to a snapshot")
            await self.devices.revert(vol.id, snap.id)
            return {"snapshot": self.inv.snapshot_view(snap)}

        return self._job("RevertSnapshot", "Snapshot", snap.id, body)

    async def deleteSnapshot(self, p: Params) -> dict[str, Any]:
        snap: Snapshot = self.inv.get(self.inv.snapshots, "snapshot", _need(p, "id", "deleteSnapshot"))

        async def body() -> dict[str, Any]:
            self.inv.snapshots.pop(snap.id, None)
            self.devices.forget_snapshot(snap.id)
            return {"success": True}

        return self._job("DeleteSnapshot", "Snapshot", snap.id, body)

    # -- virtual machines ------------------------------------------------------------------------------

    async def deployVirtualMachine(self, p: Params) -> dict[str, Any]:
        so = self.inv.get(self.inv.service_offerings, "service offering",
                          _need(p, "serviceofferingid", "deployVirtualMachine"), "serviceofferingid")
        template = self.inv.get(self.inv.templates, "template", _need(p, "templateid", "deployVirtualMachine"),
                                "templateid")
        zone = self.inv.get(self.inv.zones, "zone", _need(p, "zoneid", "deployVirtualMachine"), "zoneid")
        network_ids = [n for n in p.get("networkids", "").split(",") if n]
        if not network_ids:
            raise CloudStackError(PARAM_ERROR, "Unable to execute API command deployvirtualmachine due to missing "
                                               "parameter networkids")
        for n in network_ids:
            self.inv.get(self.inv.networks, "network", n, "networkids")
        start = p.get("startvm", "true").lower() != "false"
        name = p.get("name") or f"VM-{new_id()}"
        if any(v.name == name for v in self.inv.vms.values()):
            raise CloudStackError(INTERNAL_ERROR, f"The vm with hostName {name} already exists")
        nics = [Nic(new_id(), n, "02:00:%02x:%02x:%02x:%02x" % tuple(random.randrange(256) for _ in range(4)),
                    f"10.9.{random.randrange(256)}.{random.randrange(2, 254)}", i == 0)
                for i, n in enumerate(network_ids)]
        vm = Inventory.add(self.inv.vms, VirtualMachine(new_id(), name, p.get("displayname") or name, zone.id,
                                                        so.id, template.id, "Starting" if start else "Stopped", nics))
        Inventory.add(self.inv.volumes, Volume(new_id(), f"ROOT-{name}", zone.id, template.size, "ROOT", None,
                                               state="Ready", virtualmachineid=vm.id, deviceid=0, attached=now()))

        async def body() -> dict[str, Any]:
            if start:
                vm.state = "Running"
            return {"virtualmachine": self.inv.vm_view(vm)}

        return self._job("DeployVM", "VirtualMachine", vm.id, body, {"id": vm.id})

    async def _power(self, p: Params, command: str, to: str) -> dict[str, Any]:
        vm: VirtualMachine = self.inv.get(self.inv.vms, "vm", _need(p, "id", command))

        async def body() -> dict[str, Any]:
            if vm.state in ("Destroyed", "Expunging"):
                raise CloudStackError(PARAM_ERROR, f"VM {vm.name} is {vm.state}")
            if to == "Running" and not any(v.type == "ROOT" for v in self.inv.volumes_of(vm.id)):
                raise CloudStackError(INTERNAL_ERROR, f"Unable to start VM {vm.name}: it has no ROOT volume")
            vm.state = to
            return {"virtualmachine": self.inv.vm_view(vm)}

        return self._job(command, "VirtualMachine", vm.id, body)

    async def startVirtualMachine(self, p: Params) -> dict[str, Any]:
        return await self._power(p, "StartVM", "Running")

    async def stopVirtualMachine(self, p: Params) -> dict[str, Any]:
        return await self._power(p, "StopVM", "Stopped")

    async def destroyVirtualMachine(self, p: Params) -> dict[str, Any]:
        vm: VirtualMachine = self.inv.get(self.inv.vms, "vm", _need(p, "id", "destroyVirtualMachine"))
        expunge = p.get("expunge", "false").lower() == "true"

        async def body() -> dict[str, Any]:
            if vm.id == self.inv.appliance_vm_id:
                raise CloudStackError(INTERNAL_ERROR, "refusing to destroy the appliance (simulator rule)")
            vm.state = "Expunging" if expunge else "Destroyed"
            view = self.inv.vm_view(vm)
            for vol in self.inv.volumes_of(vm.id):
                if vol.type == "ROOT":
                    del self.inv.volumes[vol.id]
                    self.devices.forget_volume(vol.id)
                else:
                    vol.virtualmachineid, vol.deviceid = None, None  # data disks are detached, not deleted
            if expunge:
                del self.inv.vms[vm.id]
            return {"virtualmachine": view}

        return self._job("DestroyVM", "VirtualMachine", vm.id, body)
