"""POST /tunnels/terminate through the real volume-agent, as a compromised omad could call it."""

from __future__ import annotations

import pytest

from oma_common.errors import Invalid
from oma_common.rpc import AgentClient

from ..rig import Stack

pytestmark = [pytest.mark.timeout(120)]


async def test_a_terminate_request_names_at_most_max_sessions(stack_config: Stack) -> None:
    """Every pid named is looked at in /proc (is it sshd's monitor?): a request may name at most MAX_SESSIONS;
    more is refused before any is looked at (a 4 MiB body holds 130,000, which held the agent's other calls
    for 30 s), and the largest one allowed (each pid 2, never a tunnel session) is answered, each skipped."""
    from oma_common.contracts.volume_agent import MAX_SESSIONS

    stack_config.start("volume-agent")
    client = AgentClient("volume-agent", stack_config.run_dir / "volume-agent.sock", timeout=60)
    try:
        with pytest.raises(Invalid):
            await client.call("POST", "/tunnels/terminate", json={"sessions": [{"pid": 2, "start_time": 0}] * 130_000})
        sessions = [{"pid": 2, "start_time": 0}] * MAX_SESSIONS
        out = await client.call("POST", "/tunnels/terminate", json={"sessions": sessions})
        assert out["terminated"] == [] and len(out["skipped"]) == len(sessions)
    finally:
        await client.close()
