"""The one way a job that is being started is given up: whatever went wrong, it is undone and failed with the
reason, the failed start audited, and the caller's error carries the job's id (the scheduler follows it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from oma_common.errors import Internal, OmaError, Unavailable

from ..audit import Audit

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def undone_on_failure(job_id: str, *, kind: str, id_key: str, fail: Callable[[str, str], Awaitable[Any]],
                            audit: Audit, actor: str, action: str, resource: str,
                            **audit_details: Any) -> AsyncIterator[None]:
    """Run a job's start steps; on any failure call `fail(job_id, reason)`, audit it, and raise the error
    again with `{id_key: job_id}` among its extras (an unexpected one as Internal)."""
    try:
        yield
    except asyncio.CancelledError:
        await fail(job_id, f"interrupted: omad stopped while the {kind} was starting")
        raise
    except Exception as e:
        reason = str(e) if isinstance(e, OmaError) else f"internal error: {e!r}"
        if not isinstance(e, OmaError):
            log.exception("%s start crashed", kind, extra={"resource": job_id})
        await fail(job_id, reason)
        await audit.record(actor, action, resource, outcome="failed", reason=reason, **audit_details)
        if isinstance(e, OmaError):
            raise type(e)(e.message, e.details, **{**e.extra, id_key: job_id}) from e
        raise Internal(f"{kind} failed to start", "an unexpected error occurred; see the daemon log",
                       **{id_key: job_id}) from e


async def vma_started(what: str, start: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Await the VMA's answer to the start of a `what` ("replication", "backup"): a refusal, raised or answered
    as status 'failed', becomes an error that says the VMA refused it."""
    try:
        answer = await start
    except OmaError as e:
        raise type(e)(f"the VMA refused the {what}: {e.message}", e.details, **e.extra) from e
    if str(answer.get("status", "")).lower() == "failed":
        raise Unavailable(f"the VMA refused the {what}",
                          f"the VMA answered status 'failed': {answer.get('message') or '(no message)'}")
    return answer
