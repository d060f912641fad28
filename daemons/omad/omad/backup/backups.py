"""VM-level backups: every disk of a VM at once, each into a QCOW2 in the repository, written by the VMA.

Starting one (all steps recorded on its job):
  1. rows first: the backup, one row per disk with its image path, the job — in one transaction that also
     refuses a second active backup of the VM (409) and an incremental with nothing to continue (400);
  2. create images: a new qcow2 of the disk's capacity, or for an incremental an overlay whose backing file
     is the same disk's image of the previous backup (relative path, same directory). omad creates them, so
     they belong to omad's user although nbd-pool's qemu-nbd (root) writes into them;
  3. allocate ports: one per disk from nbd-pool, leased to the backup's id;
  4. start exports: a writable qemu-nbd per image (`--shared`: the VMA opens 2 connections per disk);
  5. start the VMA's backup with the `nbd_targets` string ("2000:nbd://host:port/export,2001:...").
Any failure fails the backup and undoes everything (teardown.py). The backup then runs until the VMA
completes every disk (completion.py), reports failure, or goes idle (watchdog.py); an omad restart
re-adopts it while its exports live (recovery.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import unicodedata
from pathlib import Path
from typing import Any

from oma_common.errors import Conflict, Invalid, OmaError

from ..adapters.localfs import LocalFs
from ..adapters.qemu_img import QemuImg
from ..audit import Audit
from ..clients.nbdpool import NbdPool
from ..clients.vma import VmaClient
from ..config import BackupConfig
from ..inventory.contexts import Contexts
from ..inventory.credentials import Credentials, VCenterLogin
from ..jobs.engine import JobEngine
from ..jobs.locks import KeyedLocks
from ..jobs.starting import undone_on_failure, vma_started
from ..store import backups as store
from ..store import contexts as contexts_store
from ..store import policies as policy_store
from ..store.db import Database, Tx, utcnow
from ..store.repositories import Repository
from .immutability import Immutability
from .repositories import Repositories
from .teardown import Teardown, lock_key

log = logging.getLogger(__name__)

FIRST_DISK_KEY = 2000  # the VMA's target key of disk index 0 (CONTRACTS.md "Backups")
GIB = 1024**3
# The wire fields of a backup (the spec's BackupResponse) and of each of its disks, in their order.
_WIRE_FIELDS = ("backup_id", "vm_context_id", "vm_name", "backup_type", "repository_id", "policy_id", "status",
                "parent_backup_id", "chain_id", "bytes_transferred", "total_bytes", "size_bytes", "current_phase",
                "progress_percent", "transfer_speed_bps", "eta_seconds", "error_message", "created_by", "created_at",
                "started_at", "completed_at", "updated_at", "last_activity_at")
_DISK_WIRE_FIELDS = ("capacity_bytes", "qcow2_path", "backing_file", "nbd_port", "nbd_export_name", "qemu_nbd_pid",
                     "status", "change_id", "previous_change_id", "bytes_transferred", "total_bytes",
                     "progress_percent", "size_bytes", "completed_at")


def safe_name(vm_name: str, limit: int = 40) -> str:
    """A VM name reduced to what ids, export names and file names may hold."""
    text = unicodedata.normalize("NFKD", vm_name).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:limit].rstrip("-.") or "vm"


def export_name(backup_id: str, index: int) -> str:
    return f"{backup_id}-disk-{FIRST_DISK_KEY + index}"


def targets_string(host: str, disks: list[store.BackupDisk]) -> str:
    return ",".join(f"{FIRST_DISK_KEY + d.disk_index}:nbd://{host}:{d.nbd_port}/{d.nbd_export_name}" for d in disks)


def _disk_key(disk_id: str) -> int:
    digits = disk_id.removeprefix("disk-")
    return int(digits) if digits.isdigit() else 1 << 30


@dataclasses.dataclass
class StartRequest:
    vm_name: str
    repository_id: str
    backup_type: str
    policy_id: str | None = None
    tags: dict[str, Any] = dataclasses.field(default_factory=dict)


class Backups:
    def __init__(self, db: Database, audit: Audit, jobs: JobEngine, locks: KeyedLocks, contexts: Contexts,
                 credentials: Credentials, repositories: Repositories, pool: NbdPool, vma: VmaClient,
                 qemu_img: QemuImg, fs: LocalFs, teardown: Teardown, cfg: BackupConfig,
                 immutability: Immutability) -> None:
        self.db = db
        self.immutability = immutability
        self.audit = audit
        self.jobs = jobs
        self.locks = locks
        self.contexts = contexts
        self.credentials = credentials
        self.repositories = repositories
        self.pool = pool
        self.vma = vma
        self.qemu_img = qemu_img
        self.fs = fs
        self.teardown = teardown
        self.cfg = cfg

    # -- starting ------------------------------------------------------------------------------------

    async def start(self, req: StartRequest, *, actor: str) -> dict[str, Any]:
        """Start a backup and answer the spec's BackupResponse once the VMA accepted it.

        The work runs as its own task: a client that hangs up does not interrupt it half way (it then either
        runs or is undone, as if the client had waited).
        """
        task = asyncio.ensure_future(self._start(req, actor))
        # Nobody may be left to read the outcome of a start whose client went away.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def _start(self, req: StartRequest, actor: str) -> dict[str, Any]:
        context = await self.contexts.by_name(req.vm_name)
        cid = context["context_id"]
        async with self.locks.hold(f"vm-backup:{cid}", what=f"VM {req.vm_name!r}"):
            if req.policy_id:
                await self._follows_policy(req)
            repo, root = await self.repositories.ready_root(req.repository_id)
            disks = await self._vm_disks(cid, req.vm_name)
            login = await self.credentials.login_for(context["credential_id"])
            backup_id = await self._record(req, context, repo, disks, actor)
            async with undone_on_failure(backup_id, kind="backup", id_key="backup_id", fail=self.teardown.fail,
                                         audit=self.audit, actor=actor, action="backup.start",
                                         resource=f"backup:{backup_id}", vm_name=req.vm_name,
                                         repository_id=req.repository_id, backup_type=req.backup_type):
                await self._launch(backup_id, context, root, login, req.backup_type)
        await self.audit.record(actor, "backup.start", f"backup:{backup_id}", vm_name=req.vm_name,
                                repository_id=req.repository_id, backup_type=req.backup_type)
        out = await self.get(backup_id, sizes=False)
        out["status"] = "started"  # the spec's answer to a start; GET shows it as "running"
        for d in out["disk_results"]:
            d["status"] = "qemu_started"
        return out

    async def _vm_disks(self, context_id: str, vm_name: str) -> list[tuple[str, int]]:
        """(disk id, capacity rounded up to 512 bytes) of each disk, index i being the VM's i-th by VMware key."""
        found = await store.vm_disks(self.db, context_id)
        if not found:
            raise Invalid("VM has no disks", f"no disks are recorded for VM {vm_name!r}; discover it again")
        out = []
        for d in sorted(found, key=lambda d: _disk_key(d.disk_id)):
            capacity = d.capacity_bytes or d.size_gb * GIB
            if capacity <= 0:
                raise Invalid("disk size unknown", f"{d.disk_id} of VM {vm_name!r} has no recorded capacity")
            out.append((d.disk_id, -(-capacity // 512) * 512))
        return out

    async def _record(self, req: StartRequest, context: dict[str, Any], repo: Repository,
                      disks: list[tuple[str, int]], actor: str) -> str:
        """Step 1: the rows, checked and written in one transaction."""
        cid = context["context_id"]
        now = utcnow()
        async with self.db.transaction() as tx:
            active = await store.active_for_vm(tx, cid)
            if active is not None:
                raise Conflict("backup running", f"VM {req.vm_name!r} has a backup running ({active.backup_id}); "
                                                 "wait for it to end", backup_id=active.backup_id)
            parent = None
            parent_disks: dict[int, store.BackupDisk] = {}
            if req.backup_type == "incremental":
                parent = await store.latest_completed(tx, cid, repo.id)
                if parent is None:
                    raise Invalid("no previous backup", f"an incremental backup continues a completed backup of "
                                  f"VM {req.vm_name!r} in repository {repo.name!r}, and there is none: "
                                  "take a full backup first")
                parent_disks = {d.disk_index: d for d in await store.disks(tx, parent.backup_id)}
            backup_id = await self._new_id(tx, context["vm_name"])
            new_disks = []
            for index, (disk_id, capacity) in enumerate(disks):
                name = export_name(backup_id, index)
                before = parent_disks.get(index)
                # A disk continues its chain only when the parent has the same disk at this index.
                backing = before if before is not None and before.disk_id == disk_id else None
                new_disks.append(store.NewDisk(index, disk_id, capacity, f"{cid}/{name}.qcow2",
                                               Path(backing.qcow2_path).name if backing else None, name,
                                               backing.change_id if backing else None))
            await store.create(tx, backup_id=backup_id, vm_context_id=cid, vm_name=context["vm_name"],
                               repository_id=repo.id, backup_type=req.backup_type,
                               parent_backup_id=parent.backup_id if parent else None,
                               chain_id=parent.chain_id if parent else backup_id, policy_id=req.policy_id,
                               tags=req.tags, created_by=actor, now=now, new_disks=new_disks)
            await self.jobs.create("backup", job_id=backup_id, context_id=cid, tx=tx,
                                   display_name=f"{req.backup_type} backup of {context['vm_name']}",
                                   details={"repository_id": repo.id, "disks": len(disks)})
            await contexts_store.job_started(tx, cid, backup_id, now)
        log.info("%s backup of %s into %s: %d disk(s)%s", req.backup_type, context["vm_name"], repo.name,
                 len(disks), f", continuing {parent.backup_id}" if parent else "", extra={"resource": backup_id})
        return backup_id

    async def _follows_policy(self, req: StartRequest) -> None:
        """A backup under a policy goes to the policy's primary repository (its rules copy it elsewhere)."""
        assert req.policy_id is not None
        policy = await policy_store.find_one(self.db, req.policy_id)
        if policy is None:
            raise Invalid("policy not found", f"backup policy {req.policy_id!r} does not exist")
        if not policy.enabled:
            raise Invalid("policy disabled", f"backup policy {policy.name!r} is disabled")
        if policy.primary_repository_id != req.repository_id:
            raise Invalid("not the policy's repository", f"policy {policy.name!r} backs up into repository "
                          f"{policy.primary_repository_id}, not {req.repository_id}")

    @staticmethod
    async def _new_id(tx: Tx, vm_name: str) -> str:
        base = f"backup-{safe_name(vm_name)}-{int(time.time())}"
        candidate, n = base, 1
        while await store.id_taken(tx, candidate):
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    async def _launch(self, backup_id: str, context: dict[str, Any], root: Path, login: VCenterLogin,
                      backup_type: str) -> None:
        """Steps 2-5."""
        disks = await store.disks(self.db, backup_id)
        async with self.jobs.step(backup_id, "create images"):
            await self.fs.make_dir(root / context["context_id"])
            for d in disks:
                await self.qemu_img.create(root / d.qcow2_path, d.capacity_bytes, backing_file=d.backing_file)
        await self.jobs.progress(backup_id, 1)
        names = {str(d.nbd_export_name): d.disk_index for d in disks}  # create() named every disk's export
        async with self.jobs.step(backup_id, "allocate ports"):
            ports = await self.pool.allocate_named(backup_id, list(names), self.cfg.lease_seconds)
            async with self.db.transaction() as tx:
                await store.set_ports(tx, backup_id, {names[name]: port for name, port in ports.items()})
        disks = await store.disks(self.db, backup_id)
        async with self.jobs.step(backup_id, "start exports"):
            for d in disks:
                assert d.nbd_export_name is not None and d.nbd_port is not None
                started = await self.pool.start_export(
                    export_name=d.nbd_export_name, port=d.nbd_port, path=str(root / d.qcow2_path),
                    read_only=False, shared_connections=self.cfg.shared_connections, fmt="qcow2", job_id=backup_id)
                await store.mark_exporting(self.db, backup_id, d.disk_index, started.pid)
        await self.jobs.progress(backup_id, 2)
        async with self.jobs.step(backup_id, "start VMA backup"):
            previous = disks[0].previous_change_id if disks else None
            body: dict[str, Any] = {
                "job_id": backup_id, "vm_name": context["vm_name"], "vm_path": context["vm_path"],
                "vcenter_host": login.vcenter, "vcenter_user": login.username, "vcenter_password": login.password,
                "nbd_targets": targets_string(self.cfg.nbd_host, disks), "backup_type": backup_type,
                **login.pin()}
            if previous:
                body["previous_change_id"] = previous
            await vma_started("backup", self.vma.start_backup(body))
        # Completions may already have come in (a small VM): only a backup still pending becomes running.
        await store.mark_running(self.db, backup_id, utcnow())
        log.info("VMA started the backup", extra={"resource": backup_id})

    # -- reading -------------------------------------------------------------------------------------

    async def get(self, backup_id: str, *, sizes: bool = True) -> dict[str, Any]:
        """One backup with its disks; `sizes` reads each image's current figures with qemu-img info -U."""
        backup = await store.get(self.db, backup_id)
        out = self._public(backup, await store.disks(self.db, backup_id))
        if sizes:
            for d in out["disk_results"]:
                await self._live_size(d)
        return out

    async def _live_size(self, disk: dict[str, Any]) -> None:
        path = Path(disk["qcow2_path"])
        disk["file_exists"] = await self.fs.exists(path)
        if not disk["file_exists"]:
            return
        try:
            info = await self.qemu_img.info(path, force_share=True)
        except OmaError as e:
            disk["size_error"] = e.details
            return
        disk["size_bytes"], disk["virtual_size"] = info.actual_size, info.virtual_size

    async def find(self, *, vm_name: str | None, vm_context_id: str | None, repository_id: str | None,
                   backup_type: str | None, status: str | None, limit: int, offset: int) -> dict[str, Any]:
        total, found = await store.find(self.db, vm_name=vm_name, vm_context_id=vm_context_id,
                                        repository_id=repository_id, backup_type=backup_type, status=status,
                                        limit=limit, offset=offset)
        items = [self._public(b, await store.disks(self.db, b.backup_id)) for b in found]
        return {"backups": items, "total": total, "count": len(items), "limit": limit, "offset": offset}

    def _public(self, backup: store.Backup, disks: list[store.BackupDisk]) -> dict[str, Any]:
        """The spec's BackupResponse, with the disks' details."""
        root = Path(backup.root_path)
        results = []
        for d in disks:
            item: dict[str, Any] = {k: getattr(d, k) for k in _DISK_WIRE_FIELDS}
            item["qcow2_path"] = str(root / d.qcow2_path)
            item["vmware_disk_id"] = d.disk_id
            item["disk_id"] = d.disk_index  # the VMA's disk_id is the index
            results.append(item)
        exported = [d for d in disks if d.nbd_port]
        out: dict[str, Any] = {k: getattr(backup, k) for k in _WIRE_FIELDS}
        out["tags"] = backup.tag_map()
        out["disk_results"] = results
        out["nbd_targets_string"] = targets_string(self.cfg.nbd_host, exported) if len(exported) == len(disks) else ""
        return out

    # -- deleting ------------------------------------------------------------------------------------

    async def delete(self, backup_id: str, *, actor: str) -> dict[str, Any]:
        """Remove a backup's images and rows together; refused while it runs or others build on it."""
        backup = await store.get(self.db, backup_id)
        # The VM's start lock: no incremental can pick this backup as its parent meanwhile.
        async with self.locks.hold(f"vm-backup:{backup.vm_context_id}", what=f"VM {backup.vm_name!r}"):
            async with self.locks.hold(lock_key(backup_id), what=f"backup {backup_id}"):
                await self._deletable(self.db, backup_id)
                files = await store.image_paths(self.db, backup_id)
                await self.immutability.refuse_if_locked(self.db, backup_id)
                await self.immutability.release(backup_id, files)  # the lock has ended: chattr -i
                await self.fs.remove(files)  # images first: a failure leaves the rows that name them
                for directory in {f.parent for f in files}:
                    await self.fs.remove_dir_if_empty(directory)
                async with self.db.transaction() as tx:
                    await self._deletable(tx, backup_id)
                    await policy_store.forget_copies_into(tx, backup_id)
                    await store.delete(tx, backup_id)
                    await self.audit.record(actor, "backup.delete", f"backup:{backup_id}", tx=tx,
                                            vm_name=backup.vm_name, repository_id=backup.repository_id,
                                            backup_type=backup.backup_type, status=backup.status)
        log.info("deleted (%d image(s))", len(files), extra={"resource": backup_id})
        return {"message": f"backup {backup_id} deleted", "backup_id": backup_id, "images_removed": len(files)}

    @staticmethod
    async def _deletable(db: Database | Tx, backup_id: str) -> None:
        status = await store.get_status(db, backup_id)
        if status in store.ACTIVE:
            raise Conflict("backup running", f"backup {backup_id} is {status}; it can be deleted once it ends")
        deps = await store.dependents(db, backup_id)
        if deps:
            raise Conflict("backup has dependents",
                           f"backup {backup_id} is the base of {', '.join(deps)}; delete those first "
                           "(newest first)", dependents=deps)
