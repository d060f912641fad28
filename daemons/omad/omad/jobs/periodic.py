"""A background pass run every interval on an injectable clock, outliving a failed pass."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Sleeper(Protocol):
    async def sleep(self, seconds: float) -> None: ...


class Periodic:
    """start()/stop() for Omad.background: sleep `interval`, run `work`, log a failure, repeat."""

    def __init__(self, name: str, clock: Sleeper, interval: Callable[[], float],
                 work: Callable[[], Awaitable[Any]]) -> None:
        self.name = name
        self.clock = clock
        self.interval = interval
        self.work = work
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await self.clock.sleep(self.interval())
            try:
                await self.work()
            except Exception:  # noqa: BLE001 - the service must outlive one bad pass
                log.exception("%s failed", self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
