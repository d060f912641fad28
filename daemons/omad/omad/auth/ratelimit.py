"""Limiting per source address (failed logins, public enrollment calls), with an injectable clock."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from oma_common.errors import RateLimited


class FailureLimiter:
    """After `limit` failures inside `window` seconds from one source, refuse until the oldest ages out."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic, *,
                 what: str = "failed logins") -> None:
        self.what = what  # what is counted, for the refusal's message
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, source: str) -> deque[float]:
        q = self._failures.setdefault(source, deque())
        cutoff = self.clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            self._failures.pop(source, None)
        return q

    def check(self, source: str) -> None:
        q = self._recent(source)
        if len(q) >= self.limit:
            retry = max(1, int(q[0] + self.window - self.clock()) + 1)
            raise RateLimited(f"too many {self.what}",
                              f"{len(q)} {self.what} from {source} in the last {int(self.window)} s; "
                              f"try again in {retry} s", retry_after=retry)

    def failed(self, source: str) -> None:
        self._recent(source)
        self._failures.setdefault(source, deque()).append(self.clock())

    def attempt(self, source: str) -> None:
        """Count one call from `source`, refusing it once `limit` calls fell inside the window (a request limit)."""
        self.check(source)
        self.failed(source)

    def succeeded(self, source: str) -> None:
        self._failures.pop(source, None)
