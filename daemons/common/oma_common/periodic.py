"""A background pass run every interval until stopped, outliving a failed pass: the one loop every daemon uses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger("oma.periodic")


class Sleeper(Protocol):
    async def sleep(self, seconds: float) -> None: ...


class RealTime:
    """The wall clock's sleep; tests pass a fake clock with the same method instead."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class Periodic:
    """Sleep `interval` (a number or a callable read before every sleep), run `work`, log a failure, repeat.

    `immediately=True` runs the first pass at start instead of after the first sleep. The figures (passes,
    last pass, last error) are kept for the daemons' health and status answers.
    """

    def __init__(self, name: str, work: Callable[[], Awaitable[Any]], interval: float | Callable[[], float], *,
                 clock: Sleeper | None = None, immediately: bool = False,
                 logger: logging.Logger | None = None) -> None:
        self.name = name
        self.work = work
        self._interval = interval
        self.clock = clock or RealTime()
        self.immediately = immediately
        self._log = logger or log
        self._task: asyncio.Task[None] | None = None
        self._in_pass = False
        self._stopping = False
        self.passes = 0
        self.last_pass_at: float | None = None
        self.last_error = ""

    @property
    def interval(self) -> float:
        return self._interval() if callable(self._interval) else self._interval

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def run_once(self) -> Any:
        """One pass now; a failure is logged and remembered, never raised (the loop must go on)."""
        try:
            result = await self.work()
            self.last_error = ""
        except Exception as e:  # noqa: BLE001 - one bad pass must not end the loop
            self._log.exception("%s failed; trying again in %gs", self.name, self.interval)
            self.last_error = str(e) or type(e).__name__
            result = None
        self.passes += 1
        self.last_pass_at = time.time()
        return result

    async def _pass(self) -> None:
        self._in_pass = True
        try:
            await self.run_once()
        finally:
            self._in_pass = False

    async def _loop(self) -> None:
        if self.immediately:
            await self._pass()
        while not self._stopping:
            await self.clock.sleep(self.interval)
            await self._pass()

    async def stop(self) -> None:
        """End the loop: a sleep is cut short, a pass under way is let finish (never cancelled half-way)."""
        if self._task is None:
            return
        self._stopping = True
        if not self._in_pass:
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self._stopping = False
