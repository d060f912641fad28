"""The start-up gate of nbd-pool's routes: a request waits for reconciliation, then every request passes."""

from __future__ import annotations

import asyncio

import pytest

from nbd_pool.api import Gate
from oma_common.errors import Unavailable


async def test_a_request_waits_for_the_gate_then_passes() -> None:
    gate = Gate(timeout=30)
    waiting = asyncio.ensure_future(gate.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.open()
    await waiting
    # Once open: answered without suspending (no timer, no task: wait_for makes both for every call).
    step = gate.wait().__await__()
    with pytest.raises(StopIteration):
        step.send(None)


async def test_a_gate_that_stays_closed_answers_unavailable() -> None:
    with pytest.raises(Unavailable, match="starting"):
        await Gate(timeout=0.01).wait()
