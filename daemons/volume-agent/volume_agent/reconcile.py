"""Start-up: make volume-agent's records agree with CloudStack and with the device directory, resolving what a
crash or a stop left half-done, one log line per decision.

CloudStack is the truth about existence and attachment; the device directory about devices. Per record:
- an interrupted create: the volume is looked up by name; found → kept, not found → forgotten;
- a recorded CloudStack job still running is awaited first (bounded);
- the volume is gone → the record is dropped (and its device, if any, is no longer vouched for);
- attached to this appliance: its device is looked for (a short grace for one still appearing); present →
  vouched for; absent → detached in CloudStack, so a later attach starts clean;
- not attached here → recorded as detached, nothing vouched (a device whose volume is gone or detached
  is left to udev, and never exported);
- an interrupted revert is not redone: the volume is left as CloudStack has it, and the log says so;
- snapshots are those CloudStack lists for the volume.
Without CloudStack (not configured, unreachable) a record keeps its device only if the link still leads to
the same device number; the registry is rewritten in every case.

While running, the same per-record rules correct one record whose device went away (`recheck`, which
Volumes calls when a volume attached here no longer has its device: detached or deleted in CloudStack
directly, outside the appliance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from oma_common.errors import OmaError

from .records import OpKind, VolumeRecord
from .volumes import Volumes

log = logging.getLogger("volume_agent.reconcile")


class Reconciler:
    def __init__(self, volumes: Volumes, *, device_grace: float = 15.0, job_grace: float = 30.0) -> None:
        self.volumes = volumes
        self.device_grace = device_grace
        self.job_grace = job_grace
        self.counts: dict[str, int] = {}
        volumes.recheck = self.recheck

    def _note(self, what: str, rec: VolumeRecord, message: str, *args: Any, warn: bool = True) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        rid = rec.volume_id or rec.name
        (log.warning if warn else log.info)("volume %s: " + message, rid, *args, extra={"resource": rid})

    async def startup(self) -> str:
        v = self.volumes
        try:
            if v.cloud_client is None:
                await self._offline("CloudStack is not configured")
            else:
                try:
                    await v.appliance()
                    for rec in list(v.records.values()):
                        await self._one(rec)
                except OmaError as e:
                    log.error("cannot reconcile with CloudStack (%s: %s); checking devices only", e.message, e.details)
                    await self._offline("CloudStack unreachable")
            await v.save()
            await v.save_registry()
        finally:
            v.ready.set()
        vouched = len(v.vouched().devices)
        done = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()))
        return f"{len(v.records)} volumes, {vouched} attached here" + (f"; resolved: {done}" if done else "")

    async def recheck(self, rec: VolumeRecord) -> None:
        """While running (under the volume's lock): one record, by the start-up rules; CloudStack unreachable →
        by its device alone. The caller saves the records and the registry."""
        if self.volumes.cloud_client is None:
            await self._offline_one(rec, "CloudStack is not configured")
            return
        try:
            await self.volumes.appliance()
            await self._one(rec)
        except OmaError as e:
            log.error("volume %s: cannot check it with CloudStack (%s: %s); checking its device only",
                      rec.volume_id, e.message, e.details, extra={"resource": rec.volume_id})
            await self._offline_one(rec, "CloudStack unreachable")

    async def _offline(self, why: str) -> None:
        for rec in self.volumes.records.values():
            await self._offline_one(rec, why)

    async def _offline_one(self, rec: VolumeRecord, why: str) -> None:
        rec.operation = None
        if not await asyncio.to_thread(self.volumes.device_holds, rec):  # attached here, and its device gone
            rec.mark_detached()
            self._note("devices gone", rec, "%s and its device is gone: no longer vouched for", why)

    async def _one(self, rec: VolumeRecord) -> None:
        v = self.volumes
        op = rec.operation
        if op is not None and op.kind is OpKind.CREATE and not rec.volume_id:
            await self._finish_create(rec)
            return
        if op is not None and op.jobid:
            with contextlib.suppress(OmaError):
                await v.cloud.wait(op.kind.value, op.jobid, timeout=self.job_grace)
        vol = await v.cloud.volume(rec.volume_id)
        if vol is None:
            del v.records[rec.key]
            self._note("volumes gone", rec, "CloudStack has no such volume any more (%s); record dropped%s",
                       f"interrupted {op.kind.value}" if op else "deleted elsewhere",
                       ", its device no longer vouched for" if rec.attached_here else "",
                       warn=not (op and op.kind is OpKind.DELETE))
            return
        appliance = await v.appliance()
        if vol.get("virtualmachineid") == appliance:
            await self._attached_here(rec)
        else:
            if rec.attached_here or (op and op.kind in (OpKind.ATTACH, OpKind.DETACH)):
                self._note("detached", rec, "CloudStack has it %s; recorded as detached%s",
                           f"attached to {vol.get('vmname')}" if vol.get("virtualmachineid") else "detached",
                           f" (interrupted {op.kind.value})" if op else "")
            rec.mark_detached()
        if op is not None and op.kind is OpKind.REVERT:
            self._note("reverts interrupted", rec, "a revert to snapshot %s was interrupted; whether it happened is "
                       "unknown: revert again", op.snapshot_id)
        with contextlib.suppress(OmaError):
            snaps = await v.cloud.listing("listSnapshots", "snapshot", volumeid=rec.volume_id)
            rec.snapshots = [str(s["id"]) for s in snaps]
        rec.operation = None

    async def _attached_here(self, rec: VolumeRecord) -> None:
        v = self.volumes
        device = await v.devices.wait_present(rec.serial, self.device_grace)
        if device is not None:
            if not rec.attached_here or rec.rdev != device.rdev:
                self._note("devices found", rec, "attached here as %s%s", device.path,
                           f" (interrupted {rec.operation.kind.value})" if rec.operation else "", warn=False)
            rec.mark_attached(str(device.link), str(device.path), device.rdev)
            return
        self._note("attached without device", rec, "CloudStack has it attached here but %s did not appear within "
                   "%g s; detaching it in CloudStack", v.devices.link(rec.serial), self.device_grace)
        rec.mark_detached()
        try:
            await v.cloud.run("detachVolume", id=rec.volume_id)
        except OmaError as e:
            log.error("volume %s: detach failed: %s", rec.volume_id, e.details, extra={"resource": rec.volume_id})

    async def _finish_create(self, rec: VolumeRecord) -> None:
        v = self.volumes
        del v.records[rec.key]
        found = [x for x in await v.cloud.listing("listVolumes", "volume", name=rec.name, listall=True)
                 if x.get("name") == rec.name]
        if not found:
            self._note("creates undone", rec, "an interrupted create left no volume in CloudStack; forgotten")
            return
        rec.volume_id = str(found[0]["id"])
        rec.size_bytes = int(found[0].get("size", rec.size_bytes))
        rec.operation = None
        v.records[rec.key] = rec
        self._note("creates completed", rec, "an interrupted create: CloudStack has the volume (%s); kept",
                   found[0].get("state"))
