"""POST /tunnels/terminate through the real volume-agent, as a compromised omad could call it."""

from __future__ import annotations

import asyncio
import time

import pytest

from oma_common.rpc import AgentClient

from ..rig import Stack

pytestmark = [pytest.mark.timeout(120)]


async def test_a_huge_terminate_request_does_not_stall_the_other_calls(stack_config: Stack) -> None:
    """Every pid named is looked at in /proc (is it sshd's monitor?): a request naming as many as a 4 MiB body
    holds (each pid 2, never a tunnel session, so each is skipped) must not hold up the agent's other calls
    while it is checked."""
    stack_config.start("volume-agent")
    sock = stack_config.run_dir / "volume-agent.sock"
    big, probe = AgentClient("volume-agent", sock, timeout=110), AgentClient("volume-agent", sock, timeout=110)
    try:
        sessions = [{"pid": 2, "start_time": 0}] * 130_000
        flood = asyncio.ensure_future(big.call("POST", "/tunnels/terminate", json={"sessions": sessions}))
        await asyncio.sleep(1.0)  # the request is read and being checked
        slowest = 0.0
        while not flood.done():
            began = time.monotonic()
            await probe.call("GET", "/health")
            slowest = max(slowest, time.monotonic() - began)
            await asyncio.sleep(0.05)
        out = await flood
        assert out["terminated"] == [] and len(out["skipped"]) == len(sessions)
        assert slowest < 1.0, f"GET /health waited {slowest:.1f} s behind the terminate request"
    finally:
        await big.close()
        await probe.close()
