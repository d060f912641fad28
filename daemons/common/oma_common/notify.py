"""sd_notify for Type=notify units; silent when NOTIFY_SOCKET is not set (foreground runs, tests)."""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    """READY=1 only when sockets are bound and state is reconciled; STOPPING=1 when draining starts."""

    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier() if self._enabled else None

    def _send(self, line: str) -> None:
        if self._sd is not None:
            self._sd.notify(line)

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        log.info("ready%s", f": {status}" if status else "")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")
