"""Blocking work in a thread, or a request to another daemon, safe against cancellation: a result nobody awaits is undone."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable
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
    return await _to_end(fut, undo, getattr(fn, "__qualname__", repr(fn)), in_thread=True)


async def run_to_end(aw: Awaitable[T], *, undo: Callable[[T], object] | None = None) -> T:
    """`aw` (a request to another daemon, say) awaited to its end even when the caller is cancelled meanwhile.

    Hanging up on a request does not undo it: the other daemon goes on (aiohttp runs a handler to its end
    whether or not the client is still there) and makes what was asked for, under an id the caller never
    learns. As with `run_blocking`, a cancelled caller here waits for the answer (bounded by the request's
    own timeout), hands it to `undo` (quick, on the loop: e.g. record it for the caller's own cleanup), and
    then raises the CancelledError.
    """
    fut = asyncio.ensure_future(aw)
    return await _to_end(fut, undo, getattr(aw, "__qualname__", repr(aw)), in_thread=False)


async def _to_end(fut: asyncio.Future[T], undo: Callable[[T], object] | None, what: str, *, in_thread: bool) -> T:
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await _settle(fut, undo, what, in_thread=in_thread)
        raise


async def wait_through(fut: asyncio.Future[Any]) -> None:
    """Wait until `fut` is done, absorbing any cancellation meanwhile (the caller raises its own afterwards):
    for a thread that still uses what the caller would release (a descriptor, a socket) once it returns."""
    while not fut.done():
        try:
            await asyncio.wait([fut])  # unlike awaiting it, asyncio.wait never cancels `fut`
        except asyncio.CancelledError:
            continue


async def _settle(fut: asyncio.Future[T], undo: Callable[[T], object] | None, what: str, *,
                  in_thread: bool) -> None:
    await wait_through(fut)
    if undo is None or fut.cancelled() or fut.exception() is not None:
        return
    if not in_thread:  # run_to_end's undo is quick and belongs to the loop (it records for the caller's cleanup)
        try:
            undo(fut.result())
        except Exception:
            log.exception("undoing what %s returned after its caller was cancelled failed", what)
        return
    # A thread's result is undone in a thread: an undo may block (a child's kill and reap), the loop must not.
    undoing = asyncio.get_running_loop().run_in_executor(None, undo, fut.result())
    await wait_through(undoing)
    if not undoing.cancelled() and undoing.exception() is not None:
        log.error("undoing what %s returned after its caller was cancelled failed", what,
                  exc_info=undoing.exception())
