"""Saved vCenter credentials: passwords sealed at rest and never returned, one default, usage counted."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound

from ..audit import Audit
from ..clients.vcenter import VCenter, parse_address
from ..crypto import SecretBox
from ..store.db import Database, Tx, utcnow

log = logging.getLogger(__name__)

PURPOSE = "vmware_credentials.password"
_PUBLIC_COLUMNS = ("id, credential_name, vcenter_host, username, datacenter, is_active, is_default, created_by, "
                   "created_at, updated_at, last_used, usage_count")


@dataclasses.dataclass(frozen=True)
class VCenterLogin:
    """Everything a discovery needs to log in to a vCenter through the VMA."""

    vcenter: str
    username: str
    password: str = dataclasses.field(repr=False)
    datacenter: str
    credential_id: int | None = None


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A credential as clients see it: flags as booleans, the password only as `password_set`."""
    out = dict(row)
    out.pop("password_sealed", None)
    out["is_active"] = bool(out["is_active"])
    out["is_default"] = bool(out["is_default"])
    out["password_set"] = True
    return out


class Credentials:
    def __init__(self, db: Database, audit: Audit, box: SecretBox, vcenter: VCenter) -> None:
        self.db = db
        self.audit = audit
        self.box = box
        self.vcenter = vcenter

    async def list(self) -> list[dict[str, Any]]:
        rows = await self.db.fetchall(f"SELECT {_PUBLIC_COLUMNS} FROM vmware_credentials ORDER BY credential_name")
        return [public(r) for r in rows]

    async def get(self, credential_id: int) -> dict[str, Any]:
        return public(await self._row(self.db, credential_id))

    async def default(self) -> dict[str, Any]:
        row = await self.db.fetchone(f"SELECT {_PUBLIC_COLUMNS} FROM vmware_credentials WHERE is_default = 1")
        if row is None:
            raise NotFound("no default credential", "no VMware credential is set as the default")
        return public(row)

    async def create(self, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        parse_address(fields["vcenter_host"])
        if fields.get("is_default") and not fields.get("is_active", True):
            raise Invalid("inactive default", "an inactive credential cannot be the default")
        sealed = self.box.seal(fields["password"], purpose=PURPOSE)
        now = utcnow()
        async with self.db.transaction() as tx:
            await self._name_free(tx, fields["credential_name"])
            if fields.get("is_default"):
                await tx.execute("UPDATE vmware_credentials SET is_default = 0, updated_at = ? WHERE is_default = 1",
                                 (now,))
            new_id = await tx.execute(
                "INSERT INTO vmware_credentials (credential_name, vcenter_host, username, password_sealed, datacenter,"
                " is_active, is_default, created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (fields["credential_name"], fields["vcenter_host"], fields["username"], sealed,
                 fields.get("datacenter", ""), int(fields.get("is_active", True)), int(fields.get("is_default", False)),
                 actor, now, now))
            await self.audit.record(actor, "vmware_credential.create", f"vmware_credential:{new_id}", tx=tx,
                                    credential_name=fields["credential_name"], vcenter_host=fields["vcenter_host"],
                                    username=fields["username"], is_default=bool(fields.get("is_default")))
        return await self.get(new_id)

    async def update(self, credential_id: int, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        """Change the given fields; an absent or empty password keeps the stored one."""
        if "vcenter_host" in fields:
            parse_address(fields["vcenter_host"])
        changes = {k: v for k, v in fields.items() if k != "password"}
        if fields.get("password"):
            changes["password_sealed"] = self.box.seal(fields["password"], purpose=PURPOSE)
        now = utcnow()
        async with self.db.transaction() as tx:
            row = await self._row(tx, credential_id)
            if "credential_name" in changes and changes["credential_name"] != row["credential_name"]:
                await self._name_free(tx, changes["credential_name"])
            active = changes.get("is_active", bool(row["is_active"]))
            if changes.get("is_default") and not active:
                raise Invalid("inactive default", "an inactive credential cannot be the default")
            if not active:
                changes["is_default"] = False  # deactivating the default leaves no default
            if changes.get("is_default") and not row["is_default"]:
                await tx.execute("UPDATE vmware_credentials SET is_default = 0, updated_at = ? WHERE is_default = 1",
                                 (now,))
            new = {c: changes.get(c) for c in _UPDATABLE}
            new = {c: int(v) if isinstance(v, bool) else v for c, v in new.items()}
            # NULL keeps a column as it is.
            await tx.execute(
                "UPDATE vmware_credentials SET credential_name = COALESCE(?, credential_name), "
                "vcenter_host = COALESCE(?, vcenter_host), username = COALESCE(?, username), "
                "password_sealed = COALESCE(?, password_sealed), datacenter = COALESCE(?, datacenter), "
                "is_active = COALESCE(?, is_active), is_default = COALESCE(?, is_default), updated_at = ? WHERE id = ?",
                (*(new[c] for c in _UPDATABLE), now, credential_id))
            changed = sorted("password" if c == "password_sealed" else c for c, v in new.items()
                             if v is not None and (c == "password_sealed" or row[c] != v))
            await self.audit.record(actor, "vmware_credential.update", f"vmware_credential:{credential_id}", tx=tx,
                                    changed=changed)
        return await self.get(credential_id)

    async def delete(self, credential_id: int, *, actor: str) -> None:
        async with self.db.transaction() as tx:
            row = await self._row(tx, credential_id)
            users = await tx.scalar("SELECT COUNT(*) FROM vm_replication_contexts WHERE credential_id = ?",
                                    (credential_id,))
            if users:
                raise Conflict("credential in use", f"{users} VM context(s) use credential {row['credential_name']!r};"
                                                    " change them or update this credential instead", contexts=users)
            await tx.execute("DELETE FROM vmware_credentials WHERE id = ?", (credential_id,))
            await self.audit.record(actor, "vmware_credential.delete", f"vmware_credential:{credential_id}", tx=tx,
                                    credential_name=row["credential_name"])

    async def set_default(self, credential_id: int, *, actor: str) -> dict[str, Any]:
        async with self.db.transaction() as tx:
            row = await self._row(tx, credential_id)
            if not row["is_active"]:
                raise Conflict("credential inactive", f"credential {row['credential_name']!r} is inactive; "
                                                      "activate it before making it the default")
            now = utcnow()
            await tx.execute("UPDATE vmware_credentials SET is_default = 0, updated_at = ? "
                             "WHERE is_default = 1 AND id != ?", (now, credential_id))
            await tx.execute("UPDATE vmware_credentials SET is_default = 1, updated_at = ? WHERE id = ?",
                             (now, credential_id))
            await self.audit.record(actor, "vmware_credential.set_default", f"vmware_credential:{credential_id}",
                                    tx=tx, credential_name=row["credential_name"])
        return await self.get(credential_id)

    async def test(self, credential_id: int) -> dict[str, Any]:
        """Log in to the vCenter with the stored password; the answer says why it failed."""
        row = await self._row(self.db, credential_id)
        password = self.box.open(row["password_sealed"], purpose=PURPOSE)
        result = await self.vcenter.test_login(row["vcenter_host"], row["username"], password)
        log.info("credential %d test on %s: %s (%d ms)", credential_id, row["vcenter_host"], result.reason,
                 result.elapsed_ms)
        return {"success": result.success, "reason": result.reason, "message": result.message,
                "credential_id": credential_id, "vcenter_host": row["vcenter_host"], "server": result.server,
                "elapsed_ms": result.elapsed_ms, "tested_at": utcnow()}

    async def login_for(self, credential_id: int | None) -> VCenterLogin:
        """The login of a saved credential (the default one when `credential_id` is None); counts the use."""
        if credential_id is None:
            row = await self.db.fetchone("SELECT * FROM vmware_credentials WHERE is_default = 1")
            if row is None:
                raise Invalid("no vCenter given", "send credential_id or vcenter/username/password; "
                                                  "no default VMware credential is set")
        else:
            row = await self._row(self.db, credential_id)
        if not row["is_active"]:
            raise Invalid("credential inactive", f"credential {row['credential_name']!r} is inactive")
        password = self.box.open(row["password_sealed"], purpose=PURPOSE)
        await self.db.execute("UPDATE vmware_credentials SET usage_count = usage_count + 1, last_used = ? "
                              "WHERE id = ?", (utcnow(), row["id"]))
        return VCenterLogin(row["vcenter_host"], row["username"], password, row["datacenter"], row["id"])

    async def _row(self, db: Database | Tx, credential_id: int) -> dict[str, Any]:
        row = await db.fetchone("SELECT * FROM vmware_credentials WHERE id = ?", (credential_id,))
        if row is None:
            raise NotFound("credential not found", f"VMware credential {credential_id} does not exist")
        return row

    @staticmethod
    async def _name_free(tx: Tx, name: str) -> None:
        if await tx.scalar("SELECT 1 FROM vmware_credentials WHERE credential_name = ?", (name,)):
            raise Conflict("credential exists", f"a VMware credential named {name!r} already exists")


_UPDATABLE = ("credential_name", "vcenter_host", "username", "password_sealed", "datacenter", "is_active",
              "is_default")
