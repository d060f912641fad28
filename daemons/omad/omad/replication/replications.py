"""Replications: start one (volumes, exports, the VMA's start), read, change and remove them.

Starting a sync (every step recorded on its job):
  1. rows first, in one transaction: the replication, one row per disk, the job; the context becomes
     `replicating` and counts the job. A second active replication of the VM is refused (409).
  2. volumes: each disk's CloudStack volume (`migration-<vm>-disk-<unit>`, `<vm>` as volume_vm_name gives it;
     capacity + headroom) is created and attached here through volume-agent the first time, reused afterwards
     (by its recorded id). A create is recorded before it is asked for, until the volume is: the next sync
     takes a volume whose create omad did not live to record.
     A disk whose volume is gone or was changed behind our back is given a new one and starts over with no
     change id (a full copy); so does a disk whose volume no longer holds the stamp the last completed sync
     wrote at its end (reverted outside the appliance to an older snapshot).
  3. ports: one per disk from nbd-pool, leased to the job;
  4. exports: a writable export of each volume's device (`--shared`, the VMA opens 2 connections per disk),
     the disks' exports started at once;
  5. the VMA's `POST /replicate` with the `nbd_targets`.
Any failure fails the job and undoes what it started (exports, ports); volumes stay. The running job is then
followed by the Monitor (monitor.py) until the VMA reports success or failure, or goes silent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Any

from oma_common.contracts.volume_agent_volumes import VolumeView, volume_name
from oma_common.errors import Conflict, Invalid, NotFound, OmaError, TimedOut, Unavailable
from oma_common.together import every

from ..audit import Audit
from ..backup.backups import safe_name
from ..clients.nbdpool import NbdPool
from ..clients.vma import VmaClient
from ..clients.volume_agent import VolumeAgent
from ..config import ReplicationConfig
from ..inventory.contexts import Contexts
from ..inventory.credentials import Credentials
from ..inventory.vmspec import VmSpec
from ..jobs import ids
from ..jobs.crashpoint import crash_if_named
from ..jobs.engine import JobEngine
from ..jobs.locks import KeyedLocks
from ..jobs.starting import undone_on_failure, vma_started
from ..store import contexts as contexts_store
from ..store import replications as store
from ..store.contexts import ContextStatus
from ..store.db import Database, utcnow
from .ending import NEVER_TAKEN, VMA_STEP, Ending, vma_took
from .volume_creates import made_under, remove_volume

log = logging.getLogger(__name__)

GIB = 1024**3


def volume_vm_name(vm_name: str) -> str:
    """The VM name as volume-agent's volume names take it (letters, digits, . _ -, starting alphanumeric). A name
    already so, of at most 100 characters, is taken as it is; any other is reduced to that and told apart by
    `-` and the first 8 hex digits of its full name's sha256, so that VMs whose names reduce to the same text
    (`app 01`, `app-01`; names sharing their first 100 characters) do not ask for the same volume names. At
    most 111 characters: volume-agent takes 128, CloudStack names of 255."""
    name = safe_name(vm_name, 100)
    name = name if re.match(r"[A-Za-z0-9]", name) else "vm" + name
    if name == vm_name:
        return name
    # surrogatepass: a name from JSON may hold a lone surrogate, which strict UTF-8 refuses to encode.
    return f"{name}-{hashlib.sha256(vm_name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def disk_key(disk_id: str) -> int:
    digits = disk_id.removeprefix("disk-")
    if not digits.isdigit():
        raise Invalid("bad disk id", f"disk id {disk_id!r} is not disk-<VMware key>")
    return int(digits)


@dataclasses.dataclass
class StartRequest:
    source_vm: VmSpec
    ossea_config_id: int
    replication_type: str | None = None
    vcenter_host: str | None = None
    datacenter: str | None = None
    start_replication: bool = True
    schedule_execution_id: str | None = None
    vm_group_id: str | None = None
    scheduled_by: str | None = None
    target_network: str = ""


class Replications:
    def __init__(self, db: Database, audit: Audit, jobs: JobEngine, locks: KeyedLocks, contexts: Contexts,
                 credentials: Credentials, volumes: VolumeAgent, pool: NbdPool, vma: VmaClient, ending: Ending,
                 cfg: ReplicationConfig, crash_file: str = "") -> None:
        self.db = db
        self.crash_file = Path(crash_file) if crash_file else None  # fault injection (jobs/crashpoint.py)
        self.audit = audit
        self.jobs = jobs
        self.locks = locks
        self.contexts = contexts
        self.credentials = credentials
        self.volumes = volumes
        self.pool = pool
        self.vma = vma
        self.ending = ending
        self.cfg = cfg
        self.oma_url = cfg.oma_url  # main() sets the API's own URL when the config leaves it empty
        self.on_started: list[Any] = []  # callbacks(job_id): the monitor follows each started job
        self._launching: set[str] = set()  # recorded by this omad, the VMA not yet asked (or answering)

    def launching(self, job_id: str) -> bool:
        """Whether this omad is starting that replication now: its rows are in, the VMA has not taken it yet."""
        return job_id in self._launching

    async def abandon_unstarted(self, job_id: str) -> bool:
        """Fail a running replication whose start a dead omad cut short — no omad is starting it and the VMA
        does not know it — releasing its exports and ports; True when it was (or had meanwhile been) ended.
        False when it lives (the VMA has it) or cannot be told (the VMA does not answer)."""
        if self.launching(job_id):
            return False
        try:
            await self.vma.progress(job_id)
        except NotFound:
            await self.ending.fail(job_id, NEVER_TAKEN if not await vma_took(self.db, job_id) else
                                   "the VMA does not know the job (it restarted, or the job was lost)")
            return True
        except OmaError:
            return False
        return False

    # -- starting ------------------------------------------------------------------------------------

    async def start(self, req: StartRequest, *, actor: str) -> dict[str, Any]:
        """Create the context (start_replication=false) or start a sync; a client that hangs up does not
        interrupt it half way."""
        task = asyncio.ensure_future(self._start(req, actor))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def _context(self, req: StartRequest, *, create_only: bool) -> contexts_store.Context:
        vm = req.source_vm
        found = await contexts_store.by_vmware_id(self.db, vm.id)
        if found is None:
            try:
                found = await contexts_store.by_name(self.db, vm.name)
            except NotFound:
                found = None
        if found is not None:
            if create_only:
                raise Conflict("context exists", f"VM {vm.name!r} already has a context ({found.context_id})",
                               context_id=found.context_id)
            return found
        if not vm.disks:
            raise Invalid("VM has no disks", f"source_vm {vm.name!r} lists no disks")
        ids_seen = [d.id for d in vm.disks]
        if len(set(ids_seen)) != len(ids_seen):
            raise Invalid("duplicate disk ids", f"source_vm {vm.name!r} lists a disk id twice: {sorted(ids_seen)}")
        async with self.db.transaction() as tx:
            cid = await self.contexts.create(tx, vm, vcenter_host=req.vcenter_host or "",
                                             datacenter=req.datacenter or vm.datacenter, credential_id=None,
                                             auto_added=False)
        return await contexts_store.by_id(self.db, cid)

    async def _start(self, req: StartRequest, actor: str) -> dict[str, Any]:
        ctx = await self._context(req, create_only=not req.start_replication)
        if not req.start_replication:
            await self.audit.record(actor, "replication.context", f"context:{ctx.context_id}", vm_name=ctx.vm_name)
            return {"context_id": ctx.context_id, "vm_name": ctx.vm_name, "vmware_vm_id": ctx.vmware_vm_id,
                    "current_status": str(ctx.current_status), "message": "VM context created",
                    "created_at": ctx.created_at}
        async with self.locks.hold(f"vm-replication:{ctx.context_id}", what=f"VM {ctx.vm_name!r}"):
            job_id = await self._record(req, ctx, actor)
            try:
                async with undone_on_failure(job_id, kind="replication", id_key="job_id", fail=self.ending.fail,
                                             audit=self.audit, actor=actor, action="replication.start",
                                             resource=f"job:{job_id}", vm_name=ctx.vm_name):
                    created = await self._launch(job_id, ctx)
            finally:
                self._launching.discard(job_id)
        await self.audit.record(actor, "replication.start", f"job:{job_id}", vm_name=ctx.vm_name)
        for callback in self.on_started:
            callback(job_id)
        rep = await store.get(self.db, job_id)
        return {"job_id": job_id, "status": "replicating", "progress_percent": rep.progress_percent,
                "source_vm": self._source(rep, ctx), "created_volumes": created["created"],
                "mounted_volumes": created["mounted"], "started_at": rep.started_at,
                "replication_type": rep.replication_type,
                "message": f"{rep.replication_type} replication of {ctx.vm_name} started"}

    async def _record(self, req: StartRequest, ctx: contexts_store.Context, actor: str) -> str:
        """Step 1: the rows, checked and written in one transaction."""
        cid = ctx.context_id
        disks = sorted(await contexts_store.disks_of(self.db, cid), key=lambda d: disk_key(d.disk_id))
        if not disks:
            raise Invalid("VM has no disks", f"no disks are recorded for VM {ctx.vm_name!r}; discover it again")
        volumes = await store.volumes_of(self.db, cid)
        continuable = all(d.disk_change_id and d.disk_id in volumes for d in disks)
        rtype = req.replication_type or ("incremental" if continuable else "initial")
        job_id = ids.job_id()
        now = utcnow()
        new_disks = []
        for d in disks:
            capacity = d.capacity_bytes or d.size_gb * GIB
            if capacity <= 0:
                raise Invalid("disk size unknown", f"{d.disk_id} of VM {ctx.vm_name!r} has no recorded capacity")
            base = (d.disk_change_id or "") if rtype == "incremental" else ""
            new_disks.append(store.NewDisk(d.disk_id, disk_key(d.disk_id), d.unit_number
                                           if d.unit_number is not None else disk_key(d.disk_id) - 2000,
                                           capacity, f"{job_id}-{d.disk_id}", base))
        # Marked before its rows exist: the monitor, adopting the running replications a dead omad left, must
        # not take this one for one of them (it would ask the VMA about it before the VMA is told).
        self._launching.add(job_id)
        try:
            await self._record_rows(req, ctx, actor, job_id, rtype, disks, new_disks, now)
        except BaseException:
            self._launching.discard(job_id)
            raise
        log.info("%s replication of %s: %d disk(s)", rtype, ctx.vm_name, len(disks), extra={"resource": job_id})
        return job_id

    async def _record_rows(self, req: StartRequest, ctx: contexts_store.Context, actor: str, job_id: str,
                           rtype: str, disks: list[contexts_store.Disk], new_disks: list[store.NewDisk],
                           now: str) -> None:
        cid = ctx.context_id
        async with self.db.transaction() as tx:
            active = await store.active_for_vm(tx, cid)
            if active is not None:
                raise Conflict("replication running", f"VM {ctx.vm_name!r} has a replication running "
                                                       f"({active.job_id}); wait for it to end", job_id=active.job_id)
            await self.jobs.create("replication", job_id=job_id, context_id=cid, tx=tx,
                                   display_name=f"{rtype} replication of {ctx.vm_name}",
                                   details={"disks": len(disks), "ossea_config_id": req.ossea_config_id})
            await store.create(tx, store.NewReplication(
                job_id=job_id, vm_context_id=cid, vm_name=ctx.vm_name, vm_path=ctx.vm_path, replication_type=rtype,
                ossea_config_id=req.ossea_config_id, target_network=req.target_network,
                schedule_execution_id=req.schedule_execution_id, vm_group_id=req.vm_group_id,
                scheduled_by=req.scheduled_by, created_by=actor), new_disks, now)
            if rtype == "initial":
                # A full copy was asked for: the VMA must not be offered the old ids either.
                for d in disks:
                    await contexts_store.set_change_id(tx, cid, d.disk_id, None, now)
            await contexts_store.job_started(tx, cid, job_id, now, status=ContextStatus.REPLICATING)

    async def _volume_for(self, job_id: str, ctx: contexts_store.Context, disk: store.ReplicationDisk,
                          known: store.Volume | None) -> tuple[VolumeView, bool]:
        """The disk's volume, attached here; True when it is new (so its disk starts over)."""
        size = disk.capacity_bytes + self.cfg.volume_headroom_bytes
        view: VolumeView | None = None
        if known is not None:
            try:
                view = await self.volumes.volume(known.volume_id)
            except NotFound:
                log.warning("volume %s of %s is gone; creating a new one", known.volume_id, disk.disk_id,
                            extra={"resource": job_id})
            if view is not None and view.size_bytes != known.size_bytes:
                raise Conflict("volume changed", f"the volume {known.volume_id} of {disk.disk_id} is "
                                                 f"{view.size_bytes} bytes, not the {known.size_bytes} "
                                                 "recorded; it was changed outside the appliance")
            if view is not None and view.size_bytes < size:
                raise Invalid("disk outgrew its volume", f"{disk.disk_id} now needs {size} bytes and its volume "
                                                         f"{known.volume_id} has {view.size_bytes}")
        fresh = view is None
        if view is None:
            view = await self._new_volume(job_id, ctx, disk, size)
        if not view.attached_here:
            try:
                view = await self.volumes.attach_volume(view.volume_id)
            except NotFound:
                # Deleted in CloudStack directly while volume-agent had it detached (its record does not notice):
                # the delete makes volume-agent forget it, then the disk gets a new one.
                log.warning("volume %s of %s is gone from CloudStack; creating a new one", view.volume_id,
                            disk.disk_id, extra={"resource": job_id})
                await self.volumes.delete_volume(view.volume_id)
                fresh = True
                view = await self.volumes.attach_volume((await self._new_volume(job_id, ctx, disk, size)).volume_id)
        if not view.link_path:
            raise Unavailable("volume has no device", f"volume-agent attached {view.volume_id} without a device")
        return view, fresh

    async def _new_volume(self, job_id: str, ctx: contexts_store.Context, disk: store.ReplicationDisk,
                          size: int) -> VolumeView:
        """A new volume for the disk. What is asked of volume-agent is recorded first (replication_volume_creates:
        this name, for this disk, by this job) and dropped only with the volume's own record (`_launch`), so an
        omad that dies in between has left a trace: the disk's next sync takes the volume that create made — it
        holds nothing trustworthy, the disk starts over — rather than ask for the name again, which volume-agent
        refuses (409 volume exists) for as long as the volume lives, or leave it unaccounted for."""
        cid, vm = ctx.context_id, volume_vm_name(ctx.vm_name)
        pending = await store.volume_create_of(self.db, cid, disk.disk_id)
        if pending is not None:
            made = await self._made_for(job_id, pending)
            if made is not None and await store.volume_recorded(self.db, made.volume_id):
                # Another VM whose volume names are the same (one named literally `app-01-a22b2178`, as `app 01`'s
                # volumes are; or a row recorded before names were told apart) owns that name's volume.
                log.warning("%s: volume %s (%s) is recorded for another disk; not taken", disk.disk_id,
                            made.volume_id, made.name, extra={"resource": job_id})
                made = None
            if made is not None and made.size_bytes >= size:
                log.warning("%s: taking volume %s (%s), created by %s, which omad did not live to record", disk.disk_id,
                            made.volume_id, made.name, pending.job_id, extra={"resource": job_id})
                return made
            if made is not None:  # the disk grew since: that volume is of no use, and holds nothing
                log.warning("%s: volume %s (%s), created by %s which omad did not live to record, is too small now "
                            "(%d < %d bytes); replacing it", disk.disk_id, made.volume_id, made.name, pending.job_id,
                            made.size_bytes, size, extra={"resource": job_id})
                await remove_volume(self.volumes, made)
        async with self.db.transaction() as tx:
            await store.intend_volume(tx, store.VolumeCreate(cid, disk.disk_id, volume_name(vm, disk.unit_number),
                                                             job_id, size, utcnow()))
        # `replication:volume-create`: dying here leaves the intent and no volume: the next sync creates it.
        crash_if_named(self.crash_file, "replication:volume-create", job_id)
        try:
            view = await self.volumes.create_volume(vm, disk.unit_number, size)
        except Conflict:
            # Refused (the name exists: another VM's whose volume names are the same): this create made nothing,
            # and the row must not make the next sync take that other volume.
            async with self.db.transaction() as tx:
                await store.drop_volume_create(tx, cid, disk.disk_id)
            raise
        # `replication:volume-attach`: dying here leaves a volume not attached anywhere, recorded only as intended.
        crash_if_named(self.crash_file, "replication:volume-attach", job_id)
        return view

    async def _made_for(self, job_id: str, pending: store.VolumeCreate) -> VolumeView | None:
        """The volume volume-agent made for a create omad did not live to record: its record of that name (it
        records a create before asking CloudStack, and its start-up reconciliation settles one it was itself cut
        short in); None when there is none, so nothing was made. A create still under way is waited for."""
        deadline = asyncio.get_running_loop().time() + self.volumes.mount_timeout
        while True:
            made = await made_under(self.volumes, pending.volume_name)
            if made is None or (made.volume_id and made.operation != "create"):
                return made
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable("volume still being created",
                                  f"volume-agent is still creating {pending.volume_name} (asked by {pending.job_id}); "
                                  "the next sync takes it")
            log.info("volume-agent is still creating %s; waiting", pending.volume_name, extra={"resource": job_id})
            await asyncio.sleep(0.5)

    async def _holds_last_sync(self, job_id: str, disk_id: str, volume_id: str, known: store.Volume | None) -> bool:
        """Whether the volume still holds what the last completed sync left there: the stamp that sync wrote at
        the volume's end (ending.py) is still there. A CloudStack snapshot carries the stamp of its moment, so a
        revert to anything older than that sync, or another volume, shows another stamp or none; a revert to a
        snapshot taken since (a test failover's) shows the same one and loses nothing."""
        found = await self.volumes.read_stamp(volume_id)
        if known is not None and known.volume_id == volume_id and known.sync_stamp and found == known.sync_stamp:
            return True
        log.warning("volume %s of %s does not hold what the last sync left (stamp %r, expected %r): reverted or "
                    "written outside the appliance; the disk is copied in full", volume_id, disk_id, found,
                    known.sync_stamp if known else None, extra={"resource": job_id})
        return False

    async def _launch(self, job_id: str, ctx: contexts_store.Context) -> dict[str, list[dict[str, Any]]]:
        """Steps 2-5."""
        cid = ctx.context_id
        disks = await store.disks(self.db, job_id)
        known = await store.volumes_of(self.db, cid)
        created: list[dict[str, Any]] = []
        mounted: list[dict[str, Any]] = []
        paths: dict[str, str] = {}
        async with self.jobs.step(job_id, "prepare volumes"):
            for d in disks:
                view, fresh = await self._volume_for(job_id, ctx, d, known.get(d.disk_id))
                # A new volume holds nothing, a reverted one something older than the last sync: either way
                # its disk starts over.
                reset = fresh or (bool(d.base_change_id) and not await self._holds_last_sync(
                    job_id, d.disk_id, view.volume_id, known.get(d.disk_id)))
                now = utcnow()
                # `replication:volume-save`: dying here leaves the new volume attached here, recorded only as
                # intended.
                crash_if_named(self.crash_file, "replication:volume-save", job_id)
                async with self.db.transaction() as tx:
                    await store.drop_volume_create(tx, cid, d.disk_id)
                    await store.set_disk_volume(tx, job_id, d.disk_id, view.volume_id, reset_base=reset)
                    old = known.get(d.disk_id)
                    await store.save_volume(tx, store.Volume(
                        vm_context_id=cid, disk_id=d.disk_id, volume_id=view.volume_id,
                        volume_name=view.name, size_bytes=view.size_bytes,
                        device_path=view.device_path, link_path=view.link_path,
                        created_by_job=job_id if fresh or old is None else old.created_by_job,
                        created_at=now if fresh or old is None else old.created_at, updated_at=now))
                    if reset:
                        await contexts_store.set_change_id(tx, cid, d.disk_id, None, now)
                paths[d.disk_id] = str(view.link_path)
                if fresh:
                    created.append({"volume_id": view.volume_id, "volume_name": view.name,
                                    "size_gb": view.size_bytes // GIB, "status": "created"})
                mounted.append({"device_path": view.device_path, "status": "attached",
                                "volume_id": view.volume_id, "disk_id": d.disk_id})
        await self.jobs.progress(job_id, 1)
        names = {d.export_name: d.disk_id for d in disks}
        async with self.jobs.step(job_id, "allocate ports"):
            ports = await self.pool.allocate_named(job_id, list(names), self.cfg.lease_seconds)
            async with self.db.transaction() as tx:
                await store.set_ports(tx, job_id, ports)
        disks = await store.disks(self.db, job_id)
        async with self.jobs.step(job_id, "start exports"):
            # Each disk's export on its own port: started at once. Every start is awaited before a failure
            # is raised, so the undo (releasing the job's exports) does not race one still starting.
            started = time.monotonic()
            await every(*(self._export(job_id, d, paths[d.disk_id]) for d in disks))
            log.info("%d export(s) started in %.3f s", len(disks), time.monotonic() - started,
                     extra={"resource": job_id})
        await self.jobs.progress(job_id, 2)
        # `replication:vma`: dying here leaves rows, exports and leases of a job the VMA never heard of.
        crash_if_named(self.crash_file, "replication:vma", job_id)
        async with self.jobs.step(job_id, VMA_STEP):
            login = await self.credentials.login_for(ctx.credential_id)
            body = {"job_id": job_id, "vcenter": login.vcenter, "username": login.username,
                    "password": login.password, "vm_paths": [ctx.vm_path], "oma_url": self.oma_url,
                    "nbd_targets": [{"device_path": f"nbd://{self.cfg.nbd_host}:{d.nbd_port}/{d.export_name}",
                                     "vmware_disk_key": str(d.disk_key)} for d in disks], **login.pin()}
            await vma_started("replication", self.vma.replicate(body))
        log.info("VMA started the replication", extra={"resource": job_id})
        return {"created": created, "mounted": mounted}

    async def _export(self, job_id: str, disk: store.ReplicationDisk, path: str) -> None:
        """A writable export of the disk's volume device on its leased port."""
        assert disk.nbd_port is not None
        await self.pool.start_export(export_name=disk.export_name, port=disk.nbd_port, path=path, read_only=False,
                                     shared_connections=self.cfg.shared_connections, fmt="raw", job_id=job_id)

    # -- reading -------------------------------------------------------------------------------------

    @staticmethod
    def _source(rep: store.Replication, ctx: contexts_store.Context | None) -> dict[str, Any]:
        return {"id": ctx.vmware_vm_id if ctx else "", "name": rep.vm_name, "path": rep.vm_path,
                "vcenter_host": ctx.vcenter_host if ctx else "", "datacenter": ctx.datacenter if ctx else ""}

    async def get(self, job_id: str) -> dict[str, Any]:
        """`GET /replications/{id}` (CONTRACTS.md): the job's record merged with the VMA's latest progress."""
        rep = await store.get(self.db, job_id)
        return await self._public(rep)

    async def _public(self, rep: store.Replication) -> dict[str, Any]:
        try:
            ctx: contexts_store.Context | None = await contexts_store.by_id(self.db, rep.vm_context_id)
        except NotFound:
            ctx = None
        disks = await store.disks(self.db, rep.job_id)
        vma_disks = {d.get("disk_id"): d for d in rep.vma_progress.get("disk_progresses") or []
                     if isinstance(d, dict)}
        volumes = await store.volumes_of(self.db, rep.vm_context_id)
        out_disks = []
        for d in disks:
            vd = vma_disks.get(d.disk_id, {})
            vol = volumes.get(d.disk_id)
            out_disks.append({
                "disk_id": d.disk_id, "vmware_disk_key": d.disk_key, "unit_number": d.unit_number,
                "capacity_bytes": d.capacity_bytes, "volume_id": d.volume_id,
                "device_path": vol.device_path if vol else None, "nbd_port": d.nbd_port,
                "nbd_export_name": d.export_name, "base_change_id": d.base_change_id, "change_id": d.change_id,
                "previous_change_id": d.previous_change_id, "change_id_mismatch": d.change_id_mismatch,
                "sync_type": vd.get("sync_type"), "status": vd.get("status"),
                "progress_percent": vd.get("percentage", 0), "bytes_transferred": vd.get("bytes_transferred", 0),
                "total_bytes": vd.get("total_bytes", 0)})
        cbt = await store.cbt_of_job(self.db, rep.job_id)
        return {"job_id": rep.job_id, "status": str(rep.status), "progress_percent": rep.progress_percent,
                "created_at": rep.created_at, "updated_at": rep.updated_at, "started_at": rep.started_at,
                "completed_at": rep.completed_at, "source_vm": self._source(rep, ctx),
                "vm_context_id": rep.vm_context_id,
                "configuration": {"replication_type": rep.replication_type, "target_network": rep.target_network,
                                  "ossea_config_id": rep.ossea_config_id},
                "replication_type": rep.replication_type,
                "bytes_transferred": rep.bytes_transferred, "total_bytes": rep.total_bytes,
                "disks": out_disks, "cbt_history": [{**c, "sync_success": bool(c["sync_success"])} for c in cbt],
                "current_operation": rep.current_operation, "vma_sync_type": rep.vma_sync_type,
                "vma_eta_seconds": rep.vma_eta_seconds, "vma_status": rep.vma_status,
                "error_message": rep.error_message, "schedule_execution_id": rep.schedule_execution_id,
                "vm_group_id": rep.vm_group_id, "scheduled_by": rep.scheduled_by, "created_by": rep.created_by}

    async def find(self, *, vm_context_id: str | None, status: str | None, limit: int,
                   offset: int) -> dict[str, Any]:
        total, found = await store.find(self.db, vm_context_id=vm_context_id, status=status, limit=limit,
                                        offset=offset)
        items = [await self._public(r) for r in found]
        return {"replications": items, "total": total, "count": len(items), "limit": limit, "offset": offset}

    async def progress(self, job_id: str) -> dict[str, Any]:
        """`GET /replications/{id}/progress`: our record plus the VMA's latest figures (as last polled)."""
        rep = await store.get(self.db, job_id)
        out = await self._public(rep)
        out["vma_progress"] = rep.vma_progress
        out["last_activity_at"] = rep.last_activity_at
        return out

    async def vma_progress(self, job_id: str) -> dict[str, Any]:
        """`GET /progress/{job_id}`: the VMA's body unchanged (503 VMA down, 404 the VMA does not know it)."""
        try:
            return await self.vma.progress(job_id)
        except TimedOut as e:
            raise Unavailable(e.message, e.details) from e

    # -- changing and removing -----------------------------------------------------------------------

    async def update(self, job_id: str, *, target_network: str | None, actor: str) -> dict[str, Any]:
        await store.get(self.db, job_id)
        async with self.db.transaction() as tx:
            await store.update_settings(tx, job_id, target_network=target_network)
            await self.audit.record(actor, "replication.update", f"job:{job_id}", tx=tx,
                                    target_network=target_network)
        return await self.get(job_id)

    async def delete(self, job_id: str, *, actor: str) -> dict[str, Any]:
        """Cancel a running replication (its exports stop, its volumes stay), or remove a finished one's record."""
        rep = await store.get(self.db, job_id)
        if rep.active:
            await self.ending.fail(job_id, f"cancelled by {actor}", cancelled=True)
            await self.audit.record(actor, "replication.cancel", f"job:{job_id}", vm_name=rep.vm_name)
            return {"job_id": job_id, "status": "cancelled", "message": f"replication {job_id} cancelled"}
        async with self.db.transaction() as tx:
            again = await store.get(tx, job_id)
            if again.active:
                raise Conflict("replication running", f"replication {job_id} started again meanwhile")
            await store.delete(tx, job_id)
            await self.audit.record(actor, "replication.delete", f"job:{job_id}", tx=tx, vm_name=rep.vm_name)
        return {"job_id": job_id, "deleted": True, "message": f"replication {job_id} removed"}
