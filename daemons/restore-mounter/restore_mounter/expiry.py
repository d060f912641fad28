"""Idle expiry: an injectable clock, the idle rule with its inhibitors, and the periodic sweep.

A mount expires when nobody has used it for `idle_timeout` seconds. Browsing, stat, downloads and archives
count as use; reading a mount's status does not. A running download or archive holds the mount (an
inhibitor, as in Proxmox Backup Server's watchdog): a held mount never expires, and its idle time starts
when the last holder lets go.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from oma_common.periodic import Periodic

log = logging.getLogger(__name__)


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class Idle(Protocol):
    """What the idle rule needs to know about a mount."""

    last_activity: float  # clock.monotonic() of the last use

    @property
    def in_use(self) -> bool: ...


class IdlePolicy:
    def __init__(self, clock: Clock, idle_timeout: float) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout

    def idle_for(self, m: Idle) -> float:
        return 0.0 if m.in_use else max(0.0, self.clock.monotonic() - m.last_activity)

    def expired(self, m: Idle) -> bool:
        return not m.in_use and self.idle_for(m) >= self.idle_timeout

    def expires_at(self, m: Idle) -> float:
        """Wall-clock time at which the mount expires if nobody uses it (a held mount: not before this)."""
        return self.clock.time() + max(0.0, self.idle_timeout - self.idle_for(m))


class Sweeper:
    """Every `interval` seconds, ask `sweep` to remove what has expired (the shared Periodic loop); counts
    what it did."""

    def __init__(self, sweep: Callable[[], Awaitable[int]], interval: float, clock: Clock) -> None:
        self.sweep = sweep
        self.interval = interval
        self.clock = clock
        self._periodic = Periodic("restore sweep", self.sweep_once, interval, logger=log)
        self.expired_total = 0
        self.sweeps = 0
        self.last_sweep_at: float | None = None
        self.last_error = ""

    @property
    def running(self) -> bool:
        return self._periodic.running

    async def start(self) -> None:
        await self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def sweep_once(self) -> int:
        try:
            removed = await self.sweep()
            self.last_error = ""
        except Exception as e:  # one bad sweep must not end the sweeping
            log.exception("sweep failed")
            self.last_error = str(e)
            removed = 0
        self.sweeps += 1
        self.expired_total += removed
        self.last_sweep_at = self.clock.time()
        return removed

    def status(self) -> dict[str, Any]:
        return {"running": self.running, "cleanup_interval": self.interval, "sweeps": self.sweeps,
                "expired_total": self.expired_total, "last_sweep_at": self.last_sweep_at,
                "last_error": self.last_error or None}
