"""/failover: test failover and its end, cleanup of a failed job, their status (CONTRACTS.md "Failover
(GUI-facing)"); the work runs as a persistent step job (failover/service.py)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from oma_common.errors import CALLS_OUT, Conflict, Invalid, NotFound
from oma_common.schema import name_spec, spec
from oma_common.web import Call, route

from ..failover.readiness import Readiness
from ..failover.service import Failovers

_TAGS = ("failover",)
def _vm() -> Any:
    return name_spec(None, max_length=255)

_JOB = "{job_id}"
# A failover job id (checked with a 400; the route itself takes any segment, so that the guard answers first).
_JOB_ID = {"job_id": "job-[^/]{1,120}"}


@dataclasses.dataclass
class FailoverIn:
    """Which VM: any of context_id, vm_id (VMware id) or vm_name (tried in that order)."""

    context_id: str | None = _vm()
    vm_id: str | None = _vm()
    vm_name: str | None = _vm()
    skip_validation: bool = spec(False, description="ignored: validation is a step of every failover")
    test_duration: str | None = spec(None, max_length=64, description="informational")
    auto_cleanup: bool = spec(False, description="informational")


@dataclasses.dataclass
class UnifiedIn:
    failover_type: Literal["test", "live"]
    context_id: str | None = _vm()
    vmware_vm_id: str | None = _vm()
    vm_name: str | None = _vm()
    power_off_source: bool = True
    perform_final_sync: bool = True
    skip_validation: bool = False
    skip_virtio: bool = False
    network_strategy: str | None = spec(None, max_length=64)
    vm_naming: Literal["exact", "suffixed"] | None = None
    test_duration: str | None = spec(None, max_length=64)


@dataclasses.dataclass
class RollbackIn:
    failover_type: Literal["test", "live"]
    context_id: str | None = _vm()
    vm_id: str | None = _vm()
    vm_name: str | None = _vm()
    power_on_source: bool = False
    force_cleanup: bool = False


@dataclasses.dataclass
class JobsQuery:
    vm_id: str | None = _vm()
    status: Literal["running", "compensating", "completed", "failed", "compensated", "ended"] | None = None
    failover_type: Literal["test", "live"] | None = None
    limit: int = spec(100, min=1, max=1000)
    offset: int = spec(0, min=0, max=1_000_000_000)


def _which(*candidates: str | None) -> str:
    for c in candidates:
        if c:
            return c
    raise Invalid("VM missing", "give context_id, vm_id or vm_name")


def _started(out: dict[str, Any]) -> dict[str, Any]:
    return {"success": True, "message": out["message"], "job_id": out["job_id"], "data": out, **out}


@dataclasses.dataclass
class PreflightIn:
    failover_type: Literal["test", "live"]
    context_id: str | None = _vm()
    vm_id: str | None = _vm()
    vm_name: str | None = _vm()


@dataclasses.dataclass
class TypeQuery:
    failover_type: Literal["test", "live"] = "test"


_TYPE = "{failover_type}"
_TYPE_P = {"failover_type": "(test|live)"}


class FailoverApi:
    def __init__(self, failovers: Failovers, readiness: Readiness) -> None:
        self.failovers = failovers
        self.readiness = readiness

    @route("GET", "/failover/{vm_id}/readiness", query=TypeQuery, errors=(NotFound, Conflict, *CALLS_OUT),
           tags=_TAGS)
    async def get_readiness(self, call: Call) -> dict[str, Any]:
        """Whether the VM can fail over now: is_valid, readiness_score (0–100), required_actions, the checks."""
        q: TypeQuery = call.query
        return await self.readiness.readiness(call.params["vm_id"], q.failover_type)

    @route("GET", f"/failover/preflight/config/{_TYPE}/{{vm_name}}", params=_TYPE_P, errors=(NotFound, Conflict, *CALLS_OUT),
           tags=_TAGS)
    async def preflight_config(self, call: Call) -> dict[str, Any]:
        """What a failover of this type would build and with what: the CloudStack config check, the network
        mappings of the type, the volumes."""
        return {"success": True,
                **await self.readiness.preflight_config(call.params["vm_name"], call.params["failover_type"])}

    @route("POST", "/failover/preflight/validate", body=PreflightIn, errors=(NotFound, Conflict, Invalid, *CALLS_OUT),
           tags=_TAGS)
    async def preflight_validate(self, call: Call) -> dict[str, Any]:
        """The readiness of the VM for this type of failover."""
        b: PreflightIn = call.body
        return await self.readiness.readiness(_which(b.context_id, b.vm_id, b.vm_name), b.failover_type)

    @route("GET", f"/failover/rollback/decision/{_TYPE}/{{vm_name}}", params=_TYPE_P, errors=(NotFound,), tags=_TAGS)
    async def rollback_decision(self, call: Call) -> dict[str, Any]:
        """What POST /failover/rollback would do for this VM now."""
        return await self.failovers.rollback_decision(call.params["vm_name"], call.params["failover_type"])

    @route("POST", "/failover/test", status=202, body=FailoverIn, errors=(NotFound, Conflict, Invalid),
           tags=_TAGS)
    async def test(self, call: Call) -> dict[str, Any]:
        """Start a test failover: the VM boots in CloudStack from snapshotted replicas (409 while a failover
        job of the VM runs)."""
        b: FailoverIn = call.body
        return _started(await self.failovers.start_test(_which(b.context_id, b.vm_id, b.vm_name),
                                                        actor=call.actor, options=dataclasses.asdict(b)))

    @route("POST", "/failover/live", status=202, body=FailoverIn, errors=(NotFound, Conflict, Invalid),
           tags=_TAGS)
    async def live(self, call: Call) -> dict[str, Any]:
        """Start a live failover: the source is powered off through the VMA, synced a last time, and the
        CloudStack VM becomes the real one."""
        b: FailoverIn = call.body
        return _started(await self.failovers.start_live(_which(b.context_id, b.vm_id, b.vm_name),
                                                        actor=call.actor, options=dataclasses.asdict(b)))

    @route("POST", "/failover/unified", status=202, body=UnifiedIn, errors=(NotFound, Conflict, Invalid),
           tags=_TAGS)
    async def unified(self, call: Call) -> dict[str, Any]:
        """Start a failover of either type."""
        b: UnifiedIn = call.body
        vm = _which(b.context_id, b.vmware_vm_id, b.vm_name)
        start = self.failovers.start_test if b.failover_type == "test" else self.failovers.start_live
        return _started(await start(vm, actor=call.actor, options=dataclasses.asdict(b)))

    @route("DELETE", f"/failover/test/{_JOB}", status=202, params=_JOB_ID, errors=(NotFound, Conflict, Invalid), tags=_TAGS)
    async def end_test(self, call: Call) -> dict[str, Any]:
        """End a test failover: the test VM goes, the volumes are reverted and come back here."""
        return _started(await self.failovers.end_test(call.params["job_id"], actor=call.actor))

    @route("POST", "/failover/cleanup/{vm_name}", status=202, errors=(NotFound, Conflict, Invalid), tags=_TAGS)
    async def cleanup(self, call: Call) -> dict[str, Any]:
        """End the VM's test failover in force."""
        return _started(await self.failovers.end_test_of_vm(call.params["vm_name"], actor=call.actor))

    @route("POST", "/failover/rollback", status=202, body=RollbackIn, errors=(NotFound, Conflict, Invalid),
           tags=_TAGS)
    async def rollback(self, call: Call) -> dict[str, Any]:
        """Undo the VM's failover in force: a test by the end-test path; a live one by destroying the
        CloudStack VM and attaching the volumes back here (the source powered on when asked)."""
        b: RollbackIn = call.body
        return _started(await self.failovers.rollback(_which(b.context_id, b.vm_id, b.vm_name), b.failover_type,
                                                      actor=call.actor, power_on_source=b.power_on_source))

    @route("POST", "/failover/{vm_name}/cleanup-failed", status=202, errors=(NotFound, Conflict, Invalid),
           tags=_TAGS)
    async def cleanup_failed(self, call: Call) -> dict[str, Any]:
        """Undo what the VM's last failed failover job left (its undo steps, as a job of their own)."""
        return _started(await self.failovers.cleanup_failed(call.params["vm_name"], actor=call.actor))

    @route("GET", f"/failover/{_JOB}/status", params=_JOB_ID, errors=(NotFound,), tags=_TAGS)
    async def status(self, call: Call) -> dict[str, Any]:
        """A failover job with its steps: each one's status, timings, what it produced, its error."""
        out = await self.failovers.status(call.params["job_id"])
        return {"success": True, "message": out["status"], **out}

    @route("GET", "/failover/jobs", query=JobsQuery, errors=(NotFound,), tags=_TAGS)
    async def jobs(self, call: Call) -> dict[str, Any]:
        """Failover jobs, newest first."""
        q: JobsQuery = call.query
        return {"success": True, **await self.failovers.find(vm_id=q.vm_id, status=q.status,
                                                             failover_type=q.failover_type, limit=q.limit,
                                                             offset=q.offset)}


__all__ = ["FailoverApi"]
