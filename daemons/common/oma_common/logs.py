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
    handler.setFormatter(logging.Formatter(fmt))
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
