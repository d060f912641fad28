"""Failover jobs: test failover, end of a test, rollback and cleanup of a failed one, as plans of steps.

Test failover (each step RESUME on a crash but `validate`, which COMPENSATEs: what it checked may have changed):
  validate → stop_exports → snapshot → deploy (stopped, no root of its own) → detach_here → attach (OS volume as
  root, the others as data disks) → start; the context becomes `failed_over_test`.
  Undo, newest first: stop the VM; detach the volumes from it; attach them back here; expunge the VM; revert
  every volume to its snapshot and delete the snapshot.
End test (also a test's rollback; every step RESUMEs — it only goes forward, each step run again is harmless):
  stop_vm → detach_from_vm → destroy_vm → revert → delete_snapshots → attach_here; the context is
  `ready_for_failover` again, and each disk keeps its change id only if its volume was reverted to the
  snapshot (exactly the replicated state); a disk whose snapshot was gone copies in full next time.
Cleanup of a failed job: its undo steps again, as a job of their own (operation `rollback`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound

from ..audit import Audit
from ..clients.cloudstack import CloudStack
from ..clients.nbdpool import NbdPool
from ..clients.volume_agent import VolumeAgent
from ..cloudstack.config import Configs
from ..jobs import ids
from ..jobs.engine import JobEngine
from ..store import contexts as contexts_store
from ..store import failover as store
from ..store import network_mappings as mappings_store
from ..store import replications as replications_store
from ..store.contexts import ContextStatus
from ..store.db import Database, utcnow
from ..store.failover import FailoverJob, FailoverStatus, NewFailover, OnCrash, Operation
from .cloud import Cloud, destination_name, snapshot_name
from .source import Source
from .steps import Plan, Run, Runner, Step

log = logging.getLogger(__name__)

JOB_TYPE = "failover"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a failover builds: read once by `validate`, kept in its step's record."""

    config_id: int
    zone: str
    service_offering_id: str
    template_id: str
    network_ids: list[str]
    disks: list[dict[str, str]]  # [{disk_id, volume_id}], the OS disk first
    vm_name: str  # the destination VM's CloudStack name
    failover_job_id: str  # the failover whose snapshots and VM these are (an end test or cleanup reads it)


class Failovers:
    def __init__(self, db: Database, audit: Audit, jobs: JobEngine, configs: Configs, cloudstack: CloudStack,
                 volumes: VolumeAgent, pool: NbdPool, source: Source, crash_file: str = "") -> None:
        self.db = db
        self.audit = audit
        self.jobs = jobs
        self.configs = configs
        self.cloudstack = cloudstack
        self.volumes = volumes
        self.pool = pool
        self.source = source
        self.runner = Runner(db, jobs, crash_file)
        self._start_lock = asyncio.Lock()

    # -- starting ------------------------------------------------------------------------------------------

    async def start_test(self, vm_id: str, *, actor: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        ref = await mappings_store.vm(self.db, vm_id)
        return await self._start(ref.context_id, ref.vm_name, "test", Operation.FAILOVER, None, options or {},
                                 actor)

    async def start_live(self, vm_id: str, *, actor: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        ref = await mappings_store.vm(self.db, vm_id)
        return await self._start(ref.context_id, ref.vm_name, "live", Operation.FAILOVER, None, options or {},
                                 actor)

    async def end_test(self, job_id: str, *, actor: str) -> dict[str, Any]:
        parent = await store.get(self.db, job_id)
        if parent.failover_type != "test" or parent.operation != Operation.FAILOVER:
            raise Invalid("not a test failover", f"job {job_id} is a {parent.failover_type} {parent.operation}")
        if parent.status != FailoverStatus.COMPLETED:
            raise Conflict("test not standing", f"test failover {job_id} is {parent.status}; only a completed "
                                                "test failover is ended")
        return await self._start(parent.vm_context_id, parent.vm_name, "test", Operation.END_TEST, parent.job_id,
                                 {}, actor)

    async def end_test_of_vm(self, vm_id: str, *, actor: str) -> dict[str, Any]:
        ref = await mappings_store.vm(self.db, vm_id)
        standing = await store.standing(self.db, ref.context_id)
        if standing is None or standing.failover_type != "test":
            raise NotFound("no test failover", f"VM {ref.vm_name} has no test failover in force")
        return await self.end_test(standing.job_id, actor=actor)

    async def rollback(self, vm_id: str, failover_type: str, *, actor: str,
                       power_on_source: bool = False) -> dict[str, Any]:
        ref = await mappings_store.vm(self.db, vm_id)
        standing = await store.standing(self.db, ref.context_id)
        if standing is None or standing.failover_type != failover_type:
            raise NotFound("nothing to roll back", f"VM {ref.vm_name} has no {failover_type} failover in force")
        if failover_type == "test":
            return await self.end_test(standing.job_id, actor=actor)
        return await self._start(ref.context_id, ref.vm_name, "live", Operation.ROLLBACK, standing.job_id,
                                 {"power_on_source": power_on_source}, actor)

    async def rollback_decision(self, vm_id: str, failover_type: str) -> dict[str, Any]:
        ref = await mappings_store.vm(self.db, vm_id)
        standing = await store.standing(self.db, ref.context_id)
        failed = await store.last_failed(self.db, ref.context_id)
        out: dict[str, Any] = {"success": True, "vm_name": ref.vm_name, "failover_type": failover_type,
                               "failover_job_id": None, "can_rollback": False, "actions": []}
        if standing is not None and standing.failover_type == failover_type:
            out.update(failover_job_id=standing.job_id, can_rollback=True)
            out["actions"] = ["stop and destroy the test VM", "detach the volumes from it",
                              "revert every volume to its snapshot and delete the snapshot",
                              "attach the volumes back to this appliance"] if failover_type == "test" else [
                "stop the CloudStack VM", "detach the volumes from it", "attach them back to this appliance",
                "destroy the CloudStack VM", "power the source VM on (when asked: power_on_source)"]
            out["message"] = f"{failover_type} failover {standing.job_id} is in force"
        else:
            out["message"] = f"no {failover_type} failover of {ref.vm_name} is in force"
        if failed is not None:
            out["failed_job_id"] = failed.job_id
            out["message"] += f"; failed job {failed.job_id} left leftovers (POST /failover/{ref.vm_name}/cleanup-failed)"
        return out

    async def cleanup_failed(self, vm_id: str, *, actor: str) -> dict[str, Any]:
        ref = await mappings_store.vm(self.db, vm_id)
        failed = await store.last_failed(self.db, ref.context_id)
        if failed is None:
            raise NotFound("no failed failover", f"VM {ref.vm_name} has no failed failover job to clean up")
        return await self._start(ref.context_id, ref.vm_name, failed.failover_type, Operation.ROLLBACK,
                                 failed.job_id, {}, actor)

    async def _start(self, context_id: str, vm_name: str, failover_type: str, operation: Operation,
                     parent: str | None, options: dict[str, Any], actor: str) -> dict[str, Any]:
        job_id = ids.job_id()
        async with self._start_lock:
            busy = await store.active_for_context(self.db, context_id)
            if busy is not None:
                raise Conflict("failover running", f"VM {vm_name} has failover job {busy.job_id} running")
            async with self.db.transaction() as tx:
                await self.jobs.create(JOB_TYPE, display_name=f"{failover_type} {operation} {vm_name}",
                                       context_id=context_id, job_id=job_id, tx=tx,
                                       details={"failover_type": failover_type, "operation": str(operation)})
                await store.create(tx, NewFailover(job_id, context_id, vm_name, failover_type, operation, parent,
                                                   options, actor))
                await contexts_store.job_started(tx, context_id, job_id, utcnow())
        await self.audit.record(actor, f"failover.{operation}", f"job:{job_id}", vm_name=vm_name,
                                failover_type=failover_type)
        job = await store.get(self.db, job_id)
        self.jobs.spawn(job_id, self.runner.execute(job_id, await self.plan(job)))
        return {"job_id": job_id, "status": "running", "vm_name": vm_name, "failover_type": failover_type,
                "operation": str(operation), "message": f"{failover_type} {operation} of {vm_name} started"}

    async def recover(self, job: dict[str, Any]) -> None:
        """A failover job a dead omad left active: its records say where it was; resumed or compensated."""
        job_id = str(job["id"])
        fjob = await store.get(self.db, job_id)
        if not fjob.active:  # it ended; only the jobs row was left behind
            if fjob.status == FailoverStatus.COMPLETED:
                await self.jobs.finish(job_id, "completed")
            else:
                await self.jobs.finish(job_id, "failed", fjob.error_message or "failed")
            return
        plan = await self.plan(fjob)

        async def work() -> None:
            what = await self.runner.recover(job_id, plan)
            log.warning("failover job recovered after a restart: %s", what, extra={"resource": job_id})

        self.jobs.spawn(job_id, work())

    # -- plans ---------------------------------------------------------------------------------------------

    async def plan(self, job: FailoverJob) -> Plan:
        if job.operation == Operation.FAILOVER and job.failover_type == "test":
            return self._test_plan(job)
        if job.operation == Operation.FAILOVER and job.failover_type == "live":
            return Plan(self._failover_steps(job), self._finished(ContextStatus.FAILED_OVER_LIVE), self._compensated)
        if job.operation in (Operation.END_TEST, Operation.ROLLBACK) and job.parent_job_id:
            parent = await store.get(self.db, job.parent_job_id)
            if parent.operation == Operation.FAILOVER and parent.status == FailoverStatus.COMPLETED \
                    and parent.failover_type == "test":
                return self._end_test_plan(job)
            return self._undo_plan(job, await self.plan(parent))
        raise Invalid("unknown failover job", f"no plan for a {job.failover_type} {job.operation}")

    async def _cloud(self, run: Run) -> Cloud:
        config_id = run.produced.get("config_id")
        cfg = await self.configs.stored(int(config_id) if config_id else None)
        return Cloud(self.cloudstack.client(self.configs.endpoint_of(cfg)), self.volumes, self.pool)

    @staticmethod
    def _own(run: Run) -> set[str]:
        return {d["volume_id"] for d in run.produced.get("disks", [])}

    def _test_plan(self, job: FailoverJob) -> Plan:
        return Plan(self._failover_steps(job), self._finished(ContextStatus.FAILED_OVER_TEST),
                    self._compensated)

    def _failover_steps(self, job: FailoverJob) -> list[Step]:
        async def validate(run: Run) -> dict[str, Any]:
            return dataclasses.asdict(await self.target(run.job))

        async def stop_exports(run: Run) -> dict[str, Any]:
            vols = await replications_store.volumes_of(self.db, run.job.vm_context_id)
            paths = {p for v in vols.values() for p in (v.device_path, v.link_path) if p}
            return {"stopped_exports": await (await self._cloud(run)).stop_exports(paths)}

        async def snapshot(run: Run) -> dict[str, Any]:
            cloud = await self._cloud(run)
            owner = run.produced["failover_job_id"]
            snaps = {d["volume_id"]: await cloud.take_snapshot(d["volume_id"], snapshot_name(owner, d["disk_id"]))
                     for d in run.produced["disks"]}
            return {"snapshots": snaps}

        async def undo_snapshot(run: Run) -> None:
            if run.produced.get("failover_job_id"):
                await self._revert_and_drop(run, run.produced["failover_job_id"])

        async def deploy(run: Run) -> dict[str, Any]:
            p = run.produced
            vm_id = await (await self._cloud(run)).deploy(
                p["vm_name"], run.job.vm_name, zone=p["zone"], offering=p["service_offering_id"],
                template=p["template_id"], networks=p["network_ids"], own=self._own(run))
            return {"vm_id": vm_id}

        async def undo_deploy(run: Run) -> None:
            if run.produced.get("vm_name"):
                await (await self._cloud(run)).destroy(run.produced["vm_name"], self._own(run))

        async def detach_here(run: Run) -> dict[str, Any]:
            cloud = await self._cloud(run)
            for d in run.produced["disks"]:
                await cloud.detach_here(d["volume_id"])
            return {}

        async def undo_detach_here(run: Run) -> None:
            await self._attach_back(run)

        async def attach(run: Run) -> dict[str, Any]:
            cloud = await self._cloud(run)
            for i, d in enumerate(run.produced["disks"]):
                await cloud.attach_to(d["volume_id"], run.produced["vm_id"], root=i == 0)
            return {}

        async def undo_attach(run: Run) -> None:
            await self._detach_from_vm(run)

        async def start(run: Run) -> dict[str, Any]:
            await (await self._cloud(run)).start(run.produced["vm_id"])
            return {}

        async def undo_start(run: Run) -> None:
            await self._stop_vm(run)

        async def power_off(run: Run) -> dict[str, Any]:
            if "source_power_state" not in run.produced:  # a first run, not a resume after the act
                await run.note({"source_power_state": await self.source.power_state(run.job.vm_context_id)})
            await self.source.power_off(run.job.vm_context_id)
            return {}

        async def undo_power_off(run: Run) -> None:
            # A failed live failover gives the source back as it was; a rollback powers it on when asked.
            if run.job.operation == Operation.ROLLBACK and not run.job.options.get("power_on_source"):
                return
            if run.produced.get("source_power_state") == "poweredOn":
                await self.source.power_on(run.job.vm_context_id)

        async def final_sync(run: Run) -> dict[str, Any]:
            return await self.source.final_sync(run.job.vm_context_id, int(run.produced["config_id"]),
                                                run.job.created_by)

        first: list[Step] = [Step("validate", validate, None, OnCrash.COMPENSATE)]
        if job.failover_type == "live":
            first += [Step("power_off", power_off, undo_power_off), Step("final_sync", final_sync),
                      Step("stop_exports", stop_exports)]
        else:
            first += [Step("stop_exports", stop_exports), Step("snapshot", snapshot, undo_snapshot)]
        return [*first,
                Step("deploy", deploy, undo_deploy),
                Step("detach_here", detach_here, undo_detach_here),
                Step("attach", attach, undo_attach),
                Step("start", start, undo_start)]

    async def _vm_id(self, run: Run, cloud: Cloud) -> str | None:
        vm = await cloud.vm(run.produced["vm_name"]) if run.produced.get("vm_name") else None
        return str(vm["id"]) if vm else None

    async def _stop_vm(self, run: Run) -> None:
        cloud = await self._cloud(run)
        vm_id = await self._vm_id(run, cloud)
        if vm_id:
            await cloud.stop(vm_id)

    async def _detach_from_vm(self, run: Run) -> None:
        cloud = await self._cloud(run)
        vm_id = await self._vm_id(run, cloud)
        if vm_id:
            for d in run.produced.get("disks", []):
                await cloud.detach_from(d["volume_id"], vm_id)

    async def _attach_back(self, run: Run) -> None:
        cloud = await self._cloud(run)
        vm_id = await self._vm_id(run, cloud)
        for d in run.produced.get("disks", []):
            await cloud.attach_here(d["volume_id"], vm_id)

    async def _revert_and_drop(self, run: Run, failover_job_id: str) -> list[str]:
        """Every volume back to its snapshot, the snapshots deleted; the disks that had none to go back to."""
        cloud = await self._cloud(run)
        missing = []
        for d in run.produced.get("disks", []):
            name = snapshot_name(failover_job_id, d["disk_id"])
            if not await cloud.revert(d["volume_id"], name):
                missing.append(d["disk_id"])
            await cloud.drop_snapshot(d["volume_id"], name)
        return missing

    def _end_test_plan(self, job: FailoverJob) -> Plan:
        parent_id = job.parent_job_id or ""  # the test failover: its snapshots carry its id

        async def stop_vm(run: Run) -> dict[str, Any]:
            await self._stop_vm(run)
            return {}

        async def detach_from_vm(run: Run) -> dict[str, Any]:
            await self._detach_from_vm(run)
            return {}

        async def destroy_vm(run: Run) -> dict[str, Any]:
            await (await self._cloud(run)).destroy(run.produced["vm_name"], self._own(run))
            return {}

        async def revert(run: Run) -> dict[str, Any]:
            cloud = await self._cloud(run)
            missing = [d["disk_id"] for d in run.produced["disks"]
                       if not await cloud.revert(d["volume_id"], snapshot_name(parent_id, d["disk_id"]))]
            return {"unrestored_disks": sorted(set(missing) | set(run.produced.get("unrestored_disks", [])))}

        async def delete_snapshots(run: Run) -> dict[str, Any]:
            cloud = await self._cloud(run)
            for d in run.produced["disks"]:
                await cloud.drop_snapshot(d["volume_id"], snapshot_name(parent_id, d["disk_id"]))
            return {}

        async def attach_here(run: Run) -> dict[str, Any]:
            await self._attach_back(run)
            return {}

        steps = [Step("stop_vm", stop_vm), Step("detach_from_vm", detach_from_vm), Step("destroy_vm", destroy_vm),
                 Step("revert", revert), Step("delete_snapshots", delete_snapshots), Step("attach_here", attach_here)]
        return Plan(steps, self._finished(ContextStatus.READY_FOR_FAILOVER), self._end_failed)

    def _undo_plan(self, job: FailoverJob, failed: Plan) -> Plan:
        """A failed job's undo steps, newest first, as a job of their own (cleanup-failed)."""
        steps = [Step(f"undo_{s.name}", _as_step(s.undo)) for s in reversed(failed.steps) if s.undo is not None]
        return Plan(steps, self._finished(ContextStatus.READY_FOR_FAILOVER), self._end_failed)

    # -- endings -------------------------------------------------------------------------------------------

    def _finished(self, status: ContextStatus) -> Any:
        async def finish(run: Run) -> None:
            job = run.job
            now = utcnow()
            async with self.db.transaction() as tx:
                if not await store.complete(tx, job.job_id):
                    return
                if job.parent_job_id:
                    await store.mark_ended(tx, job.parent_job_id)
                for disk_id in run.produced.get("unrestored_disks", []):
                    await contexts_store.set_change_id(tx, job.vm_context_id, disk_id, None, now)
                await contexts_store.job_ended(tx, job.vm_context_id, job.job_id, succeeded=True, now=now,
                                               status=status, summary=self._summary(job, "completed"))
            await self.jobs.finish(job.job_id, "completed")
        return finish

    async def _compensated(self, run: Run, undone: bool) -> None:
        """A failover that failed: undone (the VM is as before: ready) or not (leftovers: cleanup required)."""
        job = await store.get(self.db, run.job.job_id)
        async with self.db.transaction() as tx:
            await contexts_store.job_ended(
                tx, job.vm_context_id, job.job_id, succeeded=False, now=utcnow(),
                status=ContextStatus.READY_FOR_FAILOVER if undone else ContextStatus.CLEANUP_REQUIRED,
                summary=self._summary(job, "failed"))

    async def _end_failed(self, run: Run, undone: bool) -> None:
        """An end test or cleanup that failed: it only goes forward, so what it left needs another try."""
        job = await store.get(self.db, run.job.job_id)
        async with self.db.transaction() as tx:
            await contexts_store.job_ended(tx, job.vm_context_id, job.job_id, succeeded=False, now=utcnow(),
                                           status=ContextStatus.CLEANUP_REQUIRED,
                                           summary=self._summary(job, "failed"))

    @staticmethod
    def _summary(job: FailoverJob, status: str) -> dict[str, Any]:
        return {"job_id": job.job_id, "job_type": JOB_TYPE, "failover_type": job.failover_type,
                "operation": job.operation, "status": status}

    # -- what a failover needs ------------------------------------------------------------------------------

    async def target(self, job: FailoverJob) -> Target:
        """What the failover builds, checked against what is stored; Invalid/Conflict naming what is missing."""
        ctx = await contexts_store.by_id(self.db, job.vm_context_id)
        if await replications_store.active_for_vm(self.db, ctx.context_id) is not None:
            raise Conflict("replication running", f"VM {ctx.vm_name} is replicating; wait for the sync to end")
        disks = sorted(await contexts_store.disks_of(self.db, ctx.context_id),
                       key=lambda d: (d.unit_number if d.unit_number is not None else 1 << 20, d.disk_id))
        vols = await replications_store.volumes_of(self.db, ctx.context_id)
        missing = [d.disk_id for d in disks if d.disk_id not in vols]
        if not disks or missing:
            raise Invalid("not replicated", f"VM {ctx.vm_name}: no replicated volume for "
                                            f"{', '.join(missing) or 'any disk'}")
        cfg = await self.configs.stored(ctx.ossea_config_id)
        absent = [n for n, v in (("service_offering_id", cfg.service_offering_id), ("template_id", cfg.template_id),
                                 ("zone", cfg.zone)) if not v]
        if absent:
            raise Invalid("CloudStack config incomplete", f"CloudStack config {cfg.name!r} has no "
                                                          f"{', '.join(absent)}")
        is_test = job.failover_type == "test"
        ref = await mappings_store.vm(self.db, ctx.context_id)
        mapped = {m.source_network_name: m.destination_network_id
                  for m in await mappings_store.of_vm(self.db, ctx.context_id) if m.is_test_network == is_test}
        unmapped = [n for n in ref.networks if n not in mapped]
        if unmapped:
            raise Invalid("network not mapped", f"VM {ctx.vm_name}: no {job.failover_type} network mapping for "
                                                f"{', '.join(unmapped)}")
        networks = list(dict.fromkeys(mapped[n] for n in ref.networks)) or ([cfg.network_id] if cfg.network_id else [])
        if not networks:
            raise Invalid("no network", f"VM {ctx.vm_name} has no network mapping and config {cfg.name!r} no "
                                        "default network")
        return Target(cfg.id, cfg.zone, cfg.service_offering_id, cfg.template_id, networks,
                      [{"disk_id": d.disk_id, "volume_id": vols[d.disk_id].volume_id} for d in disks],
                      destination_name(ctx.vm_name, job.failover_type, job.job_id), job.job_id)

    # -- reading -------------------------------------------------------------------------------------------

    async def status(self, job_id: str) -> dict[str, Any]:
        job = await store.get(self.db, job_id)
        steps = await store.steps(self.db, job_id)
        out = view(job)
        out["steps"] = [dataclasses.asdict(s) for s in steps]
        out["progress"] = (await self.jobs.get(job_id))["progress"]
        out["current_step"] = next((s.name for s in reversed(steps)), None)
        produced: dict[str, Any] = {}
        for s in steps:
            produced.update(s.produced)
        out["destination_vm_id"] = produced.get("vm_id")
        out["destination_vm_name"] = produced.get("vm_name")
        return out

    async def find(self, *, vm_id: str | None, status: str | None, failover_type: str | None, limit: int,
                   offset: int) -> dict[str, Any]:
        context_id = (await mappings_store.vm(self.db, vm_id)).context_id if vm_id else None
        jobs = await store.find(self.db, vm_context_id=context_id, status=status, failover_type=failover_type,
                                limit=limit, offset=offset)
        return {"jobs": [view(j) for j in jobs], "count": len(jobs), "limit": limit, "offset": offset}


    async def overview(self, latest: int = 50) -> dict[str, Any]:
        """The `latest` jobs with their steps, and which of them are at work (running or compensating)."""
        recent = await self.find(vm_id=None, status=None, failover_type=None, limit=latest, offset=0)
        jobs = [await self.status(j["job_id"]) for j in recent["jobs"]]
        return {"active": [j for j in jobs if j["status"] in ("running", "compensating")], "recent": jobs}


def view(job: FailoverJob) -> dict[str, Any]:
    out = dataclasses.asdict(job)
    out["id"] = job.job_id
    return out


def _as_step(fn: Any) -> Any:
    async def run(r: Run) -> dict[str, Any]:
        await fn(r)
        return {}
    return run
