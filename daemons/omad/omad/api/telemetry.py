"""POST /telemetry/{job_type}/{job_id}: progress reports of the VMA's clients, handed to the job type's owner."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from oma_common import schema
from oma_common.errors import Conflict, NotFound
from oma_common.web import Auth, Call, route

# A receiver validates the body against its own declared shape and records it.
Receiver = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def receiver(shape: type, record: Callable[[str, Any], Awaitable[dict[str, Any]]]) -> Receiver:
    """A receiver that parses the body as `shape` (400 listing every problem) and passes it to `record`."""

    async def receive(job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return await record(job_id, schema.parse(shape, body))

    return receive


class TelemetryApi:
    def __init__(self, receivers: dict[str, Receiver]) -> None:
        self.receivers = receivers

    @route("POST", "/telemetry/{job_type}/{job_id}", body=dict, errors=(NotFound, Conflict),
           auth=Auth.MACHINE, tags=("telemetry",))
    async def post(self, call: Call) -> dict[str, Any]:
        """A job's progress from the VMA (phase, bytes, rate, ETA, per disk); `failed` ends the job."""
        job_type = call.params["job_type"]
        receive = self.receivers.get(job_type)
        if receive is None:
            raise NotFound("unknown job type", f"no telemetry is taken for job type {job_type!r} "
                                               f"(known: {', '.join(sorted(self.receivers)) or 'none'})")
        return await receive(call.params["job_id"], call.body)
