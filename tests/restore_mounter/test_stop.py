"""restore-mounter told to stop (SIGTERM: `systemctl stop`, or restart during an upgrade) while a mount's attach is
in flight in nbd-pool: it exits within seconds, answers the mount 503 shutting_down, and leaves nothing behind.

The attach is held in the real nbd-pool (conftest.held_attach).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from ..lib.diskimages import mbr_ext4
from ..rig import Stack
from .conftest import DAEMON, Agent, HeldAttach, Reply, attachments, leaks, nbd_pool_settled, start_agent

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

#: How long restore-mounter may take to exit once told to stop mid-attach. Well under the old wait (nbd-pool's
#: answer, up to the client's 120 s timeout; systemd kills it at TimeoutStopSec=30s), well over the few seconds
#: it takes (its default grace for the attach's answer is 3 s) on a loaded machine.
STOP_BOUND = 20.0


@pytest.fixture
def image(agent_config: Stack) -> Path:
    return mbr_ext4(agent_config.state / "disk.raw", {"etc/hostname": b"guest\n"}).path


def until(what: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def mount_being_made(agent: Agent, image: Path, mount_id: str, hold: HeldAttach,
                     pool: ThreadPoolExecutor) -> Future[Reply]:
    """POST /mounts, waiting until nbd-pool is held in its attach."""
    qcow2 = agent.image(image)
    answer = pool.submit(agent.request, "POST", "/mounts", body={"image": str(qcow2), "mount_id": mount_id})
    until(lambda: hold.entered() or answer.done())
    assert not answer.done(), answer.result().body
    return answer


def stop_promptly(stack: Stack) -> float:
    """SIGTERM restore-mounter; it must exit, cleanly, within STOP_BOUND. Returns how long it took."""
    d = stack.daemons[DAEMON]
    assert d.proc is not None
    t0 = time.monotonic()
    os.kill(d.pid, signal.SIGTERM)
    try:
        code = d.proc.wait(STOP_BOUND)
    except subprocess.TimeoutExpired:
        d.stop(sig=signal.SIGKILL)
        pytest.fail(f"restore-mounter still running {STOP_BOUND:g} s after SIGTERM, during an attach"
                    f"{d.log_tail(30)}")
    assert code == 0, d.log_tail(30)
    d.stop()  # closes the launcher's side (the process is gone)
    return time.monotonic() - t0


def nothing_left_of(stack: Stack, agent: Agent, image: Path, mount_id: str) -> None:
    """No record claims the mount, no mount point, mount or device under the mount root."""
    records = json.loads((stack.state / DAEMON / "mounts.json").read_text())["items"]
    assert [r["mount_id"] for r in records] == [], records
    assert os.listdir(agent.mount_root) == []
    assert leaks(agent.mount_root, [image]) == []


def test_stop_during_a_held_attach_exits_promptly_and_leaves_nothing(agent_config: Stack, held_attach: HeldAttach,
                                                                    image: Path) -> None:
    agent = start_agent(agent_config)
    with ThreadPoolExecutor(1) as pool:
        answer = mount_being_made(agent, image, "stopped", held_attach, pool)
        stop_promptly(agent_config)
        r = answer.result(timeout=10)
    assert (r.status, r.json["code"]) == (503, "shutting_down"), r.body
    assert r.json["mount_id"] == "stopped"
    nothing_left_of(agent_config, agent, image, "stopped")
    # nbd-pool finishes the attach it was held in after restore-mounter hung up (aiohttp >= 3.9 runs a handler to
    # its end); what it made carries the mount's owner tag, which the next start of restore-mounter releases.
    held_attach.release()
    nbd_pool_settled(agent_config)
    assert {a["owner"] for a in attachments(agent_config)} <= {"restore-mounter:stopped"}
    agent_config.start(DAEMON)
    assert agent_config.daemons[DAEMON].status == "0 mount(s) re-adopted, 0 removed"
    assert attachments(agent_config) == []
    nothing_left_of(agent_config, agent, image, "stopped")
    # And the restarted daemon mounts (the same image, under the same id).
    m = agent.mount(image, "stopped")
    assert agent.download(m["mount_id"], "/etc/hostname").body == b"guest\n"
    assert agent.unmount("stopped").status == 200
    assert attachments(agent_config) == [] and leaks(agent.mount_root, [image]) == []


def test_an_attach_answered_during_the_stop_grace_is_released_at_once(agent_config: Stack, held_attach: HeldAttach,
                                                                      image: Path) -> None:
    agent_config.add_config(DAEMON, "60-grace.toml", "stop_attach_grace_seconds = 20\n")
    agent = start_agent(agent_config)
    log = agent_config.state / "logs" / f"{DAEMON}.log"
    with ThreadPoolExecutor(1) as pool:
        answer = mount_being_made(agent, image, "graced", held_attach, pool)
        d = agent_config.daemons[DAEMON]
        os.kill(d.pid, signal.SIGTERM)
        until(lambda: "waiting up to 20 s for nbd-pool" in log.read_text())
        held_attach.release()  # nbd-pool answers while restore-mounter stops: it detaches what it was given
        assert d.proc is not None
        assert d.proc.wait(STOP_BOUND) == 0, d.log_tail(30)
        d.stop()
        r = answer.result(timeout=10)
    assert (r.status, r.json["code"]) == (503, "shutting_down"), r.body
    nothing_left_of(agent_config, agent, image, "graced")
    assert attachments(agent_config) == []  # released now, not at the next start
