"""Saved CloudStack configs: the secret key sealed at rest and never returned, one default for new VMs."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from oma_common.errors import Conflict, Invalid

from ..audit import Audit
from ..clients.cloudstack import Endpoint, normalise_api_url
from ..crypto import SecretBox, reseal_all
from ..store import ossea
from ..store.db import Database
from ..store.ossea import OsseaConfig

log = logging.getLogger(__name__)

PURPOSE = "ossea_configs.secret_key"
# What a client sets; `secret_key` goes in and is sealed, never out.
SETTABLE = ("name", "api_url", "api_key", "secret_key", "zone", "domain", "oma_vm_id", "template_id", "network_id",
            "service_offering_id", "disk_offering_id")
REQUIRED = ("name", "api_url", "api_key", "secret_key", "zone", "oma_vm_id")


@dataclasses.dataclass(frozen=True)
class Connection:
    """How a settings call reaches CloudStack: given credentials, a saved config, or both (given fields win).

    The stored secret is only ever sent to its own config's URL with its own key: a caller who wants another
    URL or key gives the secret too.
    """

    api_url: str | None = None
    api_key: str | None = None
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    config_id: int | None = None


def public(c: OsseaConfig) -> dict[str, Any]:
    """A config as clients see it: everything but the secret, which is only said to be set."""
    out = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "secret_key_sealed"}
    out["secret_key_set"] = bool(c.secret_key_sealed)
    return out


class Configs:
    def __init__(self, db: Database, audit: Audit, box: SecretBox) -> None:
        self.db = db
        self.audit = audit
        self.box = box

    async def list(self) -> list[dict[str, Any]]:
        return [public(c) for c in await ossea.list_all(self.db)]

    async def get(self, config_id: int) -> dict[str, Any]:
        return public(await ossea.get(self.db, config_id))

    async def stored(self, config_id: int | None = None) -> OsseaConfig:
        """A saved config by id, or the default one; Conflict when none is saved."""
        if config_id is not None:
            return await ossea.get(self.db, config_id)
        found = await ossea.default(self.db)
        if found is None:
            raise Conflict("no CloudStack config", "no CloudStack configuration is saved yet; create one first "
                                                   "(POST /ossea/config or /ossea/config-streamlined)")
        return found

    async def default(self) -> OsseaConfig | None:
        return await ossea.default(self.db)

    def endpoint_of(self, c: OsseaConfig) -> Endpoint:
        return Endpoint(c.api_url, c.api_key, self.box.open(c.secret_key_sealed, purpose=PURPOSE, row=c.id))

    async def reseal_unbound(self) -> int:
        """Seal again, bound to its row, every secret key sealed in the first format; how many were."""
        return await reseal_all(self.db, self.box, PURPOSE, ossea.sealed_secrets, ossea.set_secret)

    async def endpoint(self, conn: Connection) -> tuple[Endpoint, OsseaConfig | None]:
        """The endpoint a settings call uses, and the saved config it came from (if any)."""
        url = normalise_api_url(conn.api_url) if conn.api_url else None
        if conn.secret_key and url and conn.api_key:
            base = await self.stored(conn.config_id) if conn.config_id is not None else None
            return Endpoint(url, conn.api_key, conn.secret_key), base
        if conn.config_id is None and await ossea.default(self.db) is None:
            missing = [n for n, v in (("api_url", url), ("api_key", conn.api_key), ("secret_key", conn.secret_key))
                       if not v]
            raise Invalid("CloudStack credentials missing", f"give {', '.join(missing)} (no CloudStack "
                                                            "configuration is saved to take them from)")
        base = await self.stored(conn.config_id)
        if conn.secret_key:
            return Endpoint(url or base.api_url, conn.api_key or base.api_key, conn.secret_key), base
        if (url and url != base.api_url) or (conn.api_key and conn.api_key != base.api_key):
            raise Invalid("secret key required", f"the saved secret of {base.name!r} is only used with its own "
                                                 "api_url and api_key; give secret_key to use others")
        return self.endpoint_of(base), base

    # -- changes ------------------------------------------------------------------------------------------

    @staticmethod
    def _values(fields: dict[str, str]) -> tuple[dict[str, str], str | None]:
        """Client fields → stored columns (URL normalised, text trimmed), and the secret (sealed once the row's id
        is known)."""
        values = {k: v.strip() if k != "secret_key" else v for k, v in fields.items() if k in SETTABLE}
        if "api_url" in values:
            values["api_url"] = normalise_api_url(values["api_url"])
        return values, values.pop("secret_key", None)

    async def create(self, fields: dict[str, str], *, make_default: bool, actor: str) -> dict[str, Any]:
        missing = [f for f in REQUIRED if not (fields.get(f) or "").strip()]
        if missing:
            raise Invalid("CloudStack config incomplete", f"a new config needs {', '.join(missing)}", missing=missing)
        values, secret = self._values(fields)
        async with self.db.transaction() as tx:
            new_id = await ossea.create(tx, values, make_default=make_default, actor=actor)
            await ossea.set_secret(tx, new_id, self.box.seal(secret or "", purpose=PURPOSE, row=new_id))
            await self.audit.record(actor, "ossea_config.create", f"ossea_config:{new_id}", tx=tx, name=values["name"],
                                    api_url=values["api_url"], zone=values.get("zone", ""))
        log.info("CloudStack config %d (%s) created for %s", new_id, values["name"], values["api_url"])
        return await self.get(new_id)

    async def update(self, config_id: int, fields: dict[str, str], *, make_default: bool,
                     actor: str) -> dict[str, Any]:
        """Change the given fields; an absent or empty secret keeps the stored one."""
        fields = {k: v for k, v in fields.items() if not (k == "secret_key" and not v)}
        for f in REQUIRED:
            if f in fields and not fields[f].strip():
                raise Invalid("CloudStack config incomplete", f"{f} cannot be emptied")
        values, secret = self._values(fields)
        if secret is not None:
            values["secret_key_sealed"] = self.box.seal(secret, purpose=PURPOSE, row=config_id)
        async with self.db.transaction() as tx:
            old = await ossea.update(tx, config_id, values)
            if make_default:
                await ossea.set_default(tx, config_id)
            changed = sorted("secret_key" if k == "secret_key_sealed" else k for k, v in values.items()
                             if k == "secret_key_sealed" or getattr(old, k) != v)
            await self.audit.record(actor, "ossea_config.update", f"ossea_config:{config_id}", tx=tx,
                                    changed=changed + (["is_default"] if make_default and not old.is_default else []))
        return await self.get(config_id)

    async def save_named(self, fields: dict[str, str], *, actor: str) -> dict[str, Any]:
        """Create the config named `fields["name"]`, or update it; either way it becomes the default."""
        existing = await ossea.by_name(self.db, fields["name"])
        if existing is None:
            return await self.create(fields, make_default=True, actor=actor)
        return await self.update(existing.id, fields, make_default=True, actor=actor)

    async def delete(self, config_id: int, *, actor: str) -> None:
        async with self.db.transaction() as tx:
            users = await ossea.contexts_using(tx, config_id)
            c = await ossea.get(tx, config_id)
            if users:
                raise Conflict("CloudStack config in use", f"{users} VM context(s) replicate with {c.name!r}; "
                                                           "move them to another config first", contexts=users)
            await ossea.delete(tx, config_id)
            await self.audit.record(actor, "ossea_config.delete", f"ossea_config:{config_id}", tx=tx, name=c.name)
        log.info("CloudStack config %d (%s) deleted", config_id, c.name)
