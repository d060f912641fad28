"""Mount, unmount, refusals, busy mounts, idle expiry and kill -9 reconciliation through the real daemon."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ..lib.diskimages import File, MiB, Pattern, Tree, gpt_ntfs, gpt_two_ext4, mbr_ext4, mbr_fat
from ..lib.filetree import file_sha256
from ..rig import Stack
from .conftest import DAEMON, attachments, leaks, start_agent

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

BIG = File(Pattern(64 * MiB, seed=3))
TREE: Tree = {"big.bin": BIG, "etc/hostname": b"guest\n"}


def until(what: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture
def image(agent_config: Stack) -> Path:
    return mbr_ext4(agent_config.state / "disk.raw", TREE).path


def test_mount_and_unmount_leave_nothing(agent_config: Stack, image: Path) -> None:
    agent = start_agent(agent_config)
    m = agent.mount(image)
    assert m["mount_id"].startswith("mnt-") and Path(m["mount_path"], "part1", "etc", "hostname").exists()
    assert leaks(agent.mount_root, [image])  # it is there
    r = agent.unmount(m["mount_id"])
    assert r.status == 200 and r.json["status"] == "unmounted"
    assert leaks(agent.mount_root, [image]) == []
    assert os.listdir(agent.mount_root) == []
    assert agent.unmount(m["mount_id"]).status == 404
    assert json.loads((agent_config.state / DAEMON / "mounts.json").read_text())["items"] == []


def test_refusals_leave_nothing(agent_config: Stack, image: Path) -> None:
    agent_config.add_config(DAEMON, "60-roots.toml", f'image_roots = ["{agent_config.state}"]\n')
    agent = start_agent(agent_config)
    zeros = agent_config.state / "zeros.raw"
    with open(zeros, "wb") as f:
        f.truncate(8 * MiB)
    qcow2, zeros = agent.image(image), agent.image(zeros)
    cases = [({"image": "relative.raw"}, 400, "invalid_request"),
             ({"image": str(agent_config.state / "missing.raw")}, 404, "not_found"),
             ({"image": str(agent_config.state)}, 400, "invalid_request"),
             ({"image": "/etc/hostname"}, 403, "forbidden"),
             ({"image": str(qcow2), "mount_id": "../x"}, 400, "invalid_request"),
             ({"image": str(qcow2), "mount_id": ".hidden"}, 400, "invalid_request"),
             ({"image": str(image)}, 400, "invalid_request"),  # not QCOW2: nbd-pool refuses to attach it
             ({"image": str(zeros)}, 400, "no_filesystem")]
    for body, status, code in cases:
        r = agent.request("POST", "/mounts", body=body)
        assert (r.status, r.json["code"]) == (status, code), (body, r.body)
    r = agent.request("POST", "/mounts", body={"image": str(zeros)})
    assert r.json["filesystems"] == [{"partition": 0, "type": None, "reason": "no filesystem recognised"}]
    assert leaks(agent.mount_root, [image, zeros, qcow2]) == []
    assert os.listdir(agent.mount_root) == []
    assert agent.request("GET", "/resources").json["available_slots"] == 8


def test_nothing_outside_the_image_roots_is_looked_at_for_a_caller(agent_config: Stack) -> None:
    """A compromised omad probes the host through restore-mounter, which runs as root: whether a path outside
    the image roots exists, what it is, or where a link it planted in a repository leads must not show in
    the answer. Every such probe gets the same refusal, naming nothing it did not send."""
    repo, private = agent_config.state / "repo", agent_config.state / "private"
    repo.mkdir()
    private.mkdir(mode=0o700)
    (private / "key").write_text("secret\n")
    (repo / "to-key").symlink_to(private / "key")
    (repo / "to-nothing").symlink_to(private / "nothing")
    (repo / "to-private").symlink_to(private)
    (private / "into-repo").symlink_to(repo / "nothing")  # outside as written, leads inside
    agent_config.add_config(DAEMON, "60-roots.toml", f'image_roots = ["{repo}"]\n')
    agent = start_agent(agent_config)
    probes = {
        "an existing file": (private / "key", False),
        "a missing file": (private / "nothing", False),
        "a directory": (private, False),
        "a link outside that leads inside": (private / "into-repo", False),
        "a link to an existing file": (repo / "to-key", True),
        "a link to a missing file": (repo / "to-nothing", True),
        "through a linked directory, existing": (repo / "to-private" / "key", True),
        "through a linked directory, missing": (repo / "to-private" / "nothing", True),
    }
    answers = {}
    for what, (path, planted) in probes.items():
        r = agent.request("POST", "/mounts", body={"image": str(path)})
        answers[what] = (r.status, r.json["code"], r.json["error"])
        if planted:
            assert str(private) not in r.json["details"], (what, r.body)
    assert set(answers.values()) == {(403, "forbidden", "image outside the repositories")}, answers
    assert os.listdir(agent.mount_root) == []


def test_a_guest_file_name_cannot_forge_a_line_of_the_agent_log(agent_config: Stack) -> None:
    """File names come from the guest: one holding a newline is logged as one line of ours when it is handed
    over, never as a line of its own that the journal would show as restore-mounter's (a forged event)."""
    forged = "CRITICAL restore_mounter.mounts [mnt-x] every backup was deleted"
    src = agent_config.state / "names"
    src.mkdir()
    (src / f"x\n{forged}").write_bytes(b"guest\n")  # (the tree builders refuse such names)
    image = agent_config.state / "names.raw"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(image)], check=True, capture_output=True)
    agent = start_agent(agent_config)
    agent.mount(image, "names")
    with agent.handover(f"/mounts/names/open?path=%2Fx%0A{forged.replace(' ', '%20')}") as h:
        assert h.reply.status == 200 and h.fd is not None, h.reply.body
    assert agent.unmount("names").status == 200
    log = agent_config.daemons[DAEMON].log_path.read_text()
    assert "handed over x" in log
    assert not [line for line in log.splitlines() if line.startswith(forged)], log


def test_a_handed_over_file_holds_the_mount(agent_config: Stack, image: Path) -> None:
    agent = start_agent(agent_config)
    m = agent.mount(image, "held")
    with agent.handover("/mounts/held/open?path=/big.bin") as h:
        assert h.reply.status == 200 and h.fd is not None
        info = agent.request("GET", "/mounts/held").json
        assert info["in_use"] and info["active_operations"] == 1
        r = agent.unmount("held")
        assert (r.status, r.json["code"], r.json["active_operations"]) == (409, "busy", 1)
        with ThreadPoolExecutor(1) as pool:
            forced = pool.submit(agent.unmount, "held", True)
            # The hold ends: restore-mounter closes the connection, and the holder (omad) lets go of the file.
            h.conn.settimeout(10)
            assert h.conn.recv(1) == b""
            os.close(h.fd)
            h.fd = None
            r = forced.result(timeout=30)
        assert r.status == 200, r.body
    assert leaks(agent.mount_root, [image]) == []
    assert m["mount_id"] not in [x["mount_id"] for x in agent.request("GET", "/mounts").json["mounts"]]


def test_idle_mounts_are_swept_but_not_while_a_file_is_handed_over(agent_config: Stack, image: Path) -> None:
    agent = start_agent(agent_config, "idle_timeout_seconds = 0.4\ncleanup_interval_seconds = 0.1\n")
    agent.mount(image, "idle")
    agent.mount(image, "busy")
    with agent.handover("/mounts/busy/open?path=/big.bin") as h:
        assert h.fd is not None
        digest = hashlib.sha256(os.read(h.fd, MiB))
        until(lambda: agent.request("GET", "/mounts/idle").status == 404)
        time.sleep(0.6)  # longer than the idle timeout, while the file is held
        assert agent.request("GET", "/mounts/busy").json["status"] == "mounted"
        while chunk := os.read(h.fd, 4 * MiB):
            digest.update(chunk)
        assert digest.hexdigest() == file_sha256(BIG)
    until(lambda: agent.request("GET", "/mounts/busy").status == 404)
    # (the mount is gone from the list before its sweep has returned and been counted)
    until(lambda: agent.request("GET", "/cleanup-status").json["expired_total"] == 2)
    status = agent.request("GET", "/cleanup-status").json
    assert status["expired_total"] == 2 and status["active_mount_count"] == 0 and status["idle_timeout"] == 0.4
    assert leaks(agent.mount_root, [image]) == []


def _kill_9(stack: Stack) -> None:
    d = stack.daemons[DAEMON]
    os.kill(d.pid, signal.SIGKILL)
    d.stop()


@pytest.fixture
def two_images(agent_config: Stack) -> tuple[Path, Path]:
    gpt = gpt_two_ext4(agent_config.state / "gpt.raw", {"a/one.txt": b"one\n"}, {"two.txt": b"two\n"}).path
    ntfs = gpt_ntfs(agent_config.state / "ntfs.raw", {"Users/x.txt": b"windows\n"}).path
    return gpt, ntfs


def test_kill_9_then_restart_readopts_intact_mounts(agent_config: Stack, two_images: tuple[Path, Path]) -> None:
    gpt, ntfs = two_images
    agent = start_agent(agent_config)
    agent.mount(gpt, "gpt")
    agent.mount(ntfs, "ntfs")
    _kill_9(agent_config)
    agent_config.start(DAEMON)
    assert agent_config.daemons[DAEMON].status == "2 mount(s) re-adopted, 0 removed"
    assert agent.download("gpt", "/part2/two.txt").body == b"two\n"
    assert agent.download("ntfs", "/Users/x.txt").body == b"windows\n"
    for mount_id in ("gpt", "ntfs"):
        assert agent.unmount(mount_id).status == 200
    assert leaks(agent.mount_root, [gpt, ntfs]) == []


def test_kill_9_then_restart_removes_what_is_broken_or_forgotten(agent_config: Stack,
                                                                 two_images: tuple[Path, Path]) -> None:
    gpt, ntfs = two_images
    fat = mbr_fat(agent_config.state / "fat.raw", {"A.TXT": b"fat\n"}).path
    agent = start_agent(agent_config)
    agent.mount(gpt, "gpt")
    ntfs_mount = agent.mount(ntfs, "ntfs")
    agent.mount(fat, "fat")
    _kill_9(agent_config)
    # The NTFS mount breaks while nobody watches: its FUSE daemon dies (the mount answers ENOTCONN).
    state = agent_config.state / DAEMON / "mounts.json"
    records = json.loads(state.read_text())["items"]
    fuse = next(r for r in records if r["mount_id"] == "ntfs")["filesystems"][0]["fuse"]
    os.kill(fuse["pid"], signal.SIGKILL)
    # And the record of the FAT mount is lost, as if the state file had been written before it.
    # Written in the older form ({"version", "mounts"}), which a new restore-mounter still reads.
    state.write_text(json.dumps({"version": 1, "mounts": [r for r in records if r["mount_id"] != "fat"]}))
    agent_config.start(DAEMON)
    assert agent_config.daemons[DAEMON].status == "1 mount(s) re-adopted, 1 removed"
    assert [m["mount_id"] for m in agent.request("GET", "/mounts").json["mounts"]] == ["gpt"]
    assert sorted(os.listdir(agent.mount_root)) == ["gpt"]
    (kept,) = attachments(agent_config)
    assert kept["owner"] == "restore-mounter:gpt"
    assert [x for x in leaks(agent.mount_root, [ntfs, fat])
            if "/restore/gpt/" not in x and kept["attachment_id"] not in x] == []
    assert ntfs_mount["device"].startswith("/dev/")
    assert agent.unmount("gpt").status == 200
    assert leaks(agent.mount_root, [gpt, ntfs, fat]) == []


def test_kill_9_then_restart_with_a_damaged_state_file(agent_config: Stack,
                                                       two_images: tuple[Path, Path]) -> None:
    gpt, ntfs = two_images
    agent = start_agent(agent_config)
    agent.mount(gpt, "gpt")
    agent.mount(ntfs, "ntfs")
    _kill_9(agent_config)
    (agent_config.state / DAEMON / "mounts.json").write_text("{not json")
    agent_config.start(DAEMON)
    assert agent_config.daemons[DAEMON].status == "0 mount(s) re-adopted, 0 removed"
    assert leaks(agent.mount_root, [gpt, ntfs]) == []
    assert os.listdir(agent.mount_root) == []
    assert (agent_config.state / DAEMON / "mounts.json.damaged").exists()


def test_agent_reports_mounts_in_health(agent_config: Stack, image: Path) -> None:
    agent = start_agent(agent_config)
    agent.mount(image, "h")
    health = agent.request("GET", "/health").json
    assert (health["active_mounts"], health["max_mounts"], health["attach_backend"]) == (1, 8, "nbd-pool")
