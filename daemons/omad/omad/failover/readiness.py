"""Is a VM ready to fail over, and the validation views behind the answer — each read from real state: the
database (syncs, jobs, mappings), volume-agent (attached here) and CloudStack (volumes, the offering)."""

from __future__ import annotations

import dataclasses
from typing import Any

from oma_common.errors import OmaError

from ..clients.cloudstack import CloudStack, Client
from ..clients.volume_agent import VolumeAgent
from ..cloudstack.config import Configs
from ..cloudstack.mappings import Mappings
from ..store import contexts as contexts_store
from ..store import failover as failover_store
from ..store import jobs as jobs_store
from ..store import network_mappings as mappings_store
from ..store import replications as replications_store
from ..store.contexts import Context
from ..store.db import Database
from ..store.ossea import OsseaConfig


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    message: str
    required_action: str = ""


class Readiness:
    def __init__(self, db: Database, configs: Configs, cloudstack: CloudStack, volumes: VolumeAgent,
                 mappings: Mappings) -> None:
        self.db = db
        self.configs = configs
        self.cloudstack = cloudstack
        self.volumes = volumes
        self.mappings = mappings

    async def _context(self, vm_id: str) -> Context:
        return await contexts_store.by_id(self.db, (await mappings_store.vm(self.db, vm_id)).context_id)

    async def _config(self, ctx: Context) -> OsseaConfig | None:
        if ctx.ossea_config_id is not None:
            return await self.configs.stored(ctx.ossea_config_id)
        return await self.configs.default()

    def _client(self, cfg: OsseaConfig) -> Client:
        return self.cloudstack.client(self.configs.endpoint_of(cfg))

    # -- the views -------------------------------------------------------------------------------------

    async def sync_status(self, vm_id: str) -> dict[str, Any]:
        ctx = await self._context(vm_id)
        _, done = await replications_store.find(self.db, vm_context_id=ctx.context_id, status="completed", limit=1,
                                             offset=0)
        running = await replications_store.active_for_vm(self.db, ctx.context_id)
        disks = await contexts_store.disks_of(self.db, ctx.context_id)
        return {"vm_name": ctx.vm_name, "context_id": ctx.context_id, "current_status": ctx.current_status,
                "has_completed_sync": bool(done), "last_completed_job_id": done[0].job_id if done else None,
                "last_completed_at": done[0].completed_at if done else None,
                "replicating_job_id": running.job_id if running else None,
                "disks": [{"disk_id": d.disk_id, "change_id": d.disk_change_id or ""} for d in disks]}

    async def volume_status(self, vm_id: str) -> dict[str, Any]:
        ctx = await self._context(vm_id)
        cfg = await self._config(ctx)
        cs = self._client(cfg) if cfg is not None else None
        vols = await replications_store.volumes_of(self.db, ctx.context_id)
        out = []
        for d in await contexts_store.disks_of(self.db, ctx.context_id):
            v = vols.get(d.disk_id)
            entry: dict[str, Any] = {"disk_id": d.disk_id, "volume_id": v.volume_id if v else None,
                                     "attached_here": False, "device_path": None, "in_cloudstack": False,
                                     "cloudstack_state": None, "attached_to_vm": None, "error": None}
            if v is not None:
                try:
                    view = await self.volumes.volume(v.volume_id)
                    entry["attached_here"], entry["device_path"] = view.attached_here, view.device_path
                except OmaError as e:
                    entry["error"] = str(e)
                if cs is not None:
                    try:
                        found = await cs.listing("listVolumes", id=v.volume_id)
                    except OmaError as e:
                        entry["error"] = str(e)
                        found = []
                    if found:
                        entry.update(in_cloudstack=True, cloudstack_state=found[0].get("state"),
                                     attached_to_vm=found[0].get("virtualmachineid"))
            out.append(entry)
        return {"vm_name": ctx.vm_name, "context_id": ctx.context_id, "volumes": out,
                "all_attached_here": bool(out) and all(e["attached_here"] for e in out),
                "all_in_cloudstack": bool(out) and all(e["in_cloudstack"] for e in out)}

    async def network_mapping_status(self, vm_id: str) -> dict[str, Any]:
        return await self.mappings.status(vm_id)

    async def preflight_config(self, vm_id: str, failover_type: str) -> dict[str, Any]:
        """What a failover of this type would build and with what: the config check, its mappings, the volumes."""
        mapping = await self.network_mapping_status(vm_id)
        return {"vm_name": vm_id, "failover_type": failover_type,
                "configuration": await self.configuration_check(vm_id),
                "network_mappings": mapping[failover_type], "volumes": await self.volume_status(vm_id)}

    async def active_jobs(self, vm_id: str) -> dict[str, Any]:
        ctx = await self._context(vm_id)
        jobs = [j for j in await jobs_store.active(self.db) if j.context_id == ctx.context_id]
        return {"vm_name": ctx.vm_name, "context_id": ctx.context_id, "count": len(jobs),
                "jobs": [{"job_id": j.id, "job_type": j.job_type, "status": j.status, "current_step": j.current_step,
                          "started_at": j.started_at} for j in jobs]}

    async def configuration_check(self, vm_id: str) -> dict[str, Any]:
        ctx = await self._context(vm_id)
        checks = await self._config_checks(ctx)
        return {"vm_name": ctx.vm_name, "context_id": ctx.context_id, "is_valid": all(c.passed for c in checks),
                "checks": [dataclasses.asdict(c) for c in checks]}

    async def _config_checks(self, ctx: Context) -> list[Check]:
        cfg = await self._config(ctx)
        if cfg is None:
            return [Check("cloudstack_config", False, "no CloudStack config is saved",
                          "save a CloudStack config (POST /ossea/config)")]
        out = [Check("cloudstack_config", True, f"CloudStack config {cfg.name!r}")]
        for field in ("template_id", "service_offering_id", "zone"):
            ok = bool(getattr(cfg, field))
            out.append(Check(field, ok, f"{field} {'set' if ok else 'not set'}",
                             "" if ok else f"set {field} in CloudStack config {cfg.name!r}"))
        if cfg.service_offering_id:
            out.append(await self._offering_check(ctx, cfg))
        return out

    async def _offering_check(self, ctx: Context, cfg: OsseaConfig) -> Check:
        try:
            found = await self._client(cfg).service_offerings(id=cfg.service_offering_id)
        except OmaError as e:
            return Check("service_offering", False, f"CloudStack: {e}", "make CloudStack reachable")
        if not found:
            return Check("service_offering", False, f"service offering {cfg.service_offering_id} does not exist",
                         "choose an existing service offering")
        so = found[0]
        if so.is_customized or (so.cpu_number >= ctx.cpu_count and so.memory >= ctx.memory_mb):
            return Check("service_offering", True, f"{so.name} fits {ctx.cpu_count} CPUs, {ctx.memory_mb} MB")
        return Check("service_offering", False, f"{so.name} ({so.cpu_number} CPUs, {so.memory} MB) is smaller "
                                                f"than the VM ({ctx.cpu_count} CPUs, {ctx.memory_mb} MB)",
                     "choose a service offering with enough CPUs and memory")

    async def readiness(self, vm_id: str, failover_type: str = "test") -> dict[str, Any]:
        """Every prerequisite checked; the score is the share that passed; required_actions name the rest."""
        ctx = await self._context(vm_id)
        checks: list[Check] = []
        sync = await self.sync_status(vm_id)
        checks.append(Check("completed_sync", sync["has_completed_sync"],
                            "a sync completed" if sync["has_completed_sync"] else "no sync has completed",
                            "" if sync["has_completed_sync"] else "replicate the VM (POST /replications)"))
        vols = await self.volume_status(vm_id)
        checks.append(Check("volumes_attached_here", vols["all_attached_here"],
                            "every volume is attached here" if vols["all_attached_here"] else
                            "volumes not attached here: " + ", ".join(
                                v["disk_id"] for v in vols["volumes"] if not v["attached_here"]),
                            "" if vols["all_attached_here"] else "end the failover in force or replicate again"))
        checks.append(Check("volumes_in_cloudstack", vols["all_in_cloudstack"],
                            "CloudStack knows every volume" if vols["all_in_cloudstack"] else
                            "volumes unknown to CloudStack: " + ", ".join(
                                v["disk_id"] for v in vols["volumes"] if not v["in_cloudstack"]),
                            "" if vols["all_in_cloudstack"] else "replicate again (new volumes are created)"))
        nets = (await self.mappings.status(vm_id))[failover_type]
        checks.append(Check("network_mappings", nets["complete"],
                            f"every source network has a {failover_type} mapping" if nets["complete"] else
                            f"no {failover_type} mapping for: " + ", ".join(nets["unmapped"]),
                            "" if nets["complete"] else "map " + ", ".join(nets["unmapped"]) +
                            " (POST /network-mappings)"))
        checks.extend(c for c in await self._config_checks(ctx) if c.name != "cloudstack_config" or not c.passed)
        busy = await jobs_store.active_for_context(self.db, ctx.context_id)
        checks.append(Check("no_active_job", busy is None, "no job is running" if busy is None else
                            f"job {busy} is running", "" if busy is None else f"wait for job {busy} to end"))
        standing = await failover_store.standing(self.db, ctx.context_id)
        checks.append(Check("no_failover_in_force", standing is None, "no failover in force" if standing is None
                            else f"{standing.failover_type} failover {standing.job_id} is in force",
                            "" if standing is None else "end the test or roll back first"))
        passed = sum(c.passed for c in checks)
        return {"success": True, "vm_name": ctx.vm_name, "context_id": ctx.context_id, "failover_type": failover_type,
                "is_valid": passed == len(checks), "readiness_score": round(100.0 * passed / len(checks), 1),
                "required_actions": [c.required_action for c in checks if not c.passed],
                "checks": [dataclasses.asdict(c) for c in checks]}
