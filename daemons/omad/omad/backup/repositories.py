"""Backup repositories: a local directory, or an NFS or CIFS share that volume-agent mounts for us.

A repository's root is where its images live: `disk_path` for a local one, the mount point for a share.
Before any use the root is made ready (a share is mounted again if the appliance rebooted; the agent's
mount is idempotent) and must be writable by omad. A new repository is refused (400) unless its root lies
inside nbd-pool's export roots (nbd-pool answers them, `GET /roots`: a repository elsewhere could hold no
backup, since nbd-pool exports no image outside them), omad's user can write there, and it has the free
space configured (`backup.repository_min_free_bytes`). The dry-run test answers `success` false with the reason
for what may change (a share unreachable, a directory missing, not writable, short of space), and the same 400
as creation for a root outside the export roots, which no retry can fix. CIFS passwords are sealed at rest and
never returned.
Immutability settings are stored here; the retention policies enforce them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from oma_common import schema
from oma_common.contracts.volume_agent import MountIn
from oma_common.errors import Conflict, Invalid, NotFound, OmaError, TimedOut, Unavailable
from oma_common.schema import spec

from ..adapters.localfs import Capacity, LocalFs
from ..audit import Audit
from ..clients.nbdpool import NbdPool
from ..clients.volume_agent import VolumeAgent
from ..crypto import SecretBox, reseal_all
from ..store import backups as backup_store
from ..store import repositories as store
from ..store.db import Database, Tx, utcnow
from ..store.repositories import Repository

log = logging.getLogger(__name__)

PURPOSE = "backup_repositories.cifs_password"
TYPES = {"local": "local", "nfs": "nfs", "cifs": "cifs", "smb": "cifs"}


@dataclasses.dataclass
class LocalSettings:
    """A directory on this appliance (it must exist and be writable by omad's user)."""

    disk_path: str = spec(min_length=2, max_length=4096, pattern=r"/.*")


@dataclasses.dataclass
class NfsSettings:
    server: str = spec(min_length=1, max_length=255)
    export_path: str = spec(min_length=1, max_length=4096, pattern=r"/.*")
    mount_point: str = spec("", max_length=4096, description="below volume-agent's mount root; empty = chosen")
    options: list[str] | str = spec(factory=list, description="extra mount options, e.g. vers=4.1")


@dataclasses.dataclass
class CifsSettings:
    server: str = spec(min_length=1, max_length=255)
    share_name: str = spec(min_length=1, max_length=255)
    username: str = spec(min_length=1, max_length=255)
    password: str = spec("", max_length=1024)
    domain: str = spec("", max_length=255)
    mount_point: str = spec("", max_length=4096, description="below volume-agent's mount root; empty = chosen")
    options: list[str] | str = spec(factory=list)


SETTINGS: dict[str, type] = {"local": LocalSettings, "nfs": NfsSettings, "cifs": CifsSettings}


def _options(value: list[str] | str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    return [o.strip() for o in items if o.strip()]


def public(repo: Repository, backup_count: int | None = None) -> dict[str, Any]:
    """A repository as clients see it: settings without the password, the last storage check."""
    config = json.loads(repo.config)
    if repo.type == "cifs":
        config["password_set"] = bool(repo.secret_sealed)
    out = {
        "id": repo.id, "name": repo.name, "type": repo.type, "enabled": repo.enabled,
        "config": config, "is_immutable": repo.is_immutable,
        "min_retention_days": repo.min_retention_days, "description": repo.description,
        "created_by": repo.created_by, "created_at": repo.created_at, "updated_at": repo.updated_at,
        "storage_info": {"total_bytes": repo.total_bytes, "used_bytes": repo.used_bytes,
                         "available_bytes": repo.available_bytes, "mount_point": repo.root_path,
                         "last_check_at": repo.last_check_at, "error": repo.last_check_error},
    }
    if backup_count is not None:
        out["backup_count"] = backup_count
    return out


@dataclasses.dataclass
class Target:
    """A configuration that has been validated but not saved."""

    type: str
    config: dict[str, Any]  # what is stored (no password)
    password: str = dataclasses.field(default="", repr=False)

    @property
    def remote(self) -> bool:
        return self.type != "local"


class OutsideExportRoots(Invalid):
    """A repository root where nbd-pool may not export from: no backup could ever be written there."""


class ExportRoots:
    """nbd-pool's export roots: the only places a backup's images can be exported from for the VMA."""

    def __init__(self, pool: NbdPool) -> None:
        self.pool = pool

    async def check(self, root: Path) -> None:
        """Invalid unless `root` lies inside an export root; Unavailable when nbd-pool cannot be asked."""
        try:
            answer = await self.pool.roots()
        except NotFound:
            log.warning("nbd-pool answers no export roots (an older nbd-pool): %s is not checked", root)
            return
        except OmaError as e:
            raise Unavailable("cannot check the export roots",
                              f"nbd-pool could not be asked where backups may be written: {e.details}") from e
        configured = answer.export_roots
        resolved = [Path(r) for r in answer.resolved_roots]
        real = Path(os.path.realpath(root))
        if any(real == r or real.is_relative_to(r) for r in resolved):
            return
        drop_in = answer.drop_in
        raise OutsideExportRoots("outside the export roots",
                      f"{root} is not inside nbd-pool's export roots ({', '.join(configured) or 'none'}): no "
                      f"backup could be written there. Choose a directory inside one of them, or add it to "
                      f"`export_roots` in a drop-in {drop_in} and restart nbd-pool",
                      export_roots=configured, drop_in=drop_in)


class Repositories:
    def __init__(self, db: Database, audit: Audit, box: SecretBox, fs: LocalFs, agent: VolumeAgent,
                 roots: ExportRoots | None = None, *, min_free_bytes: int = 0) -> None:
        self.db = db
        self.audit = audit
        self.box = box
        self.fs = fs
        self.agent = agent
        self.roots = roots  # None: not checked (a rig without nbd-pool)
        self.min_free_bytes = min_free_bytes

    # -- reading -------------------------------------------------------------------------------------

    async def list(self, *, type: str | None = None, enabled: bool | None = None) -> list[dict[str, Any]]:
        t = TYPES.get(type.lower(), type.lower()) if type else None
        return [public(r, n) for r, n in await store.listing(self.db, type=t, enabled=enabled)]

    async def get(self, repo_id: str) -> dict[str, Any]:
        repo = await store.get(self.db, repo_id)
        return public(repo, await backup_store.count_in_repository(self.db, repo_id))

    async def record(self, repo_id: str) -> Repository:
        """The repository, or NotFound."""
        return await store.get(self.db, repo_id)

    async def row(self, repo_id: str) -> dict[str, Any]:
        """The repository as a mapping, or NotFound (what schedule/launcher's RepositoryLookup asks for)."""
        return dataclasses.asdict(await store.get(self.db, repo_id))

    async def reseal_unbound(self) -> int:
        """Seal again, bound to its row, every password sealed in the first format; how many were."""
        return await reseal_all(self.db, self.box, PURPOSE, store.sealed_secrets, store.set_secret)

    # -- the calls -----------------------------------------------------------------------------------

    async def create(self, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        target = self.validate(fields["type"], fields["config"])
        repo_id = f"repo-{secrets.token_hex(6)}"
        await store.check_name_free(self.db, fields["name"])  # refuse a taken name before mounting anything
        await self._exportable(target)
        root, mounted_here = await self._prepare(target, repo_id)
        try:
            capacity = await self._capacity(root)
            now = utcnow()
            sealed = self.box.seal(target.password, purpose=PURPOSE, row=repo_id) if target.type == "cifs" else None
            repo = Repository(
                id=repo_id, name=fields["name"], type=target.type, enabled=bool(fields.get("enabled", True)),
                config=json.dumps(target.config), secret_sealed=sealed, root_path=str(root),
                is_immutable=bool(fields.get("is_immutable", False)),
                min_retention_days=int(fields.get("min_retention_days", 0)),
                description=fields.get("description", ""), created_by=actor, created_at=now, updated_at=now,
                total_bytes=capacity.total_bytes, used_bytes=capacity.used_bytes,
                available_bytes=capacity.available_bytes, last_check_at=now, last_check_error=None)
            async with self.db.transaction() as tx:
                await store.check_name_free(tx, fields["name"])
                await self._root_free(tx, root)
                await store.create(tx, repo)
                await self.audit.record(actor, "repository.create", f"repository:{repo_id}", tx=tx,
                                        name=fields["name"], type=target.type, root=str(root))
        except BaseException:
            if mounted_here:  # not a share that was mounted already (another repository's, say)
                await self._unmount_quietly(root)
            raise
        log.info("repository %s (%s) created at %s", fields["name"], target.type, root, extra={"resource": repo_id})
        return await self.get(repo_id)

    async def test(self, type: str, config: dict[str, Any]) -> dict[str, Any]:
        """Try a configuration without saving it: a directory must be writable, a share mountable and writable."""
        started = utcnow()
        try:
            target = self.validate(type, config)
            await self._exportable(target)
            root, mounted_here = await self._prepare(target, f"test-{secrets.token_hex(4)}", probe_only=True)
            try:
                capacity = await self._capacity(root)
            finally:
                if mounted_here:
                    await self._unmount_quietly(root)
        except OutsideExportRoots:
            raise  # refused as at creation (400, naming the roots and the drop-in): no retry can make it work
        except OmaError as e:
            return {"success": False, "message": e.message, "error": {"error": e.message, "details": e.details,
                                                                      "code": e.code}, "tested_at": started}
        return {"success": True, "message": f"{target.type} repository at {root} is usable", "tested_at": started,
                "storage_info": {"total_bytes": capacity.total_bytes, "used_bytes": capacity.used_bytes,
                                 "available_bytes": capacity.available_bytes,
                                 "mount_point": None if target.remote else str(root)}}

    async def storage(self, repo_id: str) -> dict[str, Any]:
        """A fresh capacity check (statvfs of the root), remembered with the repository."""
        repo = await store.get(self.db, repo_id)
        now = utcnow()
        try:
            root = await self._ready(repo)
            capacity = await self.fs.capacity(root)
        except OmaError as e:
            await store.record_check_error(self.db, repo_id, str(e), now)
            raise
        await store.record_check(self.db, repo_id, total_bytes=capacity.total_bytes, used_bytes=capacity.used_bytes,
                                 available_bytes=capacity.available_bytes, now=now)
        return {"repository_id": repo_id, "total_bytes": capacity.total_bytes, "used_bytes": capacity.used_bytes,
                "available_bytes": capacity.available_bytes, "mount_point": str(root), "last_check_at": now}

    async def delete(self, repo_id: str, *, actor: str) -> dict[str, Any]:
        async with self.db.transaction() as tx:
            repo = await store.get(tx, repo_id)
            count = await backup_store.count_in_repository(tx, repo_id)
            if count:
                raise Conflict("repository has backups",
                               f"repository {repo.name!r} holds {count} backup(s); delete them first",
                               backup_count=count)
            await store.delete(tx, repo_id)
            await self.audit.record(actor, "repository.delete", f"repository:{repo_id}", tx=tx, name=repo.name,
                                    type=repo.type)
        if repo.type != "local":
            await self._unmount_quietly(Path(repo.root_path))
        return {"message": f"repository {repo.name!r} deleted", "repository_id": repo_id}

    async def ready_root(self, repo_id: str) -> tuple[Repository, Path]:
        """The repository (which must be enabled) and its root, mounted and writable, for a backup."""
        repo = await store.get(self.db, repo_id)
        if not repo.enabled:
            raise Invalid("repository disabled", f"backup repository {repo.name!r} is disabled")
        return repo, await self._ready(repo)

    # -- validation and preparation ------------------------------------------------------------------

    def validate(self, type: str, config: dict[str, Any]) -> Target:
        kind = TYPES.get(str(type).lower())
        if kind is None:
            raise Invalid("unknown repository type", f"type must be local, nfs or cifs, not {type!r}")
        settings: Any = schema.parse(SETTINGS[kind], config, what="config")
        if kind == "local":
            path = os.path.normpath(settings.disk_path)
            return Target(kind, {"disk_path": path})
        options = _options(settings.options)
        if kind == "nfs":
            return Target(kind, {"server": settings.server, "export_path": settings.export_path,
                                 "mount_point": settings.mount_point, "options": options})
        if not settings.password:
            raise Invalid("password required", "a CIFS repository needs the share's password")
        return Target(kind, {"server": settings.server, "share_name": settings.share_name,
                             "username": settings.username, "domain": settings.domain,
                             "mount_point": settings.mount_point, "options": options}, settings.password)

    async def _exportable(self, target: Target) -> None:
        """A local root, or a share's chosen mount point, must be where nbd-pool may export from."""
        if self.roots is None:
            return
        if not target.remote:
            await self.roots.check(Path(target.config["disk_path"]))
        elif target.config.get("mount_point"):
            await self.roots.check(Path(target.config["mount_point"]))
        else:
            await self.roots.check(Path((await self.agent.share_mounts()).mount_root))

    async def _capacity(self, root: Path) -> Capacity:
        capacity = await self.fs.capacity(root)
        if capacity.available_bytes < self.min_free_bytes:
            raise Invalid("not enough free space",
                          f"{root} has {capacity.available_bytes} bytes free for omad's user; a repository needs "
                          f"at least {self.min_free_bytes} (backup.repository_min_free_bytes)",
                          available_bytes=capacity.available_bytes, required_bytes=self.min_free_bytes)
        return capacity

    async def _prepare(self, target: Target, name: str, *, probe_only: bool = False) -> tuple[Path, bool]:
        """Make a new configuration's root usable: mount a share (at a chosen point when none was given).
        The root, and whether a share was mounted here for it (one mounted already is not ours to unmount)."""
        if not target.remote:
            root = Path(target.config["disk_path"])
            await self.fs.probe_writable(root)
            return root, False
        chosen = probe_only or not target.config.get("mount_point")
        if chosen:
            mount_root = (await self.agent.share_mounts()).mount_root
            point = f"{mount_root}/{name}"
            if not probe_only:
                target.config["mount_point"] = point
        else:
            point = target.config["mount_point"]
        try:
            mounted_here = await self._mount(target.type, target.config, target.password, point)
        except TimedOut:
            # No answer in time: volume-agent runs the request to its end all the same, so the share may be
            # mounted. On a point chosen here (new, named after this call) it is nobody else's: unmount it (the
            # agent takes it after the mount has ended). A point the caller named may hold another's share.
            if chosen:
                await self._unmount_quietly(Path(point))
            raise
        try:
            await self.fs.probe_writable(Path(point))
        except BaseException:
            if mounted_here:
                await self._unmount_quietly(Path(point))
            raise
        return Path(point), mounted_here

    async def _ready(self, repo: Repository) -> Path:
        root = Path(repo.root_path)
        if repo.type != "local":
            password = self.box.open(repo.secret_sealed, purpose=PURPOSE, row=repo.id) if repo.secret_sealed else ""
            await self._mount(repo.type, json.loads(repo.config), password, str(root))
        await self.fs.probe_writable(root)
        return root

    async def _mount(self, kind: str, config: dict[str, Any], password: str, point: str) -> bool:
        """Whether the share was mounted by this call (not mounted there already)."""
        share: dict[str, Any] = {"kind": kind, "server": config["server"], "mount_point": point,
                                 "options": config.get("options", [])}
        if kind == "nfs":
            share["export_path"] = config["export_path"]
        else:
            share.update(share_name=config["share_name"], username=config["username"], password=password,
                         domain=config.get("domain", ""))
        return not (await self.agent.mount_share(schema.parse(MountIn, share, what="share"))).already_mounted

    async def _unmount_quietly(self, point: Path) -> None:
        try:
            await self.agent.unmount_share(str(point))
        except OmaError as e:
            log.warning("could not unmount %s: %s", point, e, extra={"resource": str(point)})

    @staticmethod
    async def _root_free(tx: Tx, root: Path) -> None:
        for name, path in await store.roots(tx):
            other = Path(path)
            if other == root or other.is_relative_to(root) or root.is_relative_to(other):
                raise Conflict("path in use", f"{root} overlaps repository {name!r} at {other}; "
                                              "repositories may not share or nest directories")
