"""The CloudStack settings flows: test a connection, discover what a key may use, detect this VM, validate ids."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from oma_common.errors import OmaError

from ..clients.cloudstack import CloudStack, Client, Endpoint
from ..store.db import utcnow
from .config import Configs, Connection
from .detect import LocalNics, detect

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Ids:
    """The CloudStack ids a config names (None: take the saved config's)."""

    zone: str | None = None
    oma_vm_id: str | None = None
    template_id: str | None = None
    network_id: str | None = None
    service_offering_id: str | None = None
    disk_offering_id: str | None = None


# field → (what it is, whether a config must have it)
_CHECKS = {"zone": ("zone", True), "oma_vm_id": ("appliance VM", True), "template_id": ("template", False),
           "network_id": ("network", False), "service_offering_id": ("service offering", False),
           "disk_offering_id": ("disk offering", False)}


def _failure(e: OmaError) -> dict[str, Any]:
    return {"success": False, "message": e.message, "error": e.details, "code": e.code}


def asdicts(items: list[Any]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(i) for i in items]


class Settings:
    def __init__(self, configs: Configs, cloudstack: CloudStack, local_nics: LocalNics) -> None:
        self.configs = configs
        self.cloudstack = cloudstack
        self.local_nics = local_nics

    async def _client(self, conn: Connection) -> Client:
        endpoint, _ = await self.configs.endpoint(conn)
        return self.cloudstack.client(endpoint)

    async def test(self, endpoint: Endpoint) -> dict[str, Any]:
        """List the zones; the answer says why it failed, in CloudStack's words when CloudStack refused."""
        started = time.monotonic()
        try:
            zones = await self.cloudstack.client(endpoint).zones()
        except OmaError as e:
            log.info("CloudStack test of %s failed: %s", endpoint.api_url, e.details)
            return {**_failure(e), "api_url": endpoint.api_url, "zones": 0,
                    "elapsed_ms": round((time.monotonic() - started) * 1000), "tested_at": utcnow()}
        return {"success": True, "message": f"connected to CloudStack; {len(zones)} zone(s) visible",
                "api_url": endpoint.api_url, "zones": len(zones),
                "elapsed_ms": round((time.monotonic() - started) * 1000), "tested_at": utcnow()}

    async def test_connection(self, conn: Connection) -> dict[str, Any]:
        endpoint, _ = await self.configs.endpoint(conn)
        return await self.test(endpoint)

    async def detect(self, conn: Connection) -> dict[str, Any]:
        found = await detect(await self._client(conn), self.local_nics)
        info = found.info()
        macs = [n.mac_address for n in found.local]
        if info is None:
            return {"success": False, "oma_info": None, "local_mac_addresses": macs,
                    "message": "no CloudStack VM has a NIC with one of this appliance's MAC addresses "
                               f"({', '.join(macs) or 'none'}); enter the appliance VM's id by hand"}
        return {"success": True, "oma_info": info, "local_mac_addresses": macs,
                "message": f"this appliance is CloudStack VM {info['vm_name']} ({info['vm_id']})"}

    async def resources(self, conn: Connection, *, with_vm: bool) -> dict[str, Any]:
        """Zones, domains, templates, offerings and networks in one answer (and this appliance's VM)."""
        client = await self._client(conn)
        zones, domains, templates, offerings, disks, networks = await asyncio.gather(
            client.zones(), client.domains(), client.templates(), client.service_offerings(),
            client.disk_offerings(), client.networks(listall=True))
        out: dict[str, Any] = {
            "success": True, "zones": asdicts(zones), "domains": asdicts(domains),
            "templates": asdicts([t for t in templates if t.is_ready]), "service_offerings": asdicts(offerings),
            "disk_offerings": asdicts(disks), "networks": asdicts(networks)}
        if with_vm:
            found = await detect(client, self.local_nics)
            info = found.info()
            out.update(oma_vm=info, oma_vm_id=info["vm_id"] if info else None,
                       oma_vm_name=info["vm_name"] if info else None)
        counts = ", ".join(f"{len(out[k])} {k.replace('_', ' ')}" for k in
                           ("zones", "templates", "service_offerings", "disk_offerings", "networks"))
        out["message"] = f"discovered {counts}" + (
            "" if not with_vm else f"; appliance VM {'found' if out['oma_vm'] else 'not found'}")
        return out

    async def validate(self, conn: Connection, given: Ids) -> dict[str, Any]:
        """Check that every configured id exists in CloudStack; the answer names each missing one."""
        endpoint, base = await self.configs.endpoint(conn)
        ids = {f: getattr(given, f) if getattr(given, f) is not None else (getattr(base, f) if base else "")
               for f in _CHECKS}
        client = self.cloudstack.client(endpoint)
        # Whole listings, not lookups by id: an id of the wrong form is then "missing", like any unknown one.
        zones, vms, templates, networks, offerings, disks = await asyncio.gather(
            client.zones(), client.virtual_machines(listall=True), client.templates(), client.networks(listall=True),
            client.service_offerings(), client.disk_offerings())
        known: dict[str, dict[str, Any]] = {
            "zone": {z.id: z for z in zones}, "oma_vm_id": {v.id: v for v in vms},
            "template_id": {t.id: t for t in templates}, "network_id": {n.id: n for n in networks},
            "service_offering_id": {o.id: o for o in offerings}, "disk_offering_id": {d.id: d for d in disks}}
        checks = []
        missing = []
        for field, (what, required) in _CHECKS.items():
            value = ids[field] or ""
            if not value:
                status = "fail" if required else "not_set"
                message = f"no {what} is configured" + ("" if required else " (optional)")
                if required:
                    missing.append({"field": field, "what": what, "id": ""})
            elif value in known[field]:
                status, message = "pass", f"{what} {value} exists ({getattr(known[field][value], 'name', '')})"
            else:
                status, message = "fail", f"{what} {value} does not exist in CloudStack"
                missing.append({"field": field, "what": what, "id": value})
            checks.append({"field": field, "what": what, "id": value, "status": status, "message": message})
        zone_id = ids["zone"]
        net = known["network_id"].get(ids["network_id"] or "")
        if net is not None and zone_id and net.zone_id and net.zone_id != zone_id:
            for c in checks:
                if c["field"] == "network_id":
                    c.update(status="fail", message=f"network {net.id} is in zone {net.zone_id}, not in {zone_id}")
            missing.append({"field": "network_id", "what": "network in the configured zone", "id": net.id})
        ok = not missing
        if ok:
            message = "every configured CloudStack id exists"
        else:
            message = "missing in CloudStack: " + "; ".join(
                f"{m['what']} {m['id']!r}" if m["id"] else f"{m['what']} (not configured)" for m in missing)
        log.info("CloudStack validation against %s: %s", endpoint.api_url, message)
        return {"success": ok, "message": message,
                "result": {"overall_status": "pass" if ok else "fail", "checks": checks, "missing": missing}}
