"""The CloudStack networks and service offerings a saved config may use; network names resolved to ids."""

from __future__ import annotations

import logging

from oma_common.errors import Conflict, NotFound

from ..clients.cloudstack import CloudStack, Client, Network, ServiceOffering
from .config import Configs

log = logging.getLogger(__name__)


class Networks:
    def __init__(self, configs: Configs, cloudstack: CloudStack) -> None:
        self.configs = configs
        self.cloudstack = cloudstack

    async def client(self, config_id: int | None = None) -> tuple[Client, str]:
        """A client for a saved config (the default one when None), and that config's zone."""
        c = await self.configs.stored(config_id)
        return self.cloudstack.client(self.configs.endpoint_of(c)), c.zone

    async def available(self, config_id: int | None = None, zone_id: str | None = None) -> list[Network]:
        client, _ = await self.client(config_id)
        networks = await client.networks(listall=True)
        return [n for n in networks if not zone_id or n.zone_id == zone_id]

    async def find(self, network_id: str, config_id: int | None = None) -> Network | None:
        return next((n for n in await self.available(config_id) if n.id == network_id), None)

    async def resolve(self, name: str, *, zone_id: str | None = None, config_id: int | None = None) -> Network:
        """The one network called `name` (in `zone_id`, else preferring the config's zone)."""
        client, config_zone = await self.client(config_id)
        named = [n for n in await client.networks(listall=True) if n.name == name]
        if zone_id:
            named = [n for n in named if n.zone_id == zone_id]
        elif len(named) > 1 and config_zone:
            named = [n for n in named if n.zone_id == config_zone] or named
        if not named:
            raise NotFound("network not found", f"CloudStack has no network named {name!r}"
                                                + (f" in zone {zone_id}" if zone_id else ""))
        if len(named) > 1:
            raise Conflict("network name ambiguous", f"{len(named)} CloudStack networks are named {name!r} "
                                                     f"(ids {', '.join(n.id for n in named)}); give zone_id",
                           network_ids=[n.id for n in named])
        return named[0]

    async def service_offerings(self, config_id: int | None = None) -> list[ServiceOffering]:
        client, _ = await self.client(config_id)
        return await client.service_offerings()
