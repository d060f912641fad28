"""Blocking work in a thread, safe against cancellation: what the thread returns after its caller is gone is undone."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def run_blocking(fn: Callable[..., T], *args: Any, undo: Callable[[T], object] | None = None,
                       **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in the default executor; its result, or its exception.

    A thread cannot be cancelled. When the awaiting task is (client gone, timeout, daemon stopping),
    `asyncio.to_thread` raises CancelledError at once while the thread goes on, and what it then returns
    (descriptors, a child process, a lock) lands in a future nobody reads. Here the cancelled caller waits
    for the thread to end, so nothing the thread still uses is released under it, has `undo` undo the result
    (in the executor too: it may wait, as reaping a killed child or closing on a hung filesystem does, and the
    loop serves meanwhile), waits for that as well, and then raises the CancelledError. Further cancellations
    while it waits are absorbed; one CancelledError comes out.
    """
    ctx = contextvars.copy_context()  # as asyncio.to_thread does: the thread sees the caller's context
    fut = asyncio.get_running_loop().run_in_executor(None, functools.partial(ctx.run, fn, *args, **kwargs))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await _settle(fut, undo, getattr(fn, "__qualname__", repr(fn)))
        raise


async def _settle(fut: asyncio.Future[T], undo: Callable[[T], object] | None, what: str) -> None:
    await _outlive(fut)
    if undo is None or fut.cancelled() or fut.exception() is not None:
        return
    undoing = asyncio.get_running_loop().run_in_executor(None, undo, fut.result())
    await _outlive(undoing)
    if not undoing.cancelled() and undoing.exception() is not None:
        log.error("undoing what %s returned after its caller was cancelled failed", what,
                  exc_info=undoing.exception())


async def _outlive(fut: asyncio.Future[Any]) -> None:
    """Wait for `fut` to end, whatever cancels the waiter meanwhile."""
    while not fut.done():
        try:
            await asyncio.wait([fut])  # unlike awaiting it, asyncio.wait never cancels `fut`
        except asyncio.CancelledError:
            continue
