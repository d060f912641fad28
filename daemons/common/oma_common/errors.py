"""Domain errors: what went wrong, in words and a stable code, with no knowledge of HTTP."""

from __future__ import annotations

from typing import Any


class OmaError(Exception):
    """Base of every error a daemon reports to its caller on purpose.

    `status` is the HTTP status the edge answers with. It is the one fact about HTTP an error carries, kept
    here so that a route's declared errors and the OpenAPI document come from the same place as the answer.
    """

    code = "error"
    status = 500

    def __init__(self, message: str, details: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or message
        self.extra = extra

    def __str__(self) -> str:
        return self.message if self.details == self.message else f"{self.message}: {self.details}"


class Invalid(OmaError):
    """The request is malformed or breaks a rule of the resource."""

    code = "invalid_request"
    status = 400


class Unauthorized(OmaError):
    """No valid credentials were presented."""

    code = "unauthorized"
    status = 401


class Forbidden(OmaError):
    """Credentials are valid but do not allow this."""

    code = "forbidden"
    status = 403


class NotFound(OmaError):
    """The named resource does not exist."""

    code = "not_found"
    status = 404


class Conflict(OmaError):
    """The resource is in a state that does not allow this now (busy, exists, has dependents)."""

    code = "conflict"
    status = 409


class TooLarge(OmaError):
    """The request body is larger than allowed."""

    code = "payload_too_large"
    status = 413


class RateLimited(OmaError):
    """Too many attempts; `retry_after` seconds tell when to try again."""

    code = "rate_limited"
    status = 429


class Exhausted(OmaError):
    """A bounded resource (ports, slots) has none left."""

    code = "exhausted"
    status = 409


class Unavailable(OmaError):
    """A collaborator (an agent, the VMA, CloudStack) cannot be reached or failed."""

    code = "unavailable"
    status = 503


class InsufficientStorage(OmaError):
    """The daemon cannot store what the request changes: its disk is full (RFC 4918's 507). Nothing was changed;
    the same request succeeds once space is freed."""

    code = "insufficient_storage"
    status = 507


class TimedOut(OmaError):
    """A collaborator did not answer in time."""

    code = "timeout"
    status = 504


class Internal(OmaError):
    """Something failed that the caller cannot fix; the log has the details."""

    code = "internal_error"
    status = 500


BY_CODE: dict[str, type[OmaError]] = {
    cls.code: cls
    for cls in (
        OmaError, Invalid, Unauthorized, Forbidden, NotFound, Conflict, TooLarge, RateLimited,
        Exhausted, Unavailable, InsufficientStorage, TimedOut, Internal,
    )
}


# The canonical class of each status (Exhausted shares 409 with Conflict); 416 from a byte range is a 400's kin.
_BY_STATUS: dict[int, type[OmaError]] = {
    **{cls.status: cls for cls in (Invalid, Unauthorized, Forbidden, NotFound, Conflict, TooLarge, RateLimited,
                                   Internal, Unavailable, InsufficientStorage, TimedOut)},
    416: Invalid,
}


def from_body(body: dict[str, Any], status: int = 503) -> OmaError:
    """Rebuild a domain error from the JSON error body (and HTTP status) another daemon sent.

    The class comes from the body's code when it is a known one, else from the status; the agent's own
    code (e.g. "path_escapes_mount") is kept so the caller sees it.
    """
    code = str(body.get("code", ""))
    cls = BY_CODE.get(code) or _BY_STATUS.get(status, Unavailable)
    extra = {k: v for k, v in body.items() if k not in {"error", "details", "code", "timestamp"}}
    err = cls(str(body.get("error") or f"agent error {status}"), body.get("details"), **extra)
    if code:
        err.code = code
    return err


# What any call to another daemon or a remote system (an agent, the VMA, vCenter) may end in; a route whose
# handler makes such a call declares these with its own errors.
CALLS_OUT: tuple[type[OmaError], ...] = (Unavailable, TimedOut)
