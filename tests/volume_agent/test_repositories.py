"""volume-agent's share mounts for backup repositories: only below the mount root, never through a symlink,
always nosuid,nodev,noexec, a CIFS password only in the helper's environment, and a failure that says why
(on machines whose kernel has no NFS/CIFS client, that is what it says)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from oma_common.errors import Conflict, Invalid, Unavailable
from oma_common.rpc import AgentClient
from volume_agent.adapters import mount as m
from volume_agent.repositories import RepositoryMounts, Share

from ..lib.gate import Gate, cancel_inside, children, open_fds
from ..rig import Stack

NO_NFS = m.kernel_lacks("nfs") or m.helper_missing("nfs") is not None
NO_CIFS = m.kernel_lacks("cifs") or m.helper_missing("cifs") is not None
NFS_SKIP = ("this kernel has no NFS client (nfs is not in /proc/filesystems and no module provides it) or "
            "mount.nfs (nfs-common) is missing: a real NFS mount cannot be exercised here")


def fake_mount(tmp: Path, code: int = 0, message: str = "") -> Path:
    """A stand-in for mount(8) that records its argv and the secrets' environment, then exits `code`."""
    script = tmp / "fake-mount"
    record = tmp / "calls.jsonl"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
with open({str(record)!r}, "a") as f:
    target = sys.argv[-1]
    if target.startswith("/proc/self/fd/"):
        target = os.readlink(target)  # what the inherited descriptor holds
    f.write(json.dumps({{"argv": sys.argv[1:], "target": target, "USER": os.environ.get("USER"),
                        "PASSWD": os.environ.get("PASSWD")}}) + "\\n")
sys.stderr.write({message!r})
sys.exit({code})
""")
    script.chmod(0o755)
    return script


def calls(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "calls.jsonl").read_text().splitlines()]


def test_mount_points_stay_below_the_root(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    mounts = RepositoryMounts(root)
    assert mounts.mount_point(f"{root}/a/b") == root / "a" / "b"
    for bad in ("relative/path", str(root), str(tmp_path / "elsewhere"), f"{root}/../escape", f"{root}/a//b",
                f"{root}/./a"):
        with pytest.raises(Invalid):
            mounts.mount_point(bad)
    root.mkdir()
    (root / "link").symlink_to("/etc")
    with pytest.raises(Invalid, match="symbolic link"):
        mounts.mount_point(f"{root}/link/x")


async def test_nfs_argv_forces_safe_options_and_refuses_loosening(tmp_path: Path) -> None:
    mounts = RepositoryMounts(tmp_path / "repos", mount_program=str(fake_mount(tmp_path)))
    share = Share(kind="nfs", server="nas.example", export_path="/export/backups",
                  mount_point=str(tmp_path / "repos" / "r1"), options=["vers=4.1", "hard"])
    out = await mounts.mount(share, owner_uid=1234, owner_gid=4321)
    assert out["source"] == "nas.example:/export/backups" and out["mounted"]
    (call,) = calls(tmp_path)
    assert call["argv"][:-1] == ["--no-canonicalize", "-t", "nfs", "-o", "nosuid,nodev,noexec,vers=4.1,hard", "--",
                                 "nas.example:/export/backups"]
    # mount(8) is handed the checked directory's descriptor, not its name.
    assert call["argv"][-1].startswith("/proc/self/fd/") and call["target"] == str(tmp_path / "repos" / "r1")
    point = tmp_path / "repos" / "r1"
    assert point.is_dir() and stat.S_IMODE(point.stat().st_mode) == 0o755
    for bad in (["suid"], ["exec"], ["uid=0"], ["credentials=/etc/shadow"], ["a,b"], ["opt=x y"]):
        with pytest.raises(Invalid):
            await mounts.mount(Share(kind="nfs", server="nas.example", export_path="/e", options=bad,
                                     mount_point=str(point)), owner_uid=1, owner_gid=1)
    for server in ("-oexec", "a b", ""):
        with pytest.raises(Invalid):
            await mounts.mount(Share(kind="nfs", server=server, export_path="/e", mount_point=str(point)),
                               owner_uid=1, owner_gid=1)


async def test_cifs_password_travels_in_the_environment_only(tmp_path: Path) -> None:
    mounts = RepositoryMounts(tmp_path / "repos", mount_program=str(fake_mount(tmp_path)))
    secret = "pa$$,word=with;odd chars"
    await mounts.mount(Share(kind="cifs", server="10.0.0.5", share_name="backups", username="svc-oma",
                             password=secret, domain="CORP", mount_point=str(tmp_path / "repos" / "smb")),
                       owner_uid=1234, owner_gid=4321)
    (call,) = calls(tmp_path)
    assert secret not in json.dumps(call["argv"])
    assert call["PASSWD"] == secret and call["USER"] == "svc-oma"
    options = call["argv"][call["argv"].index("-o") + 1].split(",")
    assert {"nosuid", "nodev", "noexec", "domain=CORP", "uid=1234", "gid=4321"} <= set(options)
    assert call["argv"][-2] == "//10.0.0.5/backups"
    with pytest.raises(Invalid, match="username"):
        await mounts.mount(Share(kind="cifs", server="h", share_name="s", mount_point=str(tmp_path / "repos" / "x")),
                           owner_uid=1, owner_gid=1)


async def test_a_failed_mount_says_why(tmp_path: Path) -> None:
    mounts = RepositoryMounts(tmp_path / "repos", mount_program=str(fake_mount(
        tmp_path, code=32, message="mount: /x: unknown filesystem type 'nfs'.")))
    with pytest.raises(Unavailable) as info:
        await mounts.mount(Share(kind="nfs", server="nas", export_path="/e", mount_point=str(tmp_path / "repos" / "a")),
                           owner_uid=1, owner_gid=1)
    assert "unknown filesystem type 'nfs'" in info.value.details
    if m.kernel_lacks("nfs"):
        assert "has no NFS client" in info.value.details
    if m.helper_missing("nfs"):
        assert "nfs-common" in info.value.details


async def test_a_mount_cancelled_while_its_point_is_made_leaves_no_descriptor_or_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = RepositoryMounts(tmp_path / "repos", mount_program=str(fake_mount(tmp_path)))
    (tmp_path / "repos").mkdir()
    before = open_fds()
    gate = Gate(mounts._make_point)
    monkeypatch.setattr(mounts, "_make_point", gate)
    share = Share(kind="nfs", server="nas", export_path="/e", mount_point=str(tmp_path / "repos" / "a" / "b"))
    task = asyncio.create_task(mounts.mount(share, owner_uid=1, owner_gid=1))
    await cancel_inside(gate, task)
    assert open_fds() == before and list((tmp_path / "repos").iterdir()) == []
    assert not (tmp_path / "calls.jsonl").exists()  # mount(8) never ran


async def test_a_mount_cancelled_while_mount_runs_leaves_no_directory(tmp_path: Path) -> None:
    started = tmp_path / "started"
    os.mkfifo(started)
    hanging = tmp_path / "hanging-mount"
    hanging.write_text(f"#!{sys.executable}\nimport time\nopen({str(started)!r}, 'w').close()\ntime.sleep(60)\n")
    hanging.chmod(0o755)
    # A cancelled mount waits for mount(8) to end (its outcome must be known), up to the time limit.
    mounts = RepositoryMounts(tmp_path / "repos", timeout=2, mount_program=str(hanging))
    share = Share(kind="nfs", server="nas", export_path="/e", mount_point=str(tmp_path / "repos" / "a" / "b"))
    before, kids = open_fds(), children()
    task = asyncio.create_task(mounts.mount(share, owner_uid=1, owner_gid=1))
    await asyncio.wait_for(asyncio.to_thread(started.read_bytes), 30)  # mount(8) is running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list((tmp_path / "repos").iterdir()) == [] and open_fds() == before and children() <= kids


def test_mountinfo_is_parsed_with_escapes() -> None:
    text = ("36 35 98:0 / /srv/oma/repositories/a\\040b rw,nosuid - nfs4 nas:/export rw,vers=4.1\n"
            "37 35 0:5 / /proc rw shared:1 - proc proc rw\n")
    a, b = m.parse_mountinfo(text)
    assert a.mount_point == Path("/srv/oma/repositories/a b") and a.fstype == "nfs4" and a.source == "nas:/export"
    assert b.mount_point == Path("/proc")


async def test_already_mounted_is_a_noop_and_another_share_is_a_conflict(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = RepositoryMounts(tmp_path / "repos", mount_program=str(fake_mount(tmp_path)))
    point = tmp_path / "repos" / "r"
    monkeypatch.setattr(m, "read_mounts", lambda: [m.MountEntry(point, "nfs4", "nas:/export", "rw")])
    out = await mounts.mount(Share(kind="nfs", server="nas", export_path="/export", mount_point=str(point)),
                             owner_uid=1, owner_gid=1)
    assert out["already_mounted"] and not (tmp_path / "calls.jsonl").exists()
    with pytest.raises(Conflict):
        await mounts.mount(Share(kind="nfs", server="other", export_path="/export", mount_point=str(point)),
                           owner_uid=1, owner_gid=1)


async def test_a_mount_point_inside_a_share_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The share's server decides what is below its mount point: a directory there may be a symlink by the
    time mount(8) runs, so nothing is ever mounted inside a share."""
    mounts = RepositoryMounts(tmp_path / "repos", mount_program=str(fake_mount(tmp_path)))
    share = tmp_path / "repos" / "share"
    monkeypatch.setattr(m, "read_mounts", lambda: [m.MountEntry(share, "nfs4", "nas:/export", "rw")])
    for op in ("mount", "unmount"):
        with pytest.raises(Invalid, match="inside a share"):
            if op == "mount":
                await mounts.mount(Share(kind="nfs", server="nas", export_path="/e",
                                         mount_point=str(share / "nested")), owner_uid=1, owner_gid=1)
            else:
                await mounts.unmount(str(share / "nested"))
    assert not (tmp_path / "calls.jsonl").exists()


async def test_a_component_swapped_for_a_symlink_is_never_mounted_through(tmp_path: Path) -> None:
    """A racing flip of a directory on the way to the mount point, between a symlink to a directory outside
    the root and the real directory: every mount lands on the real directory or is refused."""
    import ctypes
    import threading

    root = tmp_path / "repos"
    outside = tmp_path / "outside"
    outside.mkdir()
    mounts = RepositoryMounts(root, mount_program=str(fake_mount(tmp_path)))
    (root / "a").mkdir(parents=True)
    (root / "a.link").symlink_to(outside)
    stop = threading.Event()
    flips = [0]
    errors: list[int] = []
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2

    def flip() -> None:
        # renameat2(RENAME_EXCHANGE): "a" is always there, now the directory, now a symlink to `outside`.
        while not stop.is_set():
            if libc.renameat2(at_fdcwd, bytes(root / "a"), at_fdcwd, bytes(root / "a.link"), rename_exchange) != 0:
                errors.append(ctypes.get_errno())
                return
            flips[0] += 1

    t = threading.Thread(target=flip)
    t.start()
    refused = done = attempts = 0
    deadline = time.monotonic() + 30
    try:
        # At least 200 attempts, and until the flipper has flipped 200 times (on a busy machine the thread may
        # get the GIL rarely while the mounts run).
        while attempts < 200 or (flips[0] < 200 and time.monotonic() < deadline):
            i = attempts
            attempts += 1
            time.sleep(0)  # let the flipper have the GIL between attempts
            try:
                await mounts.mount(Share(kind="nfs", server="nas", export_path="/e",
                                         mount_point=str(root / "a" / f"p{i}")), owner_uid=1, owner_gid=1)
                done += 1
            except Invalid:
                refused += 1
    finally:
        stop.set()
        t.join()
    assert not errors, f"the flipping stopped: {[os.strerror(e) for e in errors]}"
    assert flips[0] > 100, "the race did not run"
    assert not any(outside.iterdir()), "a directory was created through the symlink"
    targets = [c["target"] for c in calls(tmp_path)] if done else []
    # The directory that was mounted on is the real one (which the exchange may have renamed "a.link").
    assert len(targets) == done and all(Path(t).parent in (root / "a", root / "a.link") for t in targets), targets
    assert done + refused == attempts


async def test_the_agent_serves_mounts_over_its_socket(stack_config: Stack) -> None:
    stack_config.start("volume-agent")
    client = AgentClient("volume-agent", stack_config.run_dir / "volume-agent.sock", timeout=90)
    try:
        listing = await client.call("GET", "/repositories/mounts")
        root = Path(listing["mount_root"])
        assert root == stack_config.state / "mounts" and listing["mounts"] == []
        with pytest.raises(Invalid, match="outside the mount root"):
            await client.call("POST", "/repositories/mount", json={
                "kind": "nfs", "server": "nas", "export_path": "/e", "mount_point": "/etc"})
        share = {"kind": "nfs", "server": "127.0.0.1", "export_path": "/nothing", "mount_point": f"{root}/nfs1",
                 "options": "soft,timeo=10,retrans=1"}
        if NO_NFS:
            with pytest.raises(Unavailable) as info:
                await client.call("POST", "/repositories/mount", json=share)
            assert "cannot mount the NFS share" in info.value.message
            assert "127.0.0.1:/nothing" in info.value.details
            assert "NFS client" in info.value.details or "nfs-common" in info.value.details
        out = await client.call("POST", "/repositories/unmount", json={"mount_point": f"{root}/nfs1"})
        assert out["unmounted"] is False
    finally:
        await client.close()


@pytest.mark.skipif(NO_NFS, reason=NFS_SKIP)
async def test_with_an_nfs_client_an_unreachable_server_is_the_reason(tmp_path: Path) -> None:
    mounts = RepositoryMounts(tmp_path / "repos", timeout=20)
    with pytest.raises(Unavailable) as info:  # TEST-NET-1: nothing answers there
        await mounts.mount(Share(kind="nfs", server="192.0.2.1", export_path="/e", options=["soft", "timeo=5",
                                                                                          "retrans=0"],
                                 mount_point=str(tmp_path / "repos" / "n")), owner_uid=0, owner_gid=0)
    assert "NFS client" not in info.value.details


@pytest.mark.skipif(NO_CIFS, reason="this kernel has no CIFS client (cifs is not in /proc/filesystems and no module "
                                    "provides it) or mount.cifs (cifs-utils) is missing: a real CIFS mount cannot "
                                    "be exercised here")
async def test_with_a_cifs_client_an_unreachable_server_is_the_reason(tmp_path: Path) -> None:
    mounts = RepositoryMounts(tmp_path / "repos", timeout=20)
    with pytest.raises(Unavailable) as info:
        await mounts.mount(Share(kind="cifs", server="192.0.2.1", share_name="s", username="u", password="p",
                                 mount_point=str(tmp_path / "repos" / "c")), owner_uid=0, owner_gid=0)
    assert "CIFS client" not in info.value.details


async def test_a_mount_root_others_can_write_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    root.mkdir()
    root.chmod(0o777)
    mounts = RepositoryMounts(root, mount_program=str(fake_mount(tmp_path)))
    share = Share(kind="nfs", server="nas", export_path="/e", mount_point=str(root / "a"))
    if os.geteuid() == 0:
        with pytest.raises(Unavailable, match="root alone"):
            await mounts.mount(share, owner_uid=1, owner_gid=1)
    root.chmod(0o755)
    (tmp_path / "real").mkdir()
    linked = RepositoryMounts(tmp_path / "link", mount_program=str(fake_mount(tmp_path)))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(Unavailable, match="resolves to"):
        await linked.mount(Share(kind="nfs", server="nas", export_path="/e", mount_point=str(tmp_path / "link" / "a")),
                           owner_uid=1, owner_gid=1)


def mounting_fake(tmp: Path, hold: float) -> tuple[Path, Path]:
    """A stand-in for mount(8) that really mounts (a tmpfs, through the descriptor it is handed, as mount(8)
    mounts a share) and then goes on running for `hold` seconds, as mount.nfs may after the kernel has
    mounted; it opens the FIFO it returns once the mount is made."""
    mounted = tmp / "mounted"
    os.mkfifo(mounted)
    script = tmp / "mounting-mount"
    script.write_text(f"""#!{sys.executable}
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
# MS_NOSUID | MS_NODEV | MS_NOEXEC
if libc.mount(b"tmpfs", sys.argv[-1].encode(), b"tmpfs", 2 | 4 | 8, None) != 0:
    sys.exit("mount: " + os.strerror(ctypes.get_errno()))
open({str(mounted)!r}, "w").close()
time.sleep({hold})
""")
    script.chmod(0o755)
    return script, mounted


def mounts_below(root: Path) -> list[m.MountEntry]:
    return [e for e in m.read_mounts() if e.mount_point.is_relative_to(root)]


def unmount_all_below(root: Path) -> None:
    for e in reversed(mounts_below(root)):
        subprocess.run(["umount", "--lazy", str(e.mount_point)], capture_output=True, timeout=30)


@pytest.mark.root
async def test_a_mount_cancelled_after_the_kernel_mounted_leaves_nothing_mounted(tmp_path: Path) -> None:
    """The request goes away (its client hung up, the agent is stopping) after the share is mounted and before
    mount(8) has returned: once mount(8) has ended, what it mounted is unmounted and the point removed, so no
    share stays mounted that nobody was told of (/proc/self/mountinfo is the judge)."""
    program, mounted = mounting_fake(tmp_path, hold=1.0)
    root = tmp_path / "repos"
    mounts = RepositoryMounts(root, mount_program=str(program))
    share = Share(kind="nfs", server="nas", export_path="/e", mount_point=str(root / "a" / "b"))
    kids = children()
    try:
        task = asyncio.create_task(mounts.mount(share, owner_uid=1, owner_gid=1))
        await asyncio.wait_for(asyncio.to_thread(mounted.read_bytes), 30)
        assert [e.mount_point for e in mounts_below(root)] == [root / "a" / "b"]  # the kernel has mounted it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert mounts_below(root) == [] and list(root.iterdir()) == [] and children() <= kids
    finally:
        unmount_all_below(root)


@pytest.mark.root
async def test_a_mount_that_runs_out_of_time_after_the_kernel_mounted_leaves_nothing_mounted(tmp_path: Path) -> None:
    program, mounted = mounting_fake(tmp_path, hold=60)
    root = tmp_path / "repos"
    mounts = RepositoryMounts(root, timeout=1, mount_program=str(program))
    share = Share(kind="nfs", server="nas", export_path="/e", mount_point=str(root / "a"))
    try:
        task = asyncio.create_task(mounts.mount(share, owner_uid=1, owner_gid=1))
        await asyncio.wait_for(asyncio.to_thread(mounted.read_bytes), 30)
        with pytest.raises(Unavailable, match="timed out"):
            await task
        assert mounts_below(root) == [] and list(root.iterdir()) == []
    finally:
        unmount_all_below(root)
