"""/network-mappings, /networks/*, /service-offerings/available: what failover plugs a VM's networks into."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common.errors import CALLS_OUT, Conflict, Invalid, NotFound, OmaError
from oma_common.schema import name_spec, spec
from oma_common.web import Auth, Call, route

from ..clients.cloudstack import Network, ServiceOffering
from ..cloudstack.mappings import MappingIn, Mappings
from ..cloudstack.networks import Networks
from ..store.network_mappings import NetworkMapping

_TAGS = ("network-mappings",)
# Reading CloudStack needs a saved config (NotFound by id, Conflict when none is saved) and may fail there.
_REACHES_CLOUDSTACK: tuple[type[OmaError], ...] = (NotFound, Conflict, *CALLS_OUT)
_CS_ID = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"
_VM = "{vm_id:[^/]+}"


@dataclasses.dataclass
class MappingBody:
    """One source network of a VM → a CloudStack network, for live (default) or test failover. Saving the same
    VM, source network and kind again replaces the destination."""

    vm_id: str = name_spec(min_length=1, max_length=512, description="the VM's name, VMware id or context id")
    source_network_name: str = name_spec(min_length=1, max_length=512,
                                         description="the VMware network of one of the VM's NICs")
    destination_network_id: str = spec(max_length=128, pattern=_CS_ID, description="a CloudStack network id")
    destination_network_name: str = name_spec("", max_length=512,
                                              description="informative; CloudStack's name is stored")
    is_test_network: bool = spec(False)
    vm_context_id: str | None = name_spec(None, min_length=1, max_length=512)


@dataclasses.dataclass
class MappingAnswer:
    success: bool
    message: str
    data: NetworkMapping


@dataclasses.dataclass
class MappingsAnswer:
    success: bool
    message: str
    data: list[NetworkMapping]


@dataclasses.dataclass
class KindStatus:
    """For one kind of failover: the VM's source networks mapped and not, and mappings of networks the VM no
    longer has (stale)."""

    mapped: list[str]
    unmapped: list[str]
    stale: list[str]
    complete: bool
    mappings: list[NetworkMapping]


@dataclasses.dataclass
class MappingStatus:
    vm_id: str
    vm_context_id: str
    source_networks: list[str]
    live: KindStatus
    test: KindStatus
    total_mappings: int
    live_mappings: int
    test_mappings: int
    has_mappings: bool
    mapping_complete: bool  # every source network has a live mapping


@dataclasses.dataclass
class StatusAnswer:
    success: bool
    message: str
    data: MappingStatus


@dataclasses.dataclass
class DeleteQuery:
    is_test_network: bool | None = spec(None, description="only the test (true) or live (false) mapping; "
                                                          "default: both")


@dataclasses.dataclass
class Deleted:
    success: bool
    message: str
    deleted: int


@dataclasses.dataclass
class NetworksQuery:
    zone_id: str | None = spec(None, max_length=128, pattern=_CS_ID)
    config_id: int | None = spec(None, min=1, max=2**53)


@dataclasses.dataclass
class ConfigQuery:
    config_id: int | None = spec(None, min=1, max=2**53)


@dataclasses.dataclass
class ResolveIn:
    network_name: str = name_spec(min_length=1, max_length=512)
    zone_id: str | None = spec(None, max_length=128, pattern=_CS_ID)
    config_id: int | None = spec(None, min=1, max=2**53)


@dataclasses.dataclass
class NetworksAnswer:
    success: bool
    message: str
    data: list[Network]


@dataclasses.dataclass
class Resolved:
    network_name: str
    network_id: str
    network: Network


@dataclasses.dataclass
class ResolveAnswer:
    success: bool
    message: str
    data: Resolved


@dataclasses.dataclass
class OfferingsAnswer:
    success: bool
    message: str
    data: list[ServiceOffering]


class NetworkMappingsApi:
    def __init__(self, mappings: Mappings, networks: Networks) -> None:
        self.mappings = mappings
        self.networks = networks

    @route("POST", "/network-mappings", errors=(*_REACHES_CLOUDSTACK, Invalid),
           body=MappingBody, response=MappingAnswer, status=201, auth=Auth.ADMIN,
           tags=_TAGS)
    async def create(self, call: Call) -> dict[str, Any]:
        """Map one of a VM's source networks to a CloudStack network (checked there) for live or test failover."""
        b: MappingBody = call.body
        mapping, created = await self.mappings.put(MappingIn(**dataclasses.asdict(b)), actor=call.actor)
        kind = "test" if b.is_test_network else "live"
        return {"success": True, "data": mapping,
                "message": f"{kind} mapping of {b.source_network_name!r} {'created' if created else 'updated'}"}

    @route("GET", "/network-mappings", response=MappingsAnswer, tags=_TAGS)
    async def list_all(self, call: Call) -> dict[str, Any]:
        """Every network mapping of every VM."""
        items = await self.mappings.list_all()
        return {"success": True, "message": f"{len(items)} network mapping(s)", "data": items}

    @route("GET", f"/network-mappings/{_VM}/status", errors=(NotFound,), response=StatusAnswer, tags=_TAGS)
    async def status(self, call: Call) -> dict[str, Any]:
        """Which of the VM's source networks are mapped, for live and for test failover."""
        data = await self.mappings.status(call.params["vm_id"])
        return {"success": True, "data": data,
                "message": "every source network has a live mapping" if data["mapping_complete"]
                else f"{len(data['live']['unmapped'])} source network(s) without a live mapping"}

    @route("GET", f"/network-mappings/{_VM}", errors=(NotFound,), response=MappingsAnswer, tags=_TAGS)
    async def of_vm(self, call: Call) -> dict[str, Any]:
        """The network mappings of one VM (by name, VMware id or context id)."""
        items = await self.mappings.of_vm(call.params["vm_id"])
        return {"success": True, "message": f"{len(items)} network mapping(s)", "data": items}

    # A source network name may hold "/" (the rest of the path); "status" is not one, so that .../status is
    # only the GET above and the path's Allow header says exactly that.
    @route("DELETE", f"/network-mappings/{_VM}/{{source_network_name:(?!status$).+}}", errors=(NotFound,),
           query=DeleteQuery, response=Deleted,
           auth=Auth.ADMIN, tags=_TAGS)
    async def delete(self, call: Call) -> dict[str, Any]:
        """Remove the mapping(s) of one source network of a VM; 404 when there is none."""
        source = call.params["source_network_name"]
        gone = await self.mappings.delete(call.params["vm_id"], source, call.query.is_test_network, actor=call.actor)
        return {"success": True, "message": f"{gone} mapping(s) of {source!r} deleted", "deleted": gone}

    @route("GET", "/networks/available", errors=_REACHES_CLOUDSTACK,
           query=NetworksQuery, response=NetworksAnswer, tags=_TAGS)
    async def available(self, call: Call) -> dict[str, Any]:
        """CloudStack's networks (of the default config, or `config_id`'s), optionally of one zone."""
        items = await self.networks.available(call.query.config_id, call.query.zone_id)
        return {"success": True, "message": f"{len(items)} network(s)", "data": items}

    @route("POST", "/networks/resolve", errors=_REACHES_CLOUDSTACK, body=ResolveIn, response=ResolveAnswer, tags=_TAGS)
    async def resolve(self, call: Call) -> dict[str, Any]:
        """The id of the CloudStack network with this name; 404 when none, 409 when several (give zone_id)."""
        b: ResolveIn = call.body
        net = await self.networks.resolve(b.network_name, zone_id=b.zone_id, config_id=b.config_id)
        return {"success": True, "message": f"network {b.network_name!r} is {net.id}",
                "data": {"network_name": b.network_name, "network_id": net.id, "network": net}}

    @route("GET", "/service-offerings/available", errors=_REACHES_CLOUDSTACK,
           query=ConfigQuery, response=OfferingsAnswer, tags=_TAGS)
    async def service_offerings(self, call: Call) -> dict[str, Any]:
        """CloudStack's service offerings (of the default config, or `config_id`'s)."""
        items = await self.networks.service_offerings(call.query.config_id)
        return {"success": True, "message": f"{len(items)} service offering(s)", "data": items}
