"""ossea_configs: saved CloudStack connections (the secret only sealed), one of them the default."""

from __future__ import annotations

import dataclasses

from .base import Reader, get_or_404, name_free, record
from .db import utcnow, Writer

# Columns a caller may change; the secret travels sealed.
FIELDS = ("name", "api_url", "api_key", "secret_key_sealed", "domain", "zone", "oma_vm_id", "template_id",
          "network_id", "service_offering_id", "disk_offering_id")


@dataclasses.dataclass(frozen=True)
class OsseaConfig:
    id: int
    name: str
    api_url: str
    api_key: str
    secret_key_sealed: str = dataclasses.field(repr=False)
    domain: str
    zone: str
    oma_vm_id: str
    template_id: str
    network_id: str
    service_offering_id: str
    disk_offering_id: str
    is_default: bool
    created_by: str
    created_at: str
    updated_at: str


def _config(row: dict[str, object]) -> OsseaConfig:
    return record(OsseaConfig, {**row, "is_default": bool(row["is_default"])})


async def list_all(db: Reader) -> list[OsseaConfig]:
    return [_config(r) for r in await db.fetchall("SELECT * FROM ossea_configs ORDER BY name")]


async def get(db: Reader, config_id: int) -> OsseaConfig:
    return _config(await get_or_404(db, "SELECT * FROM ossea_configs WHERE id = ?", (config_id,),
                                    what="CloudStack config", ident=config_id))


async def by_name(db: Reader, name: str) -> OsseaConfig | None:
    row = await db.fetchone("SELECT * FROM ossea_configs WHERE name = ?", (name,))
    return _config(row) if row is not None else None


async def default(db: Reader) -> OsseaConfig | None:
    row = await db.fetchone("SELECT * FROM ossea_configs WHERE is_default = 1")
    return _config(row) if row is not None else None


async def create(tx: Writer, values: dict[str, str], *, make_default: bool, actor: str) -> int:
    """Insert a config (`values` holds FIELDS); the first one, or one asked to be, becomes the default."""
    await name_free(tx, "SELECT 1 FROM ossea_configs WHERE name = ?", (values["name"],), what="CloudStack config",
                    name=values["name"])
    if not await tx.scalar("SELECT 1 FROM ossea_configs WHERE is_default = 1"):
        make_default = True
    now = utcnow()
    if make_default:
        await tx.execute("UPDATE ossea_configs SET is_default = 0, updated_at = ? WHERE is_default = 1", (now,))
    return await tx.execute(
        f"INSERT INTO ossea_configs ({', '.join(FIELDS)}, is_default, created_by, created_at, updated_at) "
        f"VALUES ({', '.join('?' for _ in FIELDS)}, ?, ?, ?, ?)",
        (*(values.get(f, "") for f in FIELDS), int(make_default), actor, now, now))


async def update(tx: Writer, config_id: int, changes: dict[str, str]) -> OsseaConfig:
    """Change the given FIELDS of a config; returns it as it was before."""
    old = await get(tx, config_id)
    if "name" in changes and changes["name"] != old.name:
        await name_free(tx, "SELECT 1 FROM ossea_configs WHERE name = ?", (changes["name"],),
                        what="CloudStack config", name=changes["name"])
    new = {f: changes.get(f, getattr(old, f)) for f in FIELDS}
    await tx.execute(f"UPDATE ossea_configs SET {', '.join(f'{f} = ?' for f in FIELDS)}, updated_at = ? WHERE id = ?",
                     (*(new[f] for f in FIELDS), utcnow(), config_id))
    return old


async def set_secret(tx: Writer, config_id: int, secret_key_sealed: str) -> None:
    """Store a secret key sealed for this row (a new config's, or one resealed)."""
    await tx.execute("UPDATE ossea_configs SET secret_key_sealed = ? WHERE id = ?", (secret_key_sealed, config_id))


async def sealed_secrets(db: Reader) -> list[tuple[int, str]]:
    """(id, sealed secret key) of every config."""
    return [(int(r["id"]), str(r["secret_key_sealed"]))
            for r in await db.fetchall("SELECT id, secret_key_sealed FROM ossea_configs ORDER BY id")]


async def set_default(tx: Writer, config_id: int) -> None:
    await get(tx, config_id)
    now = utcnow()
    await tx.execute("UPDATE ossea_configs SET is_default = 0, updated_at = ? WHERE is_default = 1 AND id != ?",
                     (now, config_id))
    await tx.execute("UPDATE ossea_configs SET is_default = 1, updated_at = ? WHERE id = ?", (now, config_id))


async def contexts_using(db: Reader, config_id: int) -> int:
    """How many VM contexts replicate with this config."""
    return int(await db.scalar("SELECT COUNT(*) FROM vm_replication_contexts WHERE ossea_config_id = ?",
                               (config_id,)) or 0)


async def delete(tx: Writer, config_id: int) -> OsseaConfig:
    old = await get(tx, config_id)
    await tx.execute("DELETE FROM ossea_configs WHERE id = ?", (config_id,))
    return old
