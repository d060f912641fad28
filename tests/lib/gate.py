"""A blocking call held in its worker thread until the test lets it go, to cancel a request while its thread works,
and the process's own descriptors and children, to see that the cancelled request left none behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import psutil
import pytest

T = TypeVar("T")
WAIT = 30.0  # seconds; a test that reaches this is broken, not slow


class Gate(Generic[T]):
    """Wraps `fn`: a call waits (in its thread) until `release` is set, then runs `fn`."""

    def __init__(self, fn: Callable[..., T]) -> None:
        self.fn = fn
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()
        self.failed: BaseException | None = None  # what the wrapped call raised, if it did

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        self.entered.set()
        if not self.release.wait(WAIT):
            raise TimeoutError("the test never released the gate")
        try:
            result = self.fn(*args, **kwargs)
        except BaseException as exc:
            self.failed = exc
            raise
        finally:
            self.returned.set()
        return result


async def cancel_inside(gate: Gate[Any], task: asyncio.Task[Any]) -> None:
    """Cancel `task` while its thread is held in `gate`, let the thread go on, and wait until both have ended:
    the task with CancelledError, the thread after doing its work (for a caller nobody waits for any more)."""
    assert await asyncio.to_thread(gate.entered.wait, WAIT), "the call never reached its thread"
    task.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the task before the thread returns
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(gate.returned.wait, WAIT)
    assert gate.failed is None, f"the call itself failed: {gate.failed!r}"
    for _ in range(3):  # let callbacks the thread's return scheduled run (a cleanup would be one)
        await asyncio.sleep(0)


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what each one is."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # the directory listing's own descriptor, closed by now
    return out


def children() -> set[int]:
    """This process's live descendants (compare with `<=`: an earlier test's may end meanwhile)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
    return out
