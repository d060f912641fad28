"""A mount whose attachment dies (its qemu-storage-daemon killed, as the OOM killer would) is reported broken:
503 with the cause, health degraded, an unmount that leaves nothing, a new mount that works; a restart of
restore-mounter does not re-adopt it as mounted. Real nbd-pool, real restore-mounter, real processes."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from ..lib.diskimages import File, MiB, Pattern, Tree, mbr_ext4
from ..rig import Stack
from .conftest import DAEMON, Agent, attachments, leaks, start_agent

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

DATA = Pattern(4 * MiB, seed=5)
TREE: Tree = {"etc/hostname": b"guest\n", "var/data.bin": File(DATA), "home/u/notes.txt": b"notes\n"}


@pytest.fixture
def image(agent_config: Stack) -> Path:
    return mbr_ext4(agent_config.state / "disk.raw", TREE, size=32 * MiB).path


def serving_process(stack: Stack, attachment_id: str) -> psutil.Process:
    """The qemu-storage-daemon nbd-pool runs for the attachment: found in nbd-pool's state, and checked to be
    a child of this test's own nbd-pool before anything is signalled."""
    (att,) = [a for a in attachments(stack) if a["attachment_id"] == attachment_id]
    proc = psutil.Process(att["pid"])
    assert proc.ppid() == stack.daemons["nbd-pool"].pid
    assert os.path.basename(proc.cmdline()[0]) == "qemu-storage-daemon"
    assert any(str(stack.state) in arg for arg in proc.cmdline())
    return proc


def kill_attachment(stack: Stack, mount: dict[str, Any]) -> int:
    proc = serving_process(stack, mount["attachment_id"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return proc.pid


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_broken(agent: Agent, mount_id: str, pid: int) -> None:
    """Everything a user of the mount sees: a clear 503 naming the dead process, never a 500."""
    for r in (agent.request("GET", f"/mounts/{mount_id}/files", {"path": "/home/u"}),
              agent.request("GET", f"/mounts/{mount_id}/files", {"path": "/"}),
              agent.request("GET", f"/mounts/{mount_id}/file-info", {"path": "/etc/hostname"}),
              agent.download(mount_id, "/var/data.bin"),
              agent.request("GET", f"/mounts/{mount_id}/download-directory", {"path": "/etc"})):
        assert r.status == 503, r.body
        assert r.json["code"] == "mount_broken"
        assert "qemu-storage-daemon" in r.json["details"] and str(pid) in r.json["details"], r.json
        assert r.json["mount_id"] == mount_id
    m = agent.request("GET", f"/mounts/{mount_id}").json
    assert m["status"] == "broken" and "qemu-storage-daemon" in m["error"], m
    health = agent.request("GET", "/health").json
    assert health["status"] == "degraded", health
    (broken,) = health["broken_mounts"]
    assert broken["mount_id"] == mount_id and str(pid) in broken["error"]


def check_clean_unmount_and_remount(agent: Agent, stack: Stack, image: Path, mount_id: str) -> None:
    r = agent.unmount(mount_id)
    assert r.status == 200, r.body
    assert leaks(agent.mount_root, [image]) == []
    assert os.listdir(agent.mount_root) == []
    assert attachments(stack) == []
    assert agent.request("GET", "/health").json["status"] == "ok"
    # Mounting the same image again works and reads right.
    again = agent.mount(image, mount_id)
    assert again["status"] == "mounted"
    assert {e["name"] for e in agent.files(mount_id, "/")["files"]} >= {"etc", "var", "home"}
    r = agent.download(mount_id, "/var/data.bin")
    assert r.status == 200 and sha256(r.body) == sha256(b"".join(DATA.chunks()))
    assert agent.unmount(mount_id).status == 200
    assert leaks(agent.mount_root, [image]) == [] and attachments(stack) == []


def test_a_killed_attachment_is_reported_broken_and_can_be_mounted_again(agent_config: Stack, image: Path) -> None:
    agent = start_agent(agent_config)
    m = agent.mount(image, "b1")
    assert agent.files("b1", "/etc")["files"][0]["name"] == "hostname"  # read once: partly cached
    pid = kill_attachment(agent_config, m)
    check_broken(agent, "b1", pid)
    check_clean_unmount_and_remount(agent, agent_config, image, "b1")


def test_a_download_that_finds_the_attachment_dead_answers_503_before_any_byte(agent_config: Stack,
                                                                              image: Path) -> None:
    agent = start_agent(agent_config)
    m = agent.mount(image, "b2")
    pid = kill_attachment(agent_config, m)
    # The mount is not known broken yet (no listing, no sweep): the download itself finds out.
    assert '"broken"' not in (agent_config.state / DAEMON / "mounts.json").read_text()
    r = agent.download("b2", "/var/data.bin")
    assert r.status == 503 and r.json["code"] == "mount_broken" and str(pid) in r.json["details"], r.body
    check_clean_unmount_and_remount(agent, agent_config, image, "b2")


def test_the_periodic_pass_notices_without_any_request(agent_config: Stack, image: Path) -> None:
    agent = start_agent(agent_config, "cleanup_interval_seconds = 0.2\n")
    m = agent.mount(image, "b3")
    kill_attachment(agent_config, m)
    deadline = time.monotonic() + 10
    state = agent_config.state / DAEMON / "mounts.json"
    while '"broken"' not in state.read_text():
        assert time.monotonic() < deadline, "the sweep did not notice"
        time.sleep(0.05)
    check_clean_unmount_and_remount(agent, agent_config, image, "b3")


def test_a_restart_does_not_readopt_a_broken_mount_as_mounted(agent_config: Stack, image: Path) -> None:
    agent = start_agent(agent_config)
    m = agent.mount(image, "b4")
    d = agent_config.daemons[DAEMON]
    d.stop(sig=signal.SIGKILL)
    pid = kill_attachment(agent_config, m)  # dies while restore-mounter is down: only start-up can notice
    agent_config.start(DAEMON)
    assert agent_config.daemons[DAEMON].status.startswith("0 mount(s) re-adopted"), \
        agent_config.daemons[DAEMON].status
    check_broken(agent, "b4", pid)
    check_clean_unmount_and_remount(agent, agent_config, image, "b4")
