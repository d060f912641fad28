"""The CloudStack management server through the `cs` library's asyncio client: signed calls, async jobs awaited
with queryAsyncJobResult under a deadline, and CloudStack's errors turned into domain errors that keep its
errorcode and errortext."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import aiohttp

from oma_common.errors import Invalid, NotFound, OmaError, TimedOut, Unavailable

log = logging.getLogger("volume_agent.cloudstack")

PENDING, SUCCEEDED = 0, 1
# CloudStack's ApiErrorCode values that mean "your parameters are wrong" rather than "CloudStack failed".
PARAM_ERROR = 431


@dataclasses.dataclass(frozen=True)
class Settings:
    endpoint: str
    api_key: str
    secret_key: str = dataclasses.field(repr=False)
    verify_tls: bool = True
    request_timeout: float = 30.0
    job_timeout: float = 600.0
    poll_interval: float = 1.0


def cloudstack_error(command: str, code: int, text: str) -> OmaError:
    """CloudStack's answer as a domain error; its text is the details, its code rides along."""
    cls: type[OmaError] = Invalid if code == PARAM_ERROR else Unavailable
    return cls(f"CloudStack refused {command}", text or f"CloudStack error {code}", cloudstack_errorcode=code,
               cloudstack_errortext=text)


class CloudStack:
    def __init__(self, settings: Settings) -> None:
        # cs (and requests with it) on first use: an agent without CloudStack settings never needs it, and
        # importing it costs every start ~0.15 s of CPU.
        from cs import AIOCloudStack

        self.settings = settings
        self.client = AIOCloudStack(settings.endpoint, settings.api_key, settings.secret_key,
                                    timeout=max(1, int(settings.request_timeout)),
                                    dangerous_no_tls_verify=not settings.verify_tls)

    async def call(self, command: str, **params: Any) -> dict[str, Any]:
        """One synchronous command; the body of its `<command>response`."""
        from cs import CloudStackApiException, CloudStackException

        try:
            result = await asyncio.wait_for(getattr(self.client, command)(**params), self.settings.request_timeout)
        except CloudStackApiException as e:
            error = e.error if isinstance(e.error, dict) else {}
            raise cloudstack_error(command, int(error.get("errorcode", 0) or 0),
                                   str(error.get("errortext", "") or e)) from e
        except CloudStackException as e:
            raise Unavailable("CloudStack answered strangely", f"{command}: {e}") from e
        except asyncio.TimeoutError as e:
            raise TimedOut("CloudStack did not answer", f"{command}: no answer from {self.settings.endpoint} "
                                                        f"within {self.settings.request_timeout:g} s") from e
        except aiohttp.ClientError as e:
            raise Unavailable("CloudStack unreachable", f"{command}: {self.settings.endpoint}: {e}") from e
        return result if isinstance(result, dict) else {}

    async def listing(self, command: str, key: str, **params: Any) -> list[dict[str, Any]]:
        """A list command's items (`{}` from CloudStack is an empty list)."""
        items = (await self.call(command, **params)).get(key, [])
        return list(items)

    async def start(self, command: str, **params: Any) -> dict[str, Any]:
        """An async command, started: `{jobid}` (and `id` for the create commands)."""
        answer = await self.call(command, **params)
        if "jobid" not in answer:
            raise Unavailable("CloudStack answered strangely", f"{command} returned no jobid: {answer}")
        return answer

    async def wait(self, command: str, jobid: str, timeout: float | None = None) -> dict[str, Any]:
        """Poll queryAsyncJobResult until the job ends; its jobresult, or its error as a domain error."""
        limit = self.settings.job_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            job = await self.call("queryAsyncJobResult", jobid=jobid)
            status = int(job.get("jobstatus", PENDING))
            if status == SUCCEEDED:
                result = job.get("jobresult")
                return result if isinstance(result, dict) else {}
            if status != PENDING:
                result = job.get("jobresult") or {}
                raise cloudstack_error(command, int(result.get("errorcode", job.get("jobresultcode", 0)) or 0),
                                       str(result.get("errortext", "")))
            if time.monotonic() >= deadline:
                raise TimedOut(f"CloudStack job {command} did not finish",
                               f"job {jobid} still pending after {limit:g} s")
            await asyncio.sleep(self.settings.poll_interval)

    async def run(self, command: str, **params: Any) -> dict[str, Any]:
        answer = await self.start(command, **params)
        return await self.wait(command, answer["jobid"])

    # -- the lookups volume-agent needs ----------------------------------------------------------------

    async def volume(self, volume_id: str) -> dict[str, Any] | None:
        """The volume, or None when CloudStack has none with that id (431 on an unknown id, or an empty list)."""
        try:
            found = await self.listing("listVolumes", "volume", id=volume_id)
        except Invalid:
            return None
        return next((v for v in found if v.get("id") == volume_id), None)

    async def snapshot(self, snapshot_id: str) -> dict[str, Any] | None:
        try:
            found = await self.listing("listSnapshots", "snapshot", id=snapshot_id)
        except Invalid:
            return None
        return next((s for s in found if s.get("id") == snapshot_id), None)

    async def vm(self, vm_id: str) -> dict[str, Any]:
        found = await self.listing("listVirtualMachines", "virtualmachine", id=vm_id)
        vm = next((v for v in found if v.get("id") == vm_id), None)
        if vm is None:
            raise NotFound("appliance VM not found", f"CloudStack has no VM {vm_id}")
        return vm
