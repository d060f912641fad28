"""Per-resource concurrency policy: one mutating operation per key, refused (409) or queued by choice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from oma_common.errors import Conflict


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str, *, wait: bool = False, what: str = "") -> AsyncIterator[None]:
        """Hold `key`; when it is busy, wait (queue) or raise Conflict (reject) as the caller chose."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        if lock.locked() and not wait:
            raise Conflict("operation in progress", f"{what or key} is busy with another operation; try again later")
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                self._locks.pop(key, None)

    def busy(self, key: str) -> bool:
        lock = self._locks.get(key)
        return lock is not None and lock.locked()
