"""CloudStack volumes for replication: create, attach to this appliance and wait for the device, detach, delete,
snapshot, revert — one operation at a time per volume, each recorded before it starts.

The order of each step is chosen so that a crash at any point leaves something reconciliation can resolve
(reconcile.py): the record (with the operation) is saved before CloudStack is asked; the job id is saved as
soon as CloudStack answers; the device is vouched for only once it is present, and vouching is withdrawn
before a detach is asked for, so nbd-pool never starts exporting a device that is going away.

A volume can also be detached or deleted in CloudStack directly, outside the appliance. So before a record's
`attached_here` is answered or relied on (reading a volume or the list, attach, the sync stamp, the device
list), its device is checked to still be there (the link resolves to the recorded major:minor: a stat, no
CloudStack call). When it is not, the record is corrected by start-up reconciliation's own per-record rules
(Reconciler.recheck): CloudStack has it detached → recorded as detached; gone → the record is dropped;
either way the device is no longer vouched for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from oma_common import schema
from oma_common.contracts.volume_agent_volumes import (
    CLOUDSTACK_ID,
    Deleted,
    DeviceView,
    DevicesListing,
    SnapshotDeleted,
    SnapshotView,
    StampView,
    VolumesListing,
    VolumeView,
    volume_name,
)
from oma_common.errors import Conflict, Invalid, NotFound, OmaError, TimedOut, Unavailable
from oma_common.statefile import Damaged, StateFile

from .adapters import stamp
from .adapters.cloudstack import CloudStack
from .adapters.devdir import DeviceDir
from .adapters.netif import mac_addresses
from .adapters.openers import use_of
from .records import REGISTRY_KIND, Operation, OpKind, VolumeRecord

log = logging.getLogger("volume_agent.volumes")

GIB = 1024**3


def check_id(value: str, what: str = "volume id") -> str:
    if not re.fullmatch(CLOUDSTACK_ID, value):
        raise Invalid(f"bad {what}", f"{value!r} is not a CloudStack id")
    return value


class Volumes:
    def __init__(self, cloud: CloudStack | None, devices: DeviceDir, store: StateFile, registry: StateFile, *,
                 appliance_vm_id: str = "", zone_id: str = "", disk_offering_id: str = "",
                 device_timeout: float = 120.0, clock: Callable[[], float] = time.time,
                 macs: Callable[[], set[str]] = mac_addresses) -> None:
        self.cloud_client = cloud
        self.devices = devices
        self.store = store
        self.registry = registry
        self.appliance_vm_id = appliance_vm_id
        self.zone_id = zone_id
        self.disk_offering_id = disk_offering_id
        self.device_timeout = device_timeout
        self.clock = clock
        self.macs = macs
        self.records: dict[str, VolumeRecord] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.ready = asyncio.Event()  # set once start-up reconciliation is done
        # Corrects one record by reconciliation's rules (set by the Reconciler); None → by its device alone.
        self.recheck: Callable[[VolumeRecord], Awaitable[None]] | None = None

    # -- plumbing --------------------------------------------------------------------------------------

    @property
    def cloud(self) -> CloudStack:
        if self.cloud_client is None:
            raise Unavailable("CloudStack not configured", "volume-agent has no [cloudstack] endpoint, api_key and "
                                                           "secret_key in its configuration")
        return self.cloud_client

    @contextlib.asynccontextmanager
    async def locked(self, key: str) -> AsyncIterator[None]:
        """One operation at a time per volume; callers queue (an attach waits for a running detach)."""
        try:
            await asyncio.wait_for(self.ready.wait(), 120)
        except asyncio.TimeoutError:
            raise Unavailable("volume-agent is starting", "start-up reconciliation is still running") from None
        async with self._locks.setdefault(key, asyncio.Lock()):
            yield

    def load(self) -> None:
        for d in self.store.load():
            rec = VolumeRecord.from_dict(d)
            self.records[rec.key] = rec
        log.info("%d volume records loaded", len(self.records))

    async def save(self) -> None:
        await self.store.save(lambda: [r.to_dict() for r in sorted(self.records.values(), key=lambda r: r.name)])

    async def save_registry(self) -> None:
        """Rewrite the vouched-devices registry from the records (the only writer)."""
        await self.registry.save(lambda: [schema.to_dict(v) for r in sorted(self.records.values(), key=lambda r: r.name)
                                          if (v := r.vouched()) is not None])

    async def begin(self, rec: VolumeRecord, kind: OpKind, **extra: Any) -> Operation:
        """Record the operation (and the volume, if it is new to us) before anything is asked of CloudStack."""
        rec.operation = Operation(kind, self.clock(), **extra)
        self.records[rec.key] = rec
        await self.save()
        return rec.operation

    async def end(self, rec: VolumeRecord) -> None:
        rec.operation = None
        await self.save()

    async def appliance(self) -> str:
        """This appliance's VM id: configured, or the VM one of whose NICs has one of our MAC addresses."""
        if self.appliance_vm_id:
            return self.appliance_vm_id
        ours = await asyncio.to_thread(self.macs)
        vms = await self.cloud.listing("listVirtualMachines", "virtualmachine", listall=True)
        for vm in vms:
            if any(str(nic.get("macaddress", "")).lower() in ours for nic in vm.get("nic", [])):
                self.appliance_vm_id = str(vm["id"])
                log.info("this appliance is CloudStack VM %s (%s), found by MAC", vm["id"], vm.get("name"))
                return self.appliance_vm_id
        raise Unavailable("this appliance's VM not found", f"no CloudStack VM has a NIC with one of this machine's "
                                                           f"MAC addresses ({', '.join(sorted(ours)) or 'none'}); "
                                                           f"set [cloudstack] appliance_vm_id")

    def _record(self, volume_id: str) -> VolumeRecord | None:
        return self.records.get(volume_id)

    def device_holds(self, rec: VolumeRecord) -> bool:
        """Whether a record's `attached_here` is still true to the device directory (not attached: nothing to
        check). A stat of the link's target; blocking, call it in a thread."""
        if not rec.attached_here:
            return True
        found = self.devices.find(rec.serial)
        return found is not None and found.rdev == rec.rdev

    async def _checked(self, volume_id: str) -> VolumeRecord | None:
        """The record, corrected first if it says attached here and its device is gone (under the volume's
        lock); None when there is no record (any more)."""
        rec = self._record(volume_id)
        if rec is None or await asyncio.to_thread(self.device_holds, rec):
            return rec
        log.warning("volume %s: recorded as attached here, but %s no longer leads to its device %s; checking "
                    "with CloudStack", volume_id, rec.link or self.devices.link(rec.serial), rec.rdev,
                    extra={"resource": volume_id})
        if self.recheck is not None:
            await self.recheck(rec)
        else:  # no reconciler (not the daemon): the device is gone, so is the vouching
            rec.mark_detached()
        await self.save()
        await self.save_registry()
        return self._record(volume_id)

    async def _fresh(self, volume_id: str) -> VolumeRecord | None:
        """For reading: the record as it is, or (its device gone) corrected once the volume's running
        operation, if any, is over (until start-up reconciliation is done, as it is: that corrects it)."""
        rec = self._record(volume_id)
        if rec is None or rec.operation is not None or not self.ready.is_set() \
                or await asyncio.to_thread(self.device_holds, rec):
            return rec
        async with self.locked(volume_id):
            return await self._checked(volume_id)

    async def _adopt(self, volume_id: str) -> tuple[VolumeRecord, dict[str, Any]]:
        """The record of a data volume CloudStack has; one this agent did not create gets a record when its
        first operation begins. The appliance's own disks are never taken: a ROOT volume is refused, and so is
        a volume attached to this appliance that this agent did not attach (it may hold this system's data)."""
        vol = await self.cloud.volume(volume_id)
        if vol is None:
            raise NotFound("volume not found", f"CloudStack has no volume {volume_id}")
        if vol.get("type") == "ROOT":
            raise Conflict("a ROOT volume", f"volume {volume_id} is the ROOT disk of "
                                            f"{vol.get('vmname') or 'a VM'}; volume-agent manages data volumes only")
        rec = self._record(volume_id)
        if rec is None:
            if vol.get("virtualmachineid") and vol.get("virtualmachineid") == await self.appliance():
                raise Conflict("attached here by someone else",
                               f"volume {volume_id} is attached to this appliance, but not by volume-agent; it is "
                               f"not taken over (it may hold this system's data)")
            rec = VolumeRecord(str(vol.get("name", "")), volume_id, int(vol.get("size", 0)))
            log.info("volume %s (%s): managed from now on", volume_id, rec.name, extra={"resource": volume_id})
        return rec, vol

    # -- create ----------------------------------------------------------------------------------------

    async def create(self, vm_name: str, disk_unit: int, size_bytes: int, disk_offering_id: str = "",
                     zone_id: str = "") -> VolumeView:
        name = volume_name(vm_name, disk_unit)
        async with self.locked(f"name:{name}"):
            known = next((r for r in self.records.values() if r.name == name), None)
            if known is not None:
                raise Conflict("volume exists", f"volume {name} exists already ({known.volume_id or 'being created'})",
                               volume_id=known.volume_id)
            existing = [v for v in await self.cloud.listing("listVolumes", "volume", name=name, listall=True)
                        if v.get("name") == name]
            if existing:
                raise Conflict("volume exists", f"CloudStack already has a volume named {name} "
                                                f"({existing[0].get('id')})", volume_id=existing[0].get("id"))
            size_gb = max(1, math.ceil(size_bytes / GIB))
            offering = disk_offering_id or self.disk_offering_id or await self._custom_offering()
            zone = zone_id or self.zone_id or str((await self.cloud.vm(await self.appliance())).get("zoneid", ""))
            rec = VolumeRecord(name, size_bytes=size_gb * GIB)
            op = await self.begin(rec, OpKind.CREATE)
            try:
                answer = await self.cloud.start("createVolume", name=name, zoneid=zone, diskofferingid=offering,
                                                size=size_gb)
            except OmaError:
                del self.records[rec.key]
                await self.save()
                raise
            del self.records[rec.key]
            rec.volume_id, op.jobid = str(answer["id"]), str(answer["jobid"])
            self.records[rec.key] = rec
            await self.save()
            log.info("volume %s (%s, %d GiB): creating", rec.volume_id, name, size_gb, extra={"resource": rec.volume_id})
            try:
                await self.cloud.wait("createVolume", op.jobid)
            except TimedOut:
                await self.end(rec)  # CloudStack has the volume and is still making it: keep the record
                raise
            except OmaError as e:
                log.warning("volume %s: CloudStack failed to create it: %s", rec.volume_id, e.details)
                with contextlib.suppress(OmaError):
                    await self.cloud.call("deleteVolume", id=rec.volume_id)
                del self.records[rec.key]
                await self.save()
                raise
            await self.end(rec)
            log.info("volume %s (%s): created", rec.volume_id, name, extra={"resource": rec.volume_id})
            return rec.view()

    async def _custom_offering(self) -> str:
        offerings = await self.cloud.listing("listDiskOfferings", "diskoffering")
        found = next((o for o in offerings if o.get("iscustomized")), None)
        if found is None:
            raise Unavailable("no disk offering", "CloudStack lists no disk offering with a custom size; configure "
                                                  "[cloudstack] disk_offering_id")
        return str(found["id"])

    # -- attach / detach -------------------------------------------------------------------------------

    async def attach(self, volume_id: str) -> VolumeView:
        check_id(volume_id)
        async with self.locked(volume_id):
            await self._checked(volume_id)
            rec, vol = await self._adopt(volume_id)
            await self._attach_locked(rec, vol)
            return rec.view()

    async def _attach_locked(self, rec: VolumeRecord, vol: dict[str, Any], within: Operation | None = None) -> None:
        """Attach (unless CloudStack has it attached here already) and wait for the device; as part of `within`
        (revert) or as an operation of its own."""
        appliance = await self.appliance()
        on = vol.get("virtualmachineid")
        if on and on != appliance:
            raise Conflict("volume attached elsewhere", f"volume {rec.volume_id} is attached to VM "
                                                        f"{vol.get('vmname') or on}")
        op = within or await self.begin(rec, OpKind.ATTACH)
        try:
            if not on:
                answer = await self.cloud.start("attachVolume", id=rec.volume_id, virtualmachineid=appliance)
                op.jobid = str(answer["jobid"])
                await self.save()
                await self.cloud.wait("attachVolume", op.jobid)
                log.info("volume %s: attached to this appliance in CloudStack; waiting for virtio-%s", rec.volume_id,
                         rec.serial, extra={"resource": rec.volume_id})
            device = await self.devices.wait_present(rec.serial, self.device_timeout)
            if device is None:
                log.warning("volume %s: no device virtio-%s within %g s; detaching it again", rec.volume_id,
                            rec.serial, self.device_timeout, extra={"resource": rec.volume_id})
                with contextlib.suppress(OmaError):
                    await self.cloud.run("detachVolume", id=rec.volume_id)
                raise TimedOut("the volume's device did not appear",
                               f"CloudStack attached volume {rec.volume_id} to this appliance but "
                               f"{self.devices.link(rec.serial)} did not appear within {self.device_timeout:g} s; "
                               f"the volume was detached again")
            rec.mark_attached(str(device.link), str(device.path), device.rdev)
            await self.save()
            await self.save_registry()
            log.info("volume %s: attached as %s (%s)", rec.volume_id, device.path, device.link,
                     extra={"resource": rec.volume_id})
        finally:
            if within is None:
                await self.end(rec)

    async def detach(self, volume_id: str) -> VolumeView:
        check_id(volume_id)
        async with self.locked(volume_id):
            rec, vol = await self._adopt(volume_id)
            await self._detach_locked(rec, vol)
            return rec.view()

    async def _detach_locked(self, rec: VolumeRecord, vol: dict[str, Any], within: Operation | None = None) -> None:
        appliance = await self.appliance()
        on = vol.get("virtualmachineid")
        if on and on != appliance:
            raise Conflict("volume attached elsewhere", f"volume {rec.volume_id} is attached to VM "
                                                        f"{vol.get('vmname') or on}, not to this appliance")
        op = within or await self.begin(rec, OpKind.DETACH)
        was_vouched = rec.attached_here
        try:
            rec.attached_here = False  # withdraw vouching first: nbd-pool starts no export on it from now on
            await self.save()
            if was_vouched:
                await self.save_registry()
            use = await asyncio.to_thread(use_of, Path(rec.device)) if rec.device and Path(rec.device).exists() \
                else None
            if use is not None and use.in_use:  # pulling it from under a writer would lose what it writes
                raise Conflict("volume in use", f"{rec.device} (volume {rec.volume_id}) is open by "
                                                f"{use.describe()}; stop its exports before detaching it")
            if on:
                answer = await self.cloud.start("detachVolume", id=rec.volume_id)
                op.jobid = str(answer["jobid"])
                await self.save()
                await self.cloud.wait("detachVolume", op.jobid)
                if not await self.devices.wait_gone(rec.serial, self.device_timeout):
                    log.warning("volume %s: detached in CloudStack, but %s is still there", rec.volume_id,
                                self.devices.link(rec.serial), extra={"resource": rec.volume_id})
            rec.mark_detached()
            await self.save()
            log.info("volume %s: detached", rec.volume_id, extra={"resource": rec.volume_id})
        except OmaError:
            # CloudStack kept it attached: vouch again if the device is still the one we knew.
            device = await asyncio.to_thread(self.devices.find, rec.serial)
            if was_vouched and device is not None and device.rdev == rec.rdev:
                rec.attached_here = True
                await self.save()
                await self.save_registry()
            raise
        finally:
            if within is None:
                await self.end(rec)

    # -- delete ----------------------------------------------------------------------------------------

    async def delete(self, volume_id: str) -> Deleted:
        check_id(volume_id)
        async with self.locked(volume_id):
            rec = self._record(volume_id)
            vol = await self.cloud.volume(volume_id)
            if vol is None:
                if rec is not None:
                    del self.records[rec.key]
                    await self.save()
                return Deleted(volume_id=volume_id, deleted=False, message="CloudStack has no such volume")
            if vol.get("virtualmachineid"):
                raise Conflict("volume attached", f"volume {volume_id} is attached to "
                                                  f"{vol.get('vmname') or vol['virtualmachineid']}; detach it first")
            if rec is None:
                rec = VolumeRecord(str(vol.get("name", "")), volume_id, int(vol.get("size", 0)))
            await self.begin(rec, OpKind.DELETE)
            try:
                await self.cloud.call("deleteVolume", id=volume_id)
            except OmaError:
                await self.end(rec)
                raise
            del self.records[rec.key]
            await self.save()
            log.info("volume %s (%s): deleted", volume_id, rec.name, extra={"resource": volume_id})
            return Deleted(volume_id=volume_id, deleted=True, message=f"deleted {rec.name}")

    # -- snapshots -------------------------------------------------------------------------------------

    async def snapshot(self, volume_id: str, name: str = "") -> SnapshotView:
        check_id(volume_id)
        async with self.locked(volume_id):
            rec, _ = await self._adopt(volume_id)
            op = await self.begin(rec, OpKind.SNAPSHOT)
            try:
                answer = await self.cloud.start("createSnapshot", volumeid=volume_id, name=name or None)
                op.snapshot_id, op.jobid = str(answer.get("id", "")), str(answer["jobid"])
                await self.save()
                result = (await self.cloud.wait("createSnapshot", op.jobid)).get("snapshot", {})
                snap_id = str(result.get("id") or op.snapshot_id)
                if snap_id not in rec.snapshots:
                    rec.snapshots.append(snap_id)
                log.info("volume %s: snapshot %s taken", volume_id, snap_id, extra={"resource": volume_id})
                return snapshot_view(result, volume_id)
            finally:
                await self.end(rec)

    async def revert(self, volume_id: str, snapshot_id: str) -> VolumeView:
        """Revert to a snapshot; CloudStack wants the volume detached, so one attached here is detached first
        and attached again afterwards (its device may change)."""
        check_id(volume_id)
        check_id(snapshot_id, "snapshot id")
        async with self.locked(volume_id):
            rec, vol = await self._adopt(volume_id)
            snap = await self.cloud.snapshot(snapshot_id)
            if snap is None or snap.get("volumeid") != volume_id:
                raise NotFound("snapshot not found", f"volume {volume_id} has no snapshot {snapshot_id}")
            appliance = await self.appliance()
            reattach = vol.get("virtualmachineid") == appliance
            op = await self.begin(rec, OpKind.REVERT, snapshot_id=snapshot_id, reattach=reattach)
            try:
                if reattach:
                    await self._detach_locked(rec, vol, within=op)
                await self.cloud.run("revertSnapshot", id=snapshot_id)
                log.info("volume %s: reverted to snapshot %s", volume_id, snapshot_id, extra={"resource": volume_id})
                if reattach:
                    await self._attach_locked(rec, {**vol, "virtualmachineid": None}, within=op)
            finally:
                await self.end(rec)
            return rec.view()

    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> SnapshotDeleted:
        check_id(volume_id)
        check_id(snapshot_id, "snapshot id")
        async with self.locked(volume_id):
            rec, _ = await self._adopt(volume_id)
            snap = await self.cloud.snapshot(snapshot_id)
            if snap is not None and snap.get("volumeid") != volume_id:
                raise NotFound("snapshot not found", f"volume {volume_id} has no snapshot {snapshot_id}")
            if snap is not None:
                await self.begin(rec, OpKind.DELETE_SNAPSHOT, snapshot_id=snapshot_id)
                try:
                    await self.cloud.run("deleteSnapshot", id=snapshot_id)
                finally:
                    await self.end(rec)
            if snapshot_id in rec.snapshots:
                rec.snapshots.remove(snapshot_id)
                await self.save()
            return SnapshotDeleted(volume_id, snapshot_id, snap is not None)

    # -- the sync stamp (adapters/stamp.py) -----------------------------------------------------------

    def _attached_device(self, rec: VolumeRecord | None, volume_id: str) -> tuple[str, str]:
        """(path, rdev) of a volume attached here, checked to be the one vouched for right now."""
        if rec is None:
            raise NotFound("volume not managed here", f"volume-agent manages no volume {volume_id}")
        found = self.devices.find(rec.serial) if rec.attached_here else None
        if found is None or found.rdev != rec.rdev:
            raise Conflict("volume not attached here", f"volume {volume_id} has no device attached here "
                                                       "(attach it first)")
        return str(found.path), found.rdev

    async def read_stamp(self, volume_id: str) -> StampView:
        check_id(volume_id)
        async with self.locked(volume_id):
            device, rdev = self._attached_device(await self._checked(volume_id), volume_id)
            try:
                found, offset = await asyncio.to_thread(stamp.read, device, rdev)
            except stamp.DeviceChanged as e:
                raise Conflict("device changed", f"volume {volume_id}: {e}; try again") from e
            except OSError as e:
                raise Unavailable("cannot read the volume", f"reading the stamp of {volume_id} on {device}: {e}") from e
            return StampView(volume_id=volume_id, stamp=found, offset=offset)

    async def write_stamp(self, volume_id: str, value: str) -> StampView:
        check_id(volume_id)
        async with self.locked(volume_id):
            device, rdev = self._attached_device(await self._checked(volume_id), volume_id)
            try:
                offset = await asyncio.to_thread(stamp.write, device, value, rdev)
            except stamp.DeviceChanged as e:
                raise Conflict("device changed", f"volume {volume_id}: {e}; try again") from e
            except OSError as e:
                raise Unavailable("cannot write the volume", f"writing the stamp of {volume_id} on {device}: {e}") from e
            log.info("volume %s: sync stamp %s written at %d", volume_id, value, offset, extra={"resource": volume_id})
            return StampView(volume_id=volume_id, stamp=value, offset=offset)

    # -- reading ---------------------------------------------------------------------------------------

    async def view(self, volume_id: str) -> VolumeView:
        rec = await self._fresh(check_id(volume_id))
        if rec is None:
            raise NotFound("volume not managed here", f"volume-agent manages no volume {volume_id}")
        return rec.view()

    async def listing(self) -> VolumesListing:
        await self._refresh_all()
        views = [r.view() for r in sorted(self.records.values(), key=lambda r: r.name)]
        unmanaged: list[str] = []
        if self.cloud_client is not None and self.appliance_vm_id:
            with contextlib.suppress(OmaError):
                attached = await self.cloud.listing("listVolumes", "volume", virtualmachineid=self.appliance_vm_id,
                                                    type="DATADISK")
                unmanaged = [str(v["id"]) for v in attached if v["id"] not in self.records]
        return VolumesListing(volumes=views, unmanaged_attached=unmanaged)

    async def _refresh_all(self) -> None:
        for key in [k for k, r in self.records.items() if r.attached_here and r.volume_id]:
            await self._fresh(key)

    async def checked_vouched(self) -> DevicesListing:
        """The devices attached here, each checked to be there still."""
        await self._refresh_all()
        return self.vouched()

    def vouched(self) -> DevicesListing:
        devices: list[DeviceView] = [v for r in sorted(self.records.values(), key=lambda r: r.name)
                                     if (v := r.vouched()) is not None]
        return DevicesListing(devices=devices)


def snapshot_view(snap: dict[str, Any], volume_id: str) -> SnapshotView:
    return SnapshotView(snapshot_id=str(snap.get("id", "")), volume_id=str(snap.get("volumeid", volume_id)),
                        name=str(snap.get("name", "")), state=str(snap.get("state", "")),
                        created=str(snap.get("created", "")))


def registry_file(path: Path) -> StateFile:
    return StateFile(path, REGISTRY_KIND, damaged=Damaged.REFUSE)  # written here, read by nbd-pool only
