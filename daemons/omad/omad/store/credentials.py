"""Saved vCenter logins (vmware_credentials): the password only sealed, at most one default, uses counted."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .base import Reader, get_or_404, name_free, record
from .db import Tx

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
    password_sealed: str = dataclasses.field(repr=False)  # SecretBox text (omad/crypto.py)


@dataclasses.dataclass(frozen=True)
class NewCredential:
    credential_name: str
    vcenter_host: str
    username: str
    password_sealed: str = dataclasses.field(repr=False)
    datacenter: str
    is_active: bool
    is_default: bool
    created_by: str


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


async def insert(tx: Tx, new: NewCredential, now: str) -> int:
    return await tx.execute(
        "INSERT INTO vmware_credentials (credential_name, vcenter_host, username, password_sealed, datacenter,"
        " is_active, is_default, created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (new.credential_name, new.vcenter_host, new.username, new.password_sealed, new.datacenter,
         int(new.is_active), int(new.is_default), new.created_by, now, now))


async def clear_default(tx: Tx, now: str, *, keep: int | None = None) -> None:
    """No credential is the default any more (but `keep`, if given)."""
    await tx.execute("UPDATE vmware_credentials SET is_default = 0, updated_at = ? WHERE is_default = 1 AND id IS NOT ?",
                     (now, keep))


async def update(tx: Tx, credential_id: int, changes: CredentialChanges, now: str) -> None:
    c = changes
    await tx.execute(
        "UPDATE vmware_credentials SET credential_name = COALESCE(?, credential_name), "
        "vcenter_host = COALESCE(?, vcenter_host), username = COALESCE(?, username), "
        "password_sealed = COALESCE(?, password_sealed), datacenter = COALESCE(?, datacenter), "
        "is_active = COALESCE(?, is_active), is_default = COALESCE(?, is_default), updated_at = ? WHERE id = ?",
        (c.credential_name, c.vcenter_host, c.username, c.password_sealed, c.datacenter,
         None if c.is_active is None else int(c.is_active), None if c.is_default is None else int(c.is_default),
         now, credential_id))


async def make_default(tx: Tx, credential_id: int, now: str) -> None:
    await clear_default(tx, now, keep=credential_id)
    await tx.execute("UPDATE vmware_credentials SET is_default = 1, updated_at = ? WHERE id = ?", (now, credential_id))


async def delete(tx: Tx, credential_id: int) -> None:
    await tx.execute("DELETE FROM vmware_credentials WHERE id = ?", (credential_id,))


async def count_use(tx: Tx, credential_id: int, now: str) -> None:
    await tx.execute("UPDATE vmware_credentials SET usage_count = usage_count + 1, last_used = ? WHERE id = ?",
                     (now, credential_id))
