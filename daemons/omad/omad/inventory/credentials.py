"""Saved vCenter credentials: passwords sealed at rest (bound to their row) and never returned, one default, usage
counted, and an optional pin of the vCenter's certificate that every login with the credential checks."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound

from ..audit import Audit
from ..clients.vcenter import VCenter, normalise_thumbprint, parse_address
from ..crypto import SecretBox, reseal_all
from ..store import contexts
from ..store import credentials as store
from ..store.credentials import Credential, CredentialChanges, NewCredential
from ..store.db import Database, utcnow

log = logging.getLogger(__name__)

PURPOSE = "vmware_credentials.password"


@dataclasses.dataclass(frozen=True)
class VCenterLogin:
    """Everything a discovery needs to log in to a vCenter through the VMA."""

    vcenter: str
    username: str
    password: str = dataclasses.field(repr=False)
    datacenter: str
    credential_id: int | None = None
    thumbprint: str = ""  # the credential's pin of the vCenter's certificate, '' = none

    def pin(self) -> dict[str, str]:
        """What a VMA request adds so that the VMA's vCenter session pins the certificate too."""
        return {"vcenter_thumbprint": self.thumbprint} if self.thumbprint else {}


def public(c: Credential) -> dict[str, Any]:
    """A credential as clients see it: the password only as `password_set`."""
    out = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "password_sealed"}
    out["password_set"] = True
    return out


class Credentials:
    def __init__(self, db: Database, audit: Audit, box: SecretBox, vcenter: VCenter) -> None:
        self.db = db
        self.audit = audit
        self.box = box
        self.vcenter = vcenter

    async def list(self) -> list[dict[str, Any]]:
        return [public(c) for c in await store.all_by_name(self.db)]

    async def get(self, credential_id: int) -> dict[str, Any]:
        return public(await store.get(self.db, credential_id))

    async def default(self) -> dict[str, Any]:
        c = await store.default(self.db)
        if c is None:
            raise NotFound("no default credential", "no VMware credential is set as the default")
        return public(c)

    async def create(self, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        parse_address(fields["vcenter_host"])
        if fields.get("is_default") and not fields.get("is_active", True):
            raise Invalid("inactive default", "an inactive credential cannot be the default")
        new = NewCredential(credential_name=fields["credential_name"], vcenter_host=fields["vcenter_host"],
                            username=fields["username"], datacenter=fields.get("datacenter", ""),
                            is_active=bool(fields.get("is_active", True)),
                            is_default=bool(fields.get("is_default", False)), created_by=actor,
                            tls_thumbprint=_pin(fields.get("tls_thumbprint")) or "")
        now = utcnow()
        async with self.db.transaction() as tx:
            await store.ensure_name_free(tx, new.credential_name)
            if new.is_default:
                await store.clear_default(tx, now)
            new_id = await store.insert(tx, new, now)
            await store.set_password(tx, new_id, self.box.seal(fields["password"], purpose=PURPOSE, row=new_id))
            await self.audit.record(actor, "vmware_credential.create", f"vmware_credential:{new_id}", tx=tx,
                                    credential_name=new.credential_name, vcenter_host=new.vcenter_host,
                                    username=new.username, is_default=new.is_default,
                                    tls_thumbprint=new.tls_thumbprint)
        return await self.get(new_id)

    async def update(self, credential_id: int, fields: dict[str, Any], *, actor: str) -> dict[str, Any]:
        """Change the given fields; an absent or empty password keeps the stored one."""
        if "vcenter_host" in fields:
            parse_address(fields["vcenter_host"])
        changes = {k: v for k, v in fields.items() if k != "password" and k in _UPDATABLE}
        if "tls_thumbprint" in changes:
            changes["tls_thumbprint"] = _pin(changes["tls_thumbprint"])
        if fields.get("password"):
            changes["password_sealed"] = self.box.seal(fields["password"], purpose=PURPOSE, row=credential_id)
        now = utcnow()
        async with self.db.transaction() as tx:
            old = await store.get(tx, credential_id)
            if changes.get("credential_name") is not None and changes["credential_name"] != old.credential_name:
                await store.ensure_name_free(tx, changes["credential_name"])
            active = changes["is_active"] if changes.get("is_active") is not None else old.is_active
            if changes.get("is_default") and not active:
                raise Invalid("inactive default", "an inactive credential cannot be the default")
            if not active:
                changes["is_default"] = False  # deactivating the default leaves no default
            if changes.get("is_default") and not old.is_default:
                await store.clear_default(tx, now)
            new = CredentialChanges(**changes)
            await store.update(tx, credential_id, new, now)
            changed = sorted("password" if c == "password_sealed" else c for c in _UPDATABLE
                             if getattr(new, c) is not None
                             and (c == "password_sealed" or getattr(old, c) != getattr(new, c)))
            await self.audit.record(actor, "vmware_credential.update", f"vmware_credential:{credential_id}", tx=tx,
                                    changed=changed)
        return await self.get(credential_id)

    async def delete(self, credential_id: int, *, actor: str) -> None:
        async with self.db.transaction() as tx:
            old = await store.get(tx, credential_id)
            users = await contexts.using_credential(tx, credential_id)
            if users:
                raise Conflict("credential in use", f"{users} VM context(s) use credential {old.credential_name!r};"
                                                    " change them or update this credential instead", contexts=users)
            await store.delete(tx, credential_id)
            await self.audit.record(actor, "vmware_credential.delete", f"vmware_credential:{credential_id}", tx=tx,
                                    credential_name=old.credential_name)

    async def set_default(self, credential_id: int, *, actor: str) -> dict[str, Any]:
        async with self.db.transaction() as tx:
            c = await store.get(tx, credential_id)
            if not c.is_active:
                raise Conflict("credential inactive", f"credential {c.credential_name!r} is inactive; "
                                                      "activate it before making it the default")
            await store.make_default(tx, credential_id, utcnow())
            await self.audit.record(actor, "vmware_credential.set_default", f"vmware_credential:{credential_id}",
                                    tx=tx, credential_name=c.credential_name)
        return await self.get(credential_id)

    async def test(self, credential_id: int) -> dict[str, Any]:
        """Log in to the vCenter with the stored password, checking its certificate against the credential's pin
        (or the CA store); the answer says why it failed and, for an untrusted certificate, its thumbprint."""
        c = await store.get(self.db, credential_id)
        password = self.box.open(c.password_sealed, purpose=PURPOSE, row=c.id)
        result = await self.vcenter.test_login(c.vcenter_host, c.username, password, thumbprint=c.tls_thumbprint)
        log.info("credential %d test on %s: %s (%d ms)", credential_id, c.vcenter_host, result.reason,
                 result.elapsed_ms)
        return {"success": result.success, "reason": result.reason, "message": result.message,
                "credential_id": credential_id, "vcenter_host": c.vcenter_host, "server": result.server,
                "elapsed_ms": result.elapsed_ms, "tested_at": utcnow(), "thumbprint": result.thumbprint,
                "pinned": bool(c.tls_thumbprint)}

    async def reseal_unbound(self) -> int:
        """Seal again, bound to its row, every password sealed in the first format; how many were."""
        return await reseal_all(self.db, self.box, PURPOSE, store.sealed_passwords, store.set_password)

    async def login_for(self, credential_id: int | None) -> VCenterLogin:
        """The login of a saved credential (the default one when `credential_id` is None); counts the use."""
        if credential_id is None:
            found = await store.default(self.db)
            if found is None:
                raise Invalid("no vCenter given", "send credential_id or vcenter/username/password; "
                                                  "no default VMware credential is set")
            c = found
        else:
            c = await store.get(self.db, credential_id)
        if not c.is_active:
            raise Invalid("credential inactive", f"credential {c.credential_name!r} is inactive")
        password = self.box.open(c.password_sealed, purpose=PURPOSE, row=c.id)
        async with self.db.transaction() as tx:
            await store.count_use(tx, c.id, utcnow())
        return VCenterLogin(c.vcenter_host, c.username, password, c.datacenter, c.id, c.tls_thumbprint)


def _pin(text: str | None) -> str | None:
    """A thumbprint as stored (AA:BB:..., 64 hex digits); '' removes a pin, None keeps it."""
    return normalise_thumbprint(text) if text else text


_UPDATABLE = tuple(f.name for f in dataclasses.fields(CredentialChanges))
