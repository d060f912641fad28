"""RFC 3339 UTC timestamps, the one text form every daemon stores and answers (CONTRACTS.md)."""

from __future__ import annotations

from datetime import datetime, timezone


def rfc3339(when: datetime | float | None = None, *, timespec: str = "milliseconds") -> str:
    """`when` (an aware datetime, epoch seconds, or now) as "2026-12-06T16:00:00.000Z"."""
    if when is None:
        dt = datetime.now(timezone.utc)
    elif isinstance(when, datetime):
        dt = when.astimezone(timezone.utc)
    else:
        dt = datetime.fromtimestamp(when, timezone.utc)
    return dt.isoformat(timespec=timespec).replace("+00:00", "Z")


def utcnow() -> str:
    """Now, to the millisecond: stored timestamps sort and compare correctly as text."""
    return rfc3339()


def parse_rfc3339(text: str) -> datetime:
    """The aware datetime of a stored or received RFC 3339 text ("Z" or an offset)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
