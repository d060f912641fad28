"""/vms/{vm_id}/…: what a failover of the VM would rely on, each view read from real state (failover/readiness.py)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from oma_common.errors import CALLS_OUT, Conflict, NotFound, OmaError
from oma_common.web import Call, route

from ..failover.readiness import Readiness

_TAGS = ("validation",)
_VM = "/vms/{vm_id:(?!inventory$)[^/]+}"
_ERRORS: tuple[type[OmaError], ...] = (NotFound, Conflict, *CALLS_OUT)


@dataclasses.dataclass
class TypeQuery:
    failover_type: Literal["test", "live"] = "test"


class ValidationApi:
    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness

    @route("GET", f"{_VM}/failover-readiness", query=TypeQuery, errors=_ERRORS, tags=_TAGS)
    async def failover_readiness(self, call: Call) -> dict[str, Any]:
        """Every prerequisite of a failover, a score and the actions still required."""
        q: TypeQuery = call.query
        return await self.readiness.readiness(call.params["vm_id"], q.failover_type)

    @route("GET", f"{_VM}/sync-status", errors=(NotFound,), tags=_TAGS)
    async def sync_status(self, call: Call) -> dict[str, Any]:
        """The last completed sync, a running one, each disk's change id."""
        return await self.readiness.sync_status(call.params["vm_id"])

    @route("GET", f"{_VM}/network-mapping-status", errors=(NotFound,), tags=_TAGS)
    async def network_mapping_status(self, call: Call) -> dict[str, Any]:
        """Which source networks are mapped, for live and for test failover."""
        return await self.readiness.network_mapping_status(call.params["vm_id"])

    @route("GET", f"{_VM}/volume-status", errors=_ERRORS, tags=_TAGS)
    async def volume_status(self, call: Call) -> dict[str, Any]:
        """Each disk's volume as volume-agent (attached here) and CloudStack (exists, state, VM) see it."""
        return await self.readiness.volume_status(call.params["vm_id"])

    @route("GET", f"{_VM}/active-jobs", errors=(NotFound,), tags=_TAGS)
    async def active_jobs(self, call: Call) -> dict[str, Any]:
        """The VM's jobs still pending or running."""
        return await self.readiness.active_jobs(call.params["vm_id"])

    @route("GET", f"{_VM}/configuration-check", errors=_ERRORS, tags=_TAGS)
    async def configuration_check(self, call: Call) -> dict[str, Any]:
        """The CloudStack config a failover uses: template, offering (fits the VM), zone."""
        return await self.readiness.configuration_check(call.params["vm_id"])
