"""oma_common.together.every: a failure is raised only once the others have ended too."""

from __future__ import annotations

import asyncio

import pytest

from oma_common.together import every

pytestmark = [pytest.mark.timeout(30)]


async def test_results_in_order() -> None:
    async def after(seconds: float, value: int) -> int:
        await asyncio.sleep(seconds)
        return value

    assert await every(after(0.02, 1), after(0, 2)) == [1, 2]
    assert await every() == []


async def test_a_failure_waits_for_the_others() -> None:
    release = asyncio.Event()
    ended: list[str] = []

    async def fails() -> None:
        raise ValueError("first")

    async def slow() -> None:
        await release.wait()
        ended.append("slow")

    task = asyncio.ensure_future(every(fails(), slow()))
    await asyncio.sleep(0.05)
    assert not task.done()  # asyncio.gather would have raised by now, with `slow` still running
    release.set()
    with pytest.raises(ValueError, match="first"):
        await task
    assert ended == ["slow"]
