"""Logging to stderr for the journal, one line per event, each line naming the resource it is about."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Iterator

_resource: contextvars.ContextVar[str] = contextvars.ContextVar("oma_resource", default="-")
# The network address of the caller whose request is being handled ("" outside a request); the HTTP edge
# sets it, the audit trail records it. Tasks started by the request inherit it.
caller_address: contextvars.ContextVar[str] = contextvars.ContextVar("oma_caller_address", default="")


# Control characters but tab, escaped in messages: a caller's string or a guest's file name that holds a newline
# would otherwise start a line of its own, which the journal shows as an event of ours (a forged one).
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c != 0x09} | {0x0A: "\\n", 0x0D: "\\r"}


class _OneLine(logging.Formatter):
    """One event, one line: the message's control characters escaped (a traceback still follows on its own
    lines, added after the message)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPES)


class _ResourceFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "resource", None):
            record.resource = _resource.get()
        return True


def setup(daemon: str, level: str = "INFO") -> None:
    """Configure the root logger; the journal adds its own timestamps, a terminal gets ours."""
    fmt = "%(levelname)s %(name)s [%(resource)s] %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + daemon + " " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(fmt))
    handler.addFilter(_ResourceFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@contextlib.contextmanager
def resource(name: str) -> Iterator[None]:
    """Tag every log line written inside this block (and its tasks) with `name`."""
    token = _resource.set(name)
    try:
        yield
    finally:
        _resource.reset(token)


def tag(name: str) -> dict[str, str]:
    """`extra=` for one log call about `name`."""
    return {"resource": name}
