"""Login limiting per source address, with an injectable clock.

Every attempt is counted *before* the slow password check, in the same step as the limit check (no await in
between), so a burst of concurrent guesses cannot all pass the check before the first failure is recorded.
A successful login withdraws only its own attempt: it does not forgive the failures around it, so a guesser
who also knows one valid password cannot reset the count.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable

from oma_common.errors import RateLimited

Attempt = tuple[float, int]


class FailureLimiter:
    """At most `limit` attempts that did not succeed inside `window` seconds from one source."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._attempts: dict[str, deque[Attempt]] = {}
        self._seq = itertools.count()

    def _recent(self, source: str) -> deque[Attempt]:
        q = self._attempts.setdefault(source, deque())
        cutoff = self.clock() - self.window
        while q and q[0][0] <= cutoff:
            q.popleft()
        return q

    def attempt(self, source: str) -> Attempt:
        """Count one attempt, or raise RateLimited when the source has used up its attempts."""
        q = self._recent(source)
        if len(q) >= self.limit:
            retry = max(1, int(q[0][0] + self.window - self.clock()) + 1)
            raise RateLimited("too many failed logins",
                              f"{len(q)} failed logins from {source} in the last {int(self.window)} s; "
                              f"try again in {retry} s", retry_after=retry)
        a = (self.clock(), next(self._seq))
        q.append(a)
        return a

    def withdraw(self, source: str, attempt: Attempt) -> None:
        """This attempt succeeded, or was never judged: forget it (and only it)."""
        q = self._attempts.get(source)
        if q is not None:
            try:
                q.remove(attempt)
            except ValueError:
                pass
            if not q:
                self._attempts.pop(source, None)

    def pending(self, source: str) -> int:
        return len(self._recent(source))
