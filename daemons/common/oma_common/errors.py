"""Domain errors: what went wrong, in words and a stable code, with no knowledge of HTTP."""

from __future__ import annotations

from typing import Any


class OmaError(Exception):
    """Base of every error a daemon reports to its caller on purpose."""

    code = "error"

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


class Unauthorized(OmaError):
    """No valid credentials were presented."""

    code = "unauthorized"


class Forbidden(OmaError):
    """Credentials are valid but do not allow this."""

    code = "forbidden"


class NotFound(OmaError):
    """The named resource does not exist."""

    code = "not_found"


class Conflict(OmaError):
    """The resource is in a state that does not allow this now (busy, exists, has dependents)."""

    code = "conflict"


class TooLarge(OmaError):
    """The request body is larger than allowed."""

    code = "payload_too_large"


class RateLimited(OmaError):
    """Too many attempts; `retry_after` seconds tell when to try again."""

    code = "rate_limited"


class Exhausted(OmaError):
    """A bounded resource (ports, slots) has none left."""

    code = "exhausted"


class Unavailable(OmaError):
    """A collaborator (an agent, the VMA, CloudStack) cannot be reached or failed."""

    code = "unavailable"


class TimedOut(OmaError):
    """A collaborator did not answer in time."""

    code = "timeout"


class Internal(OmaError):
    """Something failed that the caller cannot fix; the log has the details."""

    code = "internal_error"


BY_CODE: dict[str, type[OmaError]] = {
    cls.code: cls
    for cls in (
        OmaError, Invalid, Unauthorized, Forbidden, NotFound, Conflict, TooLarge, RateLimited,
        Exhausted, Unavailable, TimedOut, Internal,
    )
}


_BY_STATUS: dict[int, type[OmaError]] = {
    400: Invalid, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: TooLarge, 416: Invalid,
    429: RateLimited, 500: Internal, 503: Unavailable, 504: TimedOut,
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
