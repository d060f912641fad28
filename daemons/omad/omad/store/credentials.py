"""Saved vCenter logins (vmware_credentials): the password only sealed (bound to its row), at most one default,
uses counted, and an optional pin of the vCenter's certificate."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .base import Reader, get_or_404, name_free, record
from .db import Writer

TRANSITIONS: tuple[str, ...] = ()  # no status column


@dataclasses.dataclass(frozen=True)
class Credential:
    """One saved login; the fields before password_sealed are what clients see, in their order."""

    id: int
    credential_name: str
    vcenter_host: str
    username: str
    datacenter: str
    is_active: bool
    is_default: bool
    created_by: str
    created_at: str
    updated_at: str
    last_used: str | None
    usage_count: int
    tls_thumbprint: str  # the pinned certificate's SHA-256 or SHA-1 (AA:BB:...), '' = the CA store decides
    password_sealed: str = dataclasses.field(repr=False)  # SecretBox text (omad/crypto.py), bound to `id`


@dataclasses.dataclass(frozen=True)
class NewCredential:
    credential_name: str
    vcenter_host: str
    username: str
    datacenter: str
    is_active: bool
    is_default: bool
    created_by: str
    tls_thumbprint: str = ""


@dataclasses.dataclass(frozen=True)
class CredentialChanges:
    """None keeps a column as it is."""

    credential_name: str | None = None
    vcenter_host: str | None = None
    username: str | None = None
    password_sealed: str | None = dataclasses.field(default=None, repr=False)
    datacenter: str | None = None
    is_active: bool | None = None
    is_default: bool | None = None
    tls_thumbprint: str | None = None  # '' removes the pin


def _credential(row: Mapping[str, Any]) -> Credential:
    return record(Credential, {**row, "is_active": bool(row["is_active"]), "is_default": bool(row["is_default"])})


async def all_by_name(db: Reader) -> list[Credential]:
    return [_credential(r) for r in await db.fetchall("SELECT * FROM vmware_credentials ORDER BY credential_name")]


async def get(db: Reader, credential_id: int) -> Credential:
    return _credential(await get_or_404(db, "SELECT * FROM vmware_credentials WHERE id = ?", (credential_id,),
                                        what="credential", ident=credential_id))


async def default(db: Reader) -> Credential | None:
    row = await db.fetchone("SELECT * FROM vmware_credentials WHERE is_default = 1")
    return _credential(row) if row is not None else None


async def ensure_name_free(db: Reader, name: str) -> None:
    await name_free(db, "SELECT 1 FROM vmware_credentials WHERE credential_name = ?", (name,), what="credential",
                    name=name)


async def insert(tx: Writer, new: NewCredential, now: str) -> int:
    """A new row without its password: the caller seals it for the returned id and sets it (`set_password`)
    in the same transaction."""
    return await tx.execute(
        "INSERT INTO vmware_credentials (credential_name, vcenter_host, username, password_sealed, datacenter,"
        " is_active, is_default, created_by, created_at, updated_at, tls_thumbprint)"
        " VALUES (?, ?, ?, '', ?, ?, ?, ?, ?, ?, ?)",
        (new.credential_name, new.vcenter_host, new.username, new.datacenter, int(new.is_active),
         int(new.is_default), new.created_by, now, now, new.tls_thumbprint))


async def set_password(tx: Writer, credential_id: int, password_sealed: str) -> None:
    """Store a password sealed for this row (a new one, or the same one resealed)."""
    await tx.execute("UPDATE vmware_credentials SET password_sealed = ? WHERE id = ?", (password_sealed, credential_id))


async def sealed_passwords(db: Reader) -> list[tuple[int, str]]:
    """(id, sealed password) of every credential."""
    return [(int(r["id"]), str(r["password_sealed"]))
            for r in await db.fetchall("SELECT id, password_sealed FROM vmware_credentials ORDER BY id")]


async def clear_default(tx: Writer, now: str, *, keep: int | None = None) -> None:
    """No credential is the default any more (but `keep`, if given)."""
    await tx.execute("UPDATE vmware_credentials SET is_default = 0, updated_at = ? WHERE is_default = 1 AND id IS NOT ?",
                     (now, keep))


async def update(tx: Writer, credential_id: int, changes: CredentialChanges, now: str) -> None:
    c = changes
    await tx.execute(
        "UPDATE vmware_credentials SET credential_name = COALESCE(?, credential_name), "
        "vcenter_host = COALESCE(?, vcenter_host), username = COALESCE(?, username), "
        "password_sealed = COALESCE(?, password_sealed), datacenter = COALESCE(?, datacenter), "
        "is_active = COALESCE(?, is_active), is_default = COALESCE(?, is_default), "
        "tls_thumbprint = COALESCE(?, tls_thumbprint), updated_at = ? WHERE id = ?",
        (c.credential_name, c.vcenter_host, c.username, c.password_sealed, c.datacenter,
         None if c.is_active is None else int(c.is_active), None if c.is_default is None else int(c.is_default),
         c.tls_thumbprint, now, credential_id))


async def make_default(tx: Writer, credential_id: int, now: str) -> None:
    await clear_default(tx, now, keep=credential_id)
    await tx.execute("UPDATE vmware_credentials SET is_default = 1, updated_at = ? WHERE id = ?", (now, credential_id))


async def delete(tx: Writer, credential_id: int) -> None:
    await tx.execute("DELETE FROM vmware_credentials WHERE id = ?", (credential_id,))


async def count_use(tx: Writer, credential_id: int, now: str) -> None:
    await tx.execute("UPDATE vmware_credentials SET usage_count = usage_count + 1, last_used = ? WHERE id = ?",
                     (now, credential_id))
