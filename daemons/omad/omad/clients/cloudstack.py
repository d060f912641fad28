"""CloudStack's API through the `cs` library's asyncio client: typed reads, async jobs, errors in our shape.

Every call is signed by `cs` (HMAC-SHA1, signatureVersion 3 with `expires`); nothing here builds a
signature. An async command is awaited by `cs` polling `queryAsyncJobResult` every `poll_interval`
seconds until `job_timeout`. What CloudStack answers as an error (`errorcode`, `cserrorcode`,
`errortext`, also inside a failed job's `jobresult`) becomes a domain error whose details keep CloudStack's
text; a management server that cannot be reached is Unavailable, one that does not answer in time TimedOut.

Written against `cs` 2.7 (Debian 12) and 3+/5: only the API both share is used (the constructor's
keywords, `fetch_list`, `fetch_result`, `CloudStackApiException.error`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from oma_common.errors import Conflict, Invalid, OmaError, TimedOut, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where and as whom: a management server's API URL and an API key pair."""

    api_url: str
    api_key: str
    secret_key: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Time limits of one client."""

    timeout: float = 15.0  # one HTTP request
    job_timeout: float = 600.0  # one async job, from its jobid to its end
    poll_interval: float = 2.0  # between two queryAsyncJobResult calls
    verify_tls: bool = True


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")


def normalise_api_url(text: str) -> str:
    """`cs.example.com:8080`, `http://cs:8080` or `https://cs/client/api` → the API URL (`…/client/api`)."""
    raw = text.strip()
    if not raw or any(c.isspace() for c in raw):
        raise Invalid("invalid CloudStack URL", f"{text!r} is not a URL or host:port")
    parts = urlsplit(raw if "://" in raw else "http://" + raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise Invalid("invalid CloudStack URL", f"{text!r}: give http(s)://host[:port][/client/api]")
    try:
        parts.port
    except ValueError as e:
        raise Invalid("invalid CloudStack URL", f"{text!r}: the port is not a number from 1 to 65535") from e
    host = parts.hostname
    if all(c.isdigit() or c == "." for c in host):  # "0", "10.1": numbers that are not a whole IPv4 address
        try:
            ipaddress.IPv4Address(host)
        except ValueError as e:
            raise Invalid("invalid CloudStack URL", f"{text!r}: {host!r} is not an IPv4 address") from e
    elif not _HOST_NAME.fullmatch(host):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise Invalid("invalid CloudStack URL", f"{text!r}: {host!r} is not a host name or address") from e
    path = parts.path.rstrip("/") or "/client/api"
    return f"{parts.scheme}://{parts.netloc}{path}"


# -- what the appliance reads from CloudStack -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Zone:
    id: str
    name: str
    description: str = ""
    allocation_state: str = ""


@dataclasses.dataclass(frozen=True)
class Domain:
    id: str
    name: str
    path: str = ""


@dataclasses.dataclass(frozen=True)
class Network:
    id: str
    name: str
    display_text: str = ""
    zone_id: str = ""
    zone_name: str = ""
    state: str = ""
    type: str = ""
    cidr: str = ""


@dataclasses.dataclass(frozen=True)
class ServiceOffering:
    id: str
    name: str
    display_text: str = ""
    cpu_number: int = 0
    cpu_speed: int = 0
    memory: int = 0  # MiB
    is_customized: bool = False


@dataclasses.dataclass(frozen=True)
class DiskOffering:
    id: str
    name: str
    display_text: str = ""
    disk_size_gb: int = 0
    is_customized: bool = False


@dataclasses.dataclass(frozen=True)
class Template:
    id: str
    name: str
    display_text: str = ""
    os_type: str = ""
    zone_id: str = ""
    is_ready: bool = True


@dataclasses.dataclass(frozen=True)
class Nic:
    id: str
    mac_address: str
    ip_address: str = ""
    network_id: str = ""
    network_name: str = ""


@dataclasses.dataclass(frozen=True)
class VirtualMachine:
    id: str
    name: str
    display_name: str = ""
    state: str = ""
    zone_id: str = ""
    account: str = ""
    domain: str = ""
    nics: tuple[Nic, ...] = ()


def _s(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    return "" if v is None else str(v)


def _i(d: dict[str, Any], key: str) -> int:
    try:
        return int(d.get(key) or 0)
    except (TypeError, ValueError):
        return 0


def zone(d: dict[str, Any]) -> Zone:
    return Zone(_s(d, "id"), _s(d, "name"), _s(d, "description"), _s(d, "allocationstate"))


def domain(d: dict[str, Any]) -> Domain:
    return Domain(_s(d, "id"), _s(d, "name"), _s(d, "path"))


def network(d: dict[str, Any]) -> Network:
    return Network(_s(d, "id"), _s(d, "name"), _s(d, "displaytext"), _s(d, "zoneid"), _s(d, "zonename"),
                   _s(d, "state"), _s(d, "type"), _s(d, "cidr"))


def service_offering(d: dict[str, Any]) -> ServiceOffering:
    return ServiceOffering(_s(d, "id"), _s(d, "name"), _s(d, "displaytext"), _i(d, "cpunumber"), _i(d, "cpuspeed"),
                           _i(d, "memory"), bool(d.get("iscustomized", False)))


def disk_offering(d: dict[str, Any]) -> DiskOffering:
    return DiskOffering(_s(d, "id"), _s(d, "name"), _s(d, "displaytext"), _i(d, "disksize"),
                        bool(d.get("iscustomized", False)))


def template(d: dict[str, Any]) -> Template:
    return Template(_s(d, "id"), _s(d, "name"), _s(d, "displaytext"), _s(d, "ostypename"), _s(d, "zoneid"),
                    bool(d.get("isready", True)))


def virtual_machine(d: dict[str, Any]) -> VirtualMachine:
    nics = tuple(Nic(_s(n, "id"), _s(n, "macaddress").lower(), _s(n, "ipaddress"), _s(n, "networkid"),
                     _s(n, "networkname")) for n in d.get("nic") or () if isinstance(n, dict))
    return VirtualMachine(_s(d, "id"), _s(d, "name"), _s(d, "displayname"), _s(d, "state"), _s(d, "zoneid"),
                          _s(d, "account"), _s(d, "domain"), nics)


# -- errors -----------------------------------------------------------------------------------------------

# CloudStack's errorcode (ApiErrorCode) → our class. 400/430/431 are values CloudStack refused (an unknown id,
# a bad parameter): the caller sent them. 536 is a resource in use (an attached volume). Everything else —
# 401 bad key or signature, 429 API limit, 432 unknown command, 53x internal or capacity — is the management
# server's or its configuration's problem, fixed in CloudStack or its settings, not in the request.
_BY_ERRORCODE: dict[int, type[OmaError]] = {400: Invalid, 430: Invalid, 431: Invalid, 536: Conflict}
_CODE_NAMES = {401: "cloudstack_unauthorized", 429: "cloudstack_rate_limited", 430: "cloudstack_invalid_parameter",
               431: "cloudstack_invalid_parameter", 432: "cloudstack_unknown_command",
               530: "cloudstack_internal_error", 533: "cloudstack_insufficient_capacity",
               536: "cloudstack_resource_in_use"}


def api_error(command: str, error: Any, status: int | None = None) -> OmaError:
    """The domain error for CloudStack's error answer (or a failed job's `jobresult`); its text is kept."""
    body = error if isinstance(error, dict) else {}
    try:
        errorcode = int(body.get("errorcode") or status or 530)
    except (TypeError, ValueError):
        errorcode = 530
    text = str(body.get("errortext") or error or "no error text")
    cls = _BY_ERRORCODE.get(errorcode, Unavailable)
    err = cls(f"CloudStack refused {command}", f"CloudStack {command}: {text} (errorcode {errorcode})",
              cloudstack_errorcode=errorcode, cloudstack_cserrorcode=body.get("cserrorcode"),
              cloudstack_errortext=text)
    err.code = _CODE_NAMES.get(errorcode, "cloudstack_error")
    return err


class Client:
    """One management server as one API key sees it. Use as `async with`; each call opens its own session."""

    def __init__(self, endpoint: Endpoint, limits: Limits) -> None:
        # cs (and requests with it) on first use: importing it costs every omad start ~0.15 s of CPU.
        from cs import AIOCloudStack

        self.endpoint = endpoint
        self.limits = limits
        self._cs = AIOCloudStack(endpoint=endpoint.api_url, key=endpoint.api_key, secret=endpoint.secret_key,
                                 timeout=max(1, round(limits.timeout)), method="get",
                                 job_timeout=max(1, round(limits.job_timeout)), poll_interval=limits.poll_interval,
                                 dangerous_no_tls_verify=not limits.verify_tls)
        stray = getattr(self._cs, "session", None)
        if stray is not None and hasattr(stray, "mount"):
            stray.close()  # cs 2.7 builds a requests.Session for its synchronous half; the async one never uses it

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    # -- raw calls -----------------------------------------------------------------------------------------

    async def call(self, command: str, **params: Any) -> dict[str, Any]:
        """A synchronous command: its response object (the `<command>response` envelope removed)."""
        data = await self._guard(command, self._cs.__getattr__(command)(**params), self.limits.timeout)
        return data if isinstance(data, dict) else {}

    async def listing(self, command: str, **params: Any) -> list[dict[str, Any]]:
        """Every item of a list command, all pages; an empty answer (`{}`) is no items."""
        # The whole listing is bounded, not each page: a few pages of a large cloud fit in a few timeouts.
        data = await self._guard(command, self._cs.__getattr__(command)(fetch_list=True, **params),
                                 self.limits.timeout * 4)
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    async def job(self, command: str, **params: Any) -> dict[str, Any]:
        """An async command, awaited through queryAsyncJobResult: the job's `jobresult`."""
        log.info("CloudStack %s: started", command)
        data = await self._guard(command, self._cs.__getattr__(command)(fetch_result=True, **params),
                                 self.limits.job_timeout + self.limits.timeout)
        return data if isinstance(data, dict) else {}

    async def _guard(self, command: str, call: Awaitable[T], limit: float) -> T:
        from cs import CloudStackApiException, CloudStackException

        where = urlsplit(self.endpoint.api_url).netloc
        try:
            return await asyncio.wait_for(call, limit)
        except CloudStackApiException as e:
            response = getattr(e, "response", None)
            err = api_error(command, getattr(e, "error", None), getattr(response, "status", None))
            log.warning("CloudStack %s at %s: %s", command, where, err.details)
            raise err from e
        except CloudStackException as e:
            if e.args and "Timeout waiting for async job result" in str(e.args[0]):
                jobid = e.args[1] if len(e.args) > 1 else "?"
                raise TimedOut("CloudStack job timed out", f"CloudStack {command}: job {jobid} did not finish within "
                                                           f"{self.limits.job_timeout:g} s", jobid=jobid) from e
            raise Unavailable("CloudStack answer unusable", f"CloudStack {command} at {where}: "
                                                            f"{' '.join(map(str, e.args))}") from e
        except asyncio.TimeoutError as e:
            raise TimedOut("CloudStack did not answer", f"CloudStack {command} at {where}: no answer within "
                                                        f"{limit:g} s") from e
        except aiohttp.InvalidURL as e:  # a host aiohttp will not connect to ("0", "a..b"): the caller's URL
            raise Invalid("invalid CloudStack URL", f"{self.endpoint.api_url}: {e}") from e
        except (aiohttp.ClientError, OSError, ValueError) as e:
            # ValueError: an answer that is not a CloudStack envelope (cs unpacks its single key).
            raise Unavailable("CloudStack unreachable", f"CloudStack {command} at {where}: "
                                                        f"{type(e).__name__}: {e}") from e

    # -- typed reads ---------------------------------------------------------------------------------------

    async def zones(self, **params: Any) -> list[Zone]:
        return [zone(d) for d in await self.listing("listZones", **params)]

    async def domains(self, **params: Any) -> list[Domain]:
        return [domain(d) for d in await self.listing("listDomains", **params)]

    async def networks(self, **params: Any) -> list[Network]:
        return [network(d) for d in await self.listing("listNetworks", **params)]

    async def service_offerings(self, **params: Any) -> list[ServiceOffering]:
        return [service_offering(d) for d in await self.listing("listServiceOfferings", **params)]

    async def disk_offerings(self, **params: Any) -> list[DiskOffering]:
        return [disk_offering(d) for d in await self.listing("listDiskOfferings", **params)]

    async def templates(self, **params: Any) -> list[Template]:
        params.setdefault("templatefilter", "executable")
        return [template(d) for d in await self.listing("listTemplates", **params)]

    async def virtual_machines(self, **params: Any) -> list[VirtualMachine]:
        return [virtual_machine(d) for d in await self.listing("listVirtualMachines", **params)]


class CloudStack:
    """Makes clients with the appliance's time limits; the one place omad reaches CloudStack through."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def client(self, endpoint: Endpoint) -> Client:
        return Client(endpoint, self.limits)
