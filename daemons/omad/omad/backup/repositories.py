"""Backup repositories: a local directory, or an NFS or CIFS share that volume-agent mounts for us.

A repository's root is where its images live: `disk_path` for a local one, the mount point for a share.
Before any use the root is made ready (a share is mounted again if the appliance rebooted; the agent's
mount is idempotent) and must be writable by omad. CIFS passwords are sealed at rest and never returned.
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
from oma_common.errors import Conflict, Invalid, NotFound, OmaError
from oma_common.schema import spec

from ..adapters.localfs import LocalFs
from ..audit import Audit
from ..clients.volume_agent import VolumeAgent
from ..crypto import SecretBox
from ..store.db import Database, Tx, utcnow

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


def public(row: dict[str, Any], backup_count: int | None = None) -> dict[str, Any]:
    """A repository as clients see it: settings without the password, the last storage check."""
    config = json.loads(row["config"])
    if row["type"] == "cifs":
        config["password_set"] = bool(row.get("secret_sealed"))
    out = {
        "id": row["id"], "name": row["name"], "type": row["type"], "enabled": bool(row["enabled"]),
        "config": config, "is_immutable": bool(row["is_immutable"]),
        "min_retention_days": row["min_retention_days"], "description": row["description"],
        "created_by": row["created_by"], "created_at": row["created_at"], "updated_at": row["updated_at"],
        "storage_info": {"total_bytes": row["total_bytes"], "used_bytes": row["used_bytes"],
                         "available_bytes": row["available_bytes"], "mount_point": row["root_path"],
                         "last_check_at": row["last_check_at"], "error": row["last_check_error"]},
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


class Repositories:
    def __init__(self, db: Database, audit: Audit, box: SecretBox, fs: LocalFs, agent: VolumeAgent) -> None:
        self.db = db
        self.audit = audit
        self.box = box
        self.fs = fs
        self.agent = agent

    # -- reading -------------------------------------------------------------------------------------

    async def list(self, *, type: str | None = None, enabled: bool | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT r.*, (SELECT COUNT(*) FROM backup_jobs b WHERE b.repository_id = r.id) AS backup_count "
               "FROM backup_repositories r WHERE (? IS NULL OR r.type = ?) AND (? IS NULL OR r.enabled = ?) "
               "ORDER BY r.name")
        t = TYPES.get(type.lower(), type.lower()) if type else None
        e = None if enabled is None else int(enabled)
        rows = await self.db.fetchall(sql, (t, t, e, e))
        return [public(r, r["backup_count"]) for r in rows]

    async def get(self, repo_id: str) -> dict[str, Any]:
        row = await self.row(repo_id)
        count = await self.db.scalar("SELECT COUNT(*) FROM backup_jobs WHERE repository_id = ?", (repo_id,))
        return public(row, int(count))

    async def row(self, repo_id: str, db: Database | Tx | None = None) -> dict[str, Any]:
        row = await (db or self.db).fetchone("SELECT * FROM backup_repositories WHERE id = ?", (repo_id,))
        if row is None:
            raise NotFound("repository not found", f"backup repository {repo_id!r} does not exist")
        return row

    # -- the calls -----------------------------------------------------------------------------------

    async def create(self, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        target = self.validate(fields["type"], fields["config"])
        repo_id = f"repo-{secrets.token_hex(6)}"
        async with self.db.transaction() as tx:  # refuse a taken name before mounting anything
            await self._name_free(tx, fields["name"])
        root = await self._prepare(target, repo_id)
        try:
            capacity = await self.fs.capacity(root)
            now = utcnow()
            sealed = self.box.seal(target.password, purpose=PURPOSE) if target.type == "cifs" else None
            async with self.db.transaction() as tx:
                await self._name_free(tx, fields["name"])
                await self._root_free(tx, root)
                await tx.execute(
                    "INSERT INTO backup_repositories (id, name, type, enabled, config, secret_sealed, root_path, "
                    "is_immutable, min_retention_days, description, created_by, created_at, updated_at, "
                    "total_bytes, used_bytes, available_bytes, last_check_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (repo_id, fields["name"], target.type, int(fields.get("enabled", True)), json.dumps(target.config),
                     sealed, str(root), int(fields.get("is_immutable", False)),
                     int(fields.get("min_retention_days", 0)), fields.get("description", ""), actor, now, now,
                     capacity.total_bytes, capacity.used_bytes, capacity.available_bytes, now))
                await self.audit.record(actor, "repository.create", f"repository:{repo_id}", tx=tx,
                                        name=fields["name"], type=target.type, root=str(root))
        except BaseException:
            if target.remote:
                await self._unmount_quietly(root)
            raise
        log.info("repository %s (%s) created at %s", fields["name"], target.type, root, extra={"resource": repo_id})
        return await self.get(repo_id)

    async def test(self, type: str, config: dict[str, Any]) -> dict[str, Any]:
        """Try a configuration without saving it: a directory must be writable, a share mountable and writable."""
        started = utcnow()
        try:
            target = self.validate(type, config)
            root = await self._prepare(target, f"test-{secrets.token_hex(4)}", probe_only=True)
            try:
                capacity = await self.fs.capacity(root)
            finally:
                if target.remote:
                    await self._unmount_quietly(root)
        except OmaError as e:
            return {"success": False, "message": e.message, "error": {"error": e.message, "details": e.details,
                                                                      "code": e.code}, "tested_at": started}
        return {"success": True, "message": f"{target.type} repository at {root} is usable", "tested_at": started,
                "storage_info": {"total_bytes": capacity.total_bytes, "used_bytes": capacity.used_bytes,
                                 "available_bytes": capacity.available_bytes,
                                 "mount_point": None if target.remote else str(root)}}

    async def storage(self, repo_id: str) -> dict[str, Any]:
        """A fresh capacity check (statvfs of the root), remembered with the repository."""
        row = await self.row(repo_id)
        now = utcnow()
        try:
            root = await self._ready(row)
            capacity = await self.fs.capacity(root)
        except OmaError as e:
            await self.db.execute("UPDATE backup_repositories SET last_check_at = ?, last_check_error = ? "
                                  "WHERE id = ?", (now, str(e), repo_id))
            raise
        await self.db.execute(
            "UPDATE backup_repositories SET total_bytes = ?, used_bytes = ?, available_bytes = ?, last_check_at = ?, "
            "last_check_error = NULL WHERE id = ?",
            (capacity.total_bytes, capacity.used_bytes, capacity.available_bytes, now, repo_id))
        return {"repository_id": repo_id, "total_bytes": capacity.total_bytes, "used_bytes": capacity.used_bytes,
                "available_bytes": capacity.available_bytes, "mount_point": str(root), "last_check_at": now}

    async def delete(self, repo_id: str, *, actor: str) -> dict[str, Any]:
        async with self.db.transaction() as tx:
            row = await self.row(repo_id, tx)
            count = int(await tx.scalar("SELECT COUNT(*) FROM backup_jobs WHERE repository_id = ?", (repo_id,)))
            if count:
                raise Conflict("repository has backups",
                               f"repository {row['name']!r} holds {count} backup(s); delete them first",
                               backup_count=count)
            await tx.execute("DELETE FROM backup_repositories WHERE id = ?", (repo_id,))
            await self.audit.record(actor, "repository.delete", f"repository:{repo_id}", tx=tx, name=row["name"],
                                    type=row["type"])
        if row["type"] != "local":
            await self._unmount_quietly(Path(row["root_path"]))
        return {"message": f"repository {row['name']!r} deleted", "repository_id": repo_id}

    async def ready_root(self, repo_id: str, db: Database | Tx | None = None) -> tuple[dict[str, Any], Path]:
        """The repository (which must be enabled) and its root, mounted and writable, for a backup."""
        row = await self.row(repo_id, db)
        if not row["enabled"]:
            raise Invalid("repository disabled", f"backup repository {row['name']!r} is disabled")
        return row, await self._ready(row)

    @staticmethod
    def root_of(row: dict[str, Any]) -> Path:
        """Where a repository's images are (no check: for reading and removing known files)."""
        return Path(row["root_path"])

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

    async def _prepare(self, target: Target, name: str, *, probe_only: bool = False) -> Path:
        """Make a new configuration's root usable: mount a share (at a chosen point when none was given)."""
        if not target.remote:
            root = Path(target.config["disk_path"])
            await self.fs.probe_writable(root)
            return root
        if probe_only or not target.config.get("mount_point"):
            mount_root = (await self.agent.share_mounts())["mount_root"]
            point = f"{mount_root}/{name}"
            if not probe_only:
                target.config["mount_point"] = point
        else:
            point = target.config["mount_point"]
        await self._mount(target.type, target.config, target.password, point)
        try:
            await self.fs.probe_writable(Path(point))
        except BaseException:
            await self._unmount_quietly(Path(point))
            raise
        return Path(point)

    async def _ready(self, row: dict[str, Any]) -> Path:
        root = Path(row["root_path"])
        if row["type"] != "local":
            password = self.box.open(row["secret_sealed"], purpose=PURPOSE) if row["secret_sealed"] else ""
            await self._mount(row["type"], json.loads(row["config"]), password, str(root))
        await self.fs.probe_writable(root)
        return root

    async def _mount(self, kind: str, config: dict[str, Any], password: str, point: str) -> None:
        share: dict[str, Any] = {"kind": kind, "server": config["server"], "mount_point": point,
                                 "options": config.get("options", [])}
        if kind == "nfs":
            share["export_path"] = config["export_path"]
        else:
            share.update(share_name=config["share_name"], username=config["username"], password=password,
                         domain=config.get("domain", ""))
        await self.agent.mount_share(share)

    async def _unmount_quietly(self, point: Path) -> None:
        try:
            await self.agent.unmount_share(str(point))
        except OmaError as e:
            log.warning("could not unmount %s: %s", point, e, extra={"resource": str(point)})

    @staticmethod
    async def _name_free(tx: Tx, name: str) -> None:
        if await tx.scalar("SELECT 1 FROM backup_repositories WHERE name = ?", (name,)):
            raise Conflict("repository exists", f"a backup repository named {name!r} already exists")

    @staticmethod
    async def _root_free(tx: Tx, root: Path) -> None:
        for row in await tx.fetchall("SELECT name, root_path FROM backup_repositories"):
            other = Path(row["root_path"])
            if other == root or other.is_relative_to(root) or root.is_relative_to(other):
                raise Conflict("path in use", f"{root} overlaps repository {row['name']!r} at {other}; "
                                              "repositories may not share or nest directories")
