"""/ossea/* and /settings/cloudstack/*: saved CloudStack configs (secrets in, never out) and the setup flows."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from oma_common.errors import CALLS_OUT, Conflict, Invalid, NotFound, OmaError
from oma_common.schema import name_spec, spec
from oma_common.web import Auth, Call, now_rfc3339, route

from ..clients.cloudstack import Network
from ..cloudstack import envelope
from ..cloudstack.config import Configs, Connection
from ..cloudstack.networks import Networks
from ..cloudstack.settings import Ids, Settings

_TAGS = ("cloudstack",)
# A settings call needs credentials: given, or a saved config (NotFound by id, Conflict when none is saved);
# then CloudStack may be unreachable, slow, or refuse (its 4xx answers are a 400 here, the rest a 503).
_REACHES_CLOUDSTACK: tuple[type[OmaError], ...] = (NotFound, Conflict, *CALLS_OUT)
# CloudStack ids are UUIDs; older objects have numeric ids. Anything else is refused before CloudStack sees it.
_CS_ID = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"


def _url(default: Any = None) -> Any:
    return spec(default, min_length=1, max_length=2048, pattern=r"[^\s]+",
                description="http(s)://host[:port][/client/api] or host:port")


def _key(*default: Any) -> Any:
    return spec(*default, min_length=1, max_length=1024, pattern=r"[^\s]+")


def _id_field(description: str = "") -> Any:
    return spec(None, max_length=128, pattern=f"({_CS_ID})?", description=description)


@dataclasses.dataclass
class ConfigFields:
    """A CloudStack config's fields; all optional here (update sends only what changes), a new config needs
    name, api_url, api_key, secret_key, zone and oma_vm_id."""

    name: str | None = name_spec(None, min_length=1, max_length=255)
    api_url: str | None = _url()
    api_key: str | None = _key(None)
    secret_key: str | None = spec(None, max_length=1024, description="sealed at rest, never returned; empty on "
                                                                     "update keeps the stored one")
    zone: str | None = _id_field("the zone id")
    domain: str | None = name_spec(None, max_length=255)
    oma_vm_id: str | None = _id_field("this appliance's VM id (see /settings/cloudstack/detect-oma-vm)")
    template_id: str | None = _id_field()
    network_id: str | None = _id_field()
    service_offering_id: str | None = _id_field()
    disk_offering_id: str | None = _id_field()
    is_default: bool | None = spec(None, description="make this the config new VMs get")


@dataclasses.dataclass
class ConfigEnvelope:
    """One call for every action on saved configs (the GUI's contract)."""

    action: Literal["get", "create", "update", "delete", "test"]
    id: int | None = spec(None, min=1, max=2**53, description="the config (get/update/delete/test; test and get "
                                                               "without it use the default one)")
    config: ConfigFields | None = spec(None, description="create/update: the fields; test: unsaved credentials")


@dataclasses.dataclass
class ConfigOut:
    id: int
    name: str
    api_url: str
    api_key: str
    secret_key_set: bool
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


@dataclasses.dataclass
class TestResult:
    """The outcome of a connection test; `error` holds CloudStack's own text when it refused."""

    success: bool
    message: str
    api_url: str
    zones: int
    elapsed_ms: int
    tested_at: str
    error: str | None = None
    code: str | None = None


@dataclasses.dataclass
class ConfigAnswer:
    action: str
    success: bool
    message: str
    timestamp: str
    config: ConfigOut | None = None
    configs: list[ConfigOut] | None = None
    test_result: TestResult | None = None


@dataclasses.dataclass
class ConnectionIn:
    """CloudStack credentials, or a saved config (`config_id`, else the default one) to take them from."""

    api_url: str | None = _url()
    base_url: str | None = _url()
    api_key: str | None = _key(None)
    secret_key: str | None = spec(None, max_length=1024)
    domain: str | None = name_spec(None, max_length=255)
    config_id: int | None = spec(None, min=1, max=2**53)


@dataclasses.dataclass
class ValidateIn(ConnectionIn):
    """Credentials (or a saved config) and the ids to check; an absent id is taken from the saved config."""

    zone: str | None = _id_field()
    zone_id: str | None = _id_field("alias of zone")
    oma_vm_id: str | None = _id_field()
    template_id: str | None = _id_field()
    network_id: str | None = _id_field()
    service_offering_id: str | None = _id_field()
    disk_offering_id: str | None = _id_field()


@dataclasses.dataclass
class StreamlinedIn:
    """The setup wizard's save: credentials and the chosen ids; checked against CloudStack, then saved (by
    name: an existing config of that name is updated) as the default config."""

    api_key: str = _key()
    secret_key: str = spec(min_length=1, max_length=1024)
    oma_vm_id: str = spec(max_length=128, pattern=_CS_ID)
    zone_id: str | None = _id_field()
    zone: str | None = _id_field("alias of zone_id")
    api_url: str | None = _url()
    base_url: str | None = _url()
    template_id: str | None = _id_field()
    service_offering_id: str | None = _id_field()
    disk_offering_id: str | None = _id_field()
    network_id: str | None = _id_field()
    domain: str | None = name_spec(None, max_length=255)
    domain_name: str | None = name_spec(None, max_length=255)
    name: str = name_spec("production-ossea", min_length=1, max_length=255)


@dataclasses.dataclass
class Resources:
    """What a key may use, for the setup wizard's dropdowns (items carry more fields than id and name)."""

    success: bool
    message: str
    zones: list[dict[str, Any]]
    domains: list[dict[str, Any]]
    templates: list[dict[str, Any]]
    service_offerings: list[dict[str, Any]]
    disk_offerings: list[dict[str, Any]]
    networks: list[dict[str, Any]]
    oma_vm: dict[str, Any] | None = None
    oma_vm_id: str | None = None
    oma_vm_name: str | None = None


@dataclasses.dataclass
class OmaInfo:
    vm_id: str
    vm_name: str
    display_name: str
    state: str
    zone_id: str
    account: str
    domain: str
    mac_address: str
    ip_address: str
    network_id: str
    network_name: str
    interface: str


@dataclasses.dataclass
class Detection:
    """Which CloudStack VM this appliance is; success false (and oma_info null) when none has its MACs."""

    success: bool
    message: str
    oma_info: OmaInfo | None
    local_mac_addresses: list[str]


@dataclasses.dataclass
class Check:
    field: str
    what: str
    id: str
    status: str  # pass | fail | not_set
    message: str


@dataclasses.dataclass
class Missing:
    field: str
    what: str
    id: str


@dataclasses.dataclass
class ValidationResult:
    overall_status: str
    checks: list[Check]
    missing: list[Missing]


@dataclasses.dataclass
class Validation:
    """success false and `missing` naming each configured id CloudStack does not have."""

    success: bool
    message: str
    result: ValidationResult


@dataclasses.dataclass
class NetworkList:
    success: bool
    networks: list[Network]
    count: int


@dataclasses.dataclass
class ConfigQuery:
    config_id: int | None = spec(None, min=1, max=2**53, description="a saved config; default: the default one")


def connection(body: ConnectionIn) -> Connection:
    return Connection(api_url=body.api_url or body.base_url, api_key=body.api_key, secret_key=body.secret_key or None,
                      config_id=body.config_id)


def _fields(c: ConfigFields | None) -> dict[str, str]:
    if c is None:
        return {}
    return {k: v for k, v in dataclasses.asdict(c).items() if v is not None and k != "is_default"}


class CloudStackApi:
    def __init__(self, configs: Configs, settings: Settings, networks: Networks) -> None:
        self.configs = configs
        self.settings = settings
        self.networks_ = networks
        self.envelope = envelope.ConfigEnvelope(configs, settings)

    # -- /ossea -------------------------------------------------------------------------------------------

    @route("POST", "/ossea/config", errors=(NotFound, Conflict),
           body=ConfigEnvelope, response=ConfigAnswer, auth=Auth.ADMIN, tags=_TAGS)
    async def config(self, call: Call) -> dict[str, Any]:
        """get, create, update, delete or test a saved CloudStack config (the secret key is never returned)."""
        env: ConfigEnvelope = call.body
        return await self.envelope.run(env.action, env.id, _fields(env.config),
                                       make_default=bool(env.config and env.config.is_default), actor=call.actor)

    @route("POST", "/ossea/discover-resources", errors=_REACHES_CLOUDSTACK,
           body=ConnectionIn, response=Resources, auth=Auth.ADMIN, tags=_TAGS)
    async def discover_resources(self, call: Call) -> dict[str, Any]:
        """Zones, domains, templates, service and disk offerings and networks the given key may use."""
        return await self.settings.resources(connection(call.body), with_vm=False)

    @route("POST", "/ossea/config-streamlined", errors=_REACHES_CLOUDSTACK,
           body=StreamlinedIn, response=ConfigAnswer, auth=Auth.ADMIN,
           tags=_TAGS)
    async def config_streamlined(self, call: Call) -> dict[str, Any]:
        """Check the chosen ids against CloudStack (400 naming each missing one), then save them as the default
        config."""
        b: StreamlinedIn = call.body
        url = b.api_url or b.base_url
        if not url:
            raise Invalid("CloudStack URL missing", "give api_url (or base_url)")
        zone = b.zone_id or b.zone
        if not zone:
            raise Invalid("zone missing", "give zone_id")
        ids = Ids(zone=zone, oma_vm_id=b.oma_vm_id, template_id=b.template_id or "", network_id=b.network_id or "",
                  service_offering_id=b.service_offering_id or "", disk_offering_id=b.disk_offering_id or "")
        checked = await self.settings.validate(Connection(url, b.api_key, b.secret_key), ids)
        if not checked["success"]:
            raise Invalid("CloudStack ids missing", checked["message"], missing=checked["result"]["missing"])
        fields = {"name": b.name, "api_url": url, "api_key": b.api_key, "secret_key": b.secret_key, "zone": zone,
                  "domain": b.domain or b.domain_name or "", "oma_vm_id": b.oma_vm_id,
                  **{k: v for k, v in dataclasses.asdict(ids).items() if k not in ("zone", "oma_vm_id")}}
        saved = await self.configs.save_named(fields, actor=call.actor)
        return {"action": "save", "success": True, "message": f"CloudStack config {saved['name']!r} saved as the "
                                                              "default", "config": saved, "timestamp": now_rfc3339()}

    # -- /settings/cloudstack -----------------------------------------------------------------------------

    @route("POST", "/settings/cloudstack/test-connection", errors=(NotFound, Conflict),
           body=ConnectionIn, response=TestResult, auth=Auth.ADMIN,
           tags=_TAGS)
    async def test_connection(self, call: Call) -> dict[str, Any]:
        """List CloudStack's zones with the given (or saved) credentials; 200 with success false and
        CloudStack's text when it fails."""
        return await self.settings.test_connection(connection(call.body))

    @route("POST", "/settings/cloudstack/detect-oma-vm", errors=_REACHES_CLOUDSTACK,
           body=ConnectionIn, response=Detection, auth=Auth.ADMIN,
           tags=_TAGS)
    async def detect_oma_vm(self, call: Call) -> dict[str, Any]:
        """The CloudStack VM one of whose NICs has one of this machine's MAC addresses: this appliance."""
        return await self.settings.detect(connection(call.body))

    @route("GET", "/settings/cloudstack/networks", errors=_REACHES_CLOUDSTACK,
           query=ConfigQuery, response=NetworkList, tags=_TAGS)
    async def networks(self, call: Call) -> dict[str, Any]:
        """The networks of the saved (default) config's CloudStack."""
        items = await self.networks_.available(call.query.config_id)
        return {"success": True, "networks": items, "count": len(items)}

    @route("POST", "/settings/cloudstack/validate", errors=_REACHES_CLOUDSTACK,
           body=ValidateIn, response=Validation, auth=Auth.ADMIN, tags=_TAGS)
    async def validate(self, call: Call) -> dict[str, Any]:
        """Check that every configured id (zone, template, offerings, network, appliance VM) exists; 200 with
        success false naming each missing one."""
        b: ValidateIn = call.body
        ids = Ids(zone=b.zone or b.zone_id, oma_vm_id=b.oma_vm_id, template_id=b.template_id, network_id=b.network_id,
                  service_offering_id=b.service_offering_id, disk_offering_id=b.disk_offering_id)
        return await self.settings.validate(connection(b), ids)

    @route("POST", "/settings/cloudstack/discover-all", errors=_REACHES_CLOUDSTACK,
           body=ConnectionIn, response=Resources, auth=Auth.ADMIN,
           tags=_TAGS)
    async def discover_all(self, call: Call) -> dict[str, Any]:
        """This appliance's VM, zones, domains, templates, offerings and networks in one answer."""
        return await self.settings.resources(connection(call.body), with_vm=True)
