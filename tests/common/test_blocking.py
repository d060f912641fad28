"""oma_common.blocking: a thread's result that its cancelled caller will never see is undone, after the thread ends."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from oma_common.blocking import run_blocking, run_to_end

from ..lib.gate import Gate, cancel_inside, open_fds

pytestmark = [pytest.mark.timeout(30)]


def open_devnull() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


async def test_result_and_exception_pass_through() -> None:
    fd = await run_blocking(open_devnull, undo=os.close)
    os.close(fd)  # not undone: the caller got it
    with pytest.raises(FileNotFoundError):
        await run_blocking(os.open, "/nonexistent/x", os.O_RDONLY, undo=os.close)
    assert await run_blocking(lambda a, *, b: a + b, 1, b=2) == 3


async def test_a_descriptor_opened_for_a_cancelled_caller_is_closed() -> None:
    before = open_fds()
    gate = Gate(open_devnull)
    task = asyncio.create_task(run_blocking(gate, undo=os.close))
    await cancel_inside(gate, task)
    assert open_fds() == before


async def test_the_caller_ends_after_the_thread_even_when_cancelled_again() -> None:
    before = open_fds()
    gate = Gate(open_devnull)
    task = asyncio.create_task(run_blocking(gate, undo=os.close))
    assert await asyncio.to_thread(gate.entered.wait, 30)
    for _ in range(3):  # a timeout, then a shutdown, then another: the thread still runs
        task.cancel()
        await asyncio.sleep(0.01)
        assert not task.done()
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.returned.is_set() and open_fds() == before


async def test_a_request_is_awaited_to_its_end_and_its_answer_undone_for_a_cancelled_caller() -> None:
    answered, release, undone = asyncio.Event(), asyncio.Event(), []

    async def request() -> str:  # another daemon making something, then answering with its id
        await release.wait()
        answered.set()
        return "att-1"

    task = asyncio.create_task(run_to_end(request(), undo=undone.append))
    await asyncio.sleep(0.01)
    for _ in range(2):  # the client went, then the daemon stops
        task.cancel()
        await asyncio.sleep(0.01)
        assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert answered.is_set() and undone == ["att-1"]
    assert await run_to_end(request(), undo=undone.append) == "att-1" and undone == ["att-1"]


async def test_the_undo_does_not_hold_the_event_loop() -> None:
    """An undo may wait (reaping a killed child, closing on a hung filesystem): the loop serves meanwhile."""
    loop_ran = threading.Event()
    undone: list[int] = []
    loop_served: list[bool] = []

    def slow_undo(fd: int) -> None:
        undone.append(fd)
        # set by a task on the loop: only possible when this does not run on the loop
        loop_served.append(loop_ran.wait(5))
        os.close(fd)

    async def tick() -> None:
        while not undone:
            await asyncio.sleep(0.01)
        loop_ran.set()

    ticker = asyncio.ensure_future(tick())
    gate = Gate(open_devnull)
    task = asyncio.create_task(run_blocking(gate, undo=slow_undo))
    await cancel_inside(gate, task)
    await ticker
    for _ in range(1000):  # the undo's thread records the outcome of its wait just after the ticker ends
        if loop_served:
            break
        await asyncio.sleep(0.01)
    assert undone and loop_served == [True]  # the undo did not wait out its 5 s: the loop ran meanwhile
