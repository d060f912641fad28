"""volume-agent's locks as a compromised omad would try them: omad owns the repository directories, so it
can swap any of them for a symlink or another directory; the attribute must only ever reach a regular file
below the root that volume-agent saw at start-up."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from oma_common.errors import Invalid, TimedOut, Unavailable
from oma_common.rpc import AgentClient
from volume_agent.immutability import Immutability, OutcomeUnknown

from ..rig import Stack


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, Path, Immutability]:
    root = tmp_path / "repositories"
    (root / "ctx").mkdir(parents=True)
    (root / "ctx" / "b1.qcow2").write_bytes(b"image")
    victim = tmp_path / "etc"
    victim.mkdir()
    (victim / "shadow").write_text("root:x:")
    return root, victim, Immutability([root])


async def test_a_directory_swapped_for_a_symlink_is_not_followed(repo: tuple[Path, Path, Immutability]) -> None:
    root, victim, imm = repo
    os.rename(root / "ctx", root / "ctx.real")
    (root / "ctx").symlink_to(victim)
    with pytest.raises(Invalid, match="symbolic link"):
        await imm.set([str(root / "ctx" / "shadow")], True)
    (root / "ctx").unlink()
    (root / "ctx").symlink_to(victim / "shadow")
    with pytest.raises(Invalid):
        await imm.set([str(root / "ctx")], True)


async def test_a_replaced_root_is_refused(repo: tuple[Path, Path, Immutability]) -> None:
    root, victim, imm = repo
    os.rename(root, root.with_name("old"))
    root.symlink_to(victim)
    with pytest.raises((Unavailable, Invalid)):
        await imm.set([str(root / "shadow")], True)
    root.unlink()
    root.mkdir()  # a new directory of the same name: another inode
    (root / "f").write_text("x")
    with pytest.raises(Unavailable, match="replaced"):
        await imm.status([str(root / "f")])


async def test_only_regular_files_and_paths_below_a_root(repo: tuple[Path, Path, Immutability]) -> None:
    root, victim, imm = repo
    os.mkfifo(root / "ctx" / "fifo")  # must not block the agent either
    with pytest.raises(Invalid, match="not a regular file"):
        await imm.set([str(root / "ctx" / "fifo")], True)
    for bad in (str(victim / "shadow"), f"{root}/ctx/../../etc/shadow", "ctx/b1.qcow2", str(root)):
        with pytest.raises(Invalid):
            await imm.set([bad], True)


async def test_a_racing_swap_never_reaches_outside(repo: tuple[Path, Path, Immutability]) -> None:
    """While a thread exchanges ctx with a symlink to the victim directory, every request either reaches the
    real image (here: a filesystem without the attribute says so) or is refused — never the victim."""
    import ctypes

    root, victim, imm = repo
    os.mkfifo(victim / "b1.qcow2")  # reaching it would answer "not a file": distinguishable from the image
    (root / "ctx.link").symlink_to(victim)
    libc = ctypes.CDLL(None, use_errno=True)
    stop = threading.Event()
    flips = [0]

    def flip() -> None:
        while not stop.is_set():
            assert libc.renameat2(-100, bytes(root / "ctx"), -100, bytes(root / "ctx.link"), 2) == 0
            flips[0] += 1

    t = threading.Thread(target=flip)
    t.start()
    outcomes: dict[str, int] = {}
    try:
        for _ in range(300):
            try:
                await imm.status([str(root / "ctx" / "b1.qcow2")])
                outcomes["read"] = outcomes.get("read", 0) + 1
            except (Invalid, Unavailable) as e:
                outcomes[e.message] = outcomes.get(e.message, 0) + 1
    finally:
        stop.set()
        t.join()
    assert flips[0] > 100
    # Through the symlink it is always refused; the real directory is reached by name only when it is "ctx".
    assert "not a file" not in outcomes, "the victim was reached through the symlink"
    assert set(outcomes) <= {"read", "bad path", "no immutable attribute", "no such file"}, outcomes
    assert outcomes.get("bad path", 0) > 0, outcomes


@pytest.fixture
def frozen_capable(tmp_path: Path) -> Iterator[Path]:
    """A repository root on its own small ext4 (a loop device), which the test can freeze (fsfreeze(8)):
    while frozen, changing the attribute blocks in the kernel as on a hung network filesystem, and reading it
    does not; thawed, the blocked change completes."""
    image = tmp_path / "repo.ext4"
    with open(image, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    sh("mkfs.ext4", "-q", "-F", str(image))
    device = sh("losetup", "--find", "--show", str(image))
    root = tmp_path / "repositories"
    root.mkdir()
    try:
        sh("mount", "-t", "ext4", device, str(root))
        try:
            (root / "ctx").mkdir()
            (root / "ctx" / "b1.qcow2").write_bytes(b"image")
            yield root
        finally:
            subprocess.run(["fsfreeze", "-u", str(root)], capture_output=True, timeout=30)
            subprocess.run(["chattr", "-i", str(root / "ctx" / "b1.qcow2")], capture_output=True, timeout=30)
            subprocess.run(["umount", str(root)], capture_output=True, timeout=60)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.mark.root
async def test_a_change_that_outlives_its_time_limit_is_unknown_until_it_ends(frozen_capable: Path) -> None:
    """A lock on a filesystem that hangs: the caller is told the outcome is unknown (not that it failed), and
    no status is answered until the blocked change has ended, so a status never reports the flag the late
    change is about to overturn (omad re-reads it before recording anything)."""
    root = frozen_capable
    path = str(root / "ctx" / "b1.qcow2")
    other = root / "ctx" / "b2.qcow2"
    other.write_bytes(b"image")
    imm = Immutability([root], timeout=0.5)
    sh("fsfreeze", "-f", str(root))
    try:
        with pytest.raises(OutcomeUnknown) as info:
            await imm.set([path, str(other)], True)
        assert info.value.code == "outcome_unknown" and info.value.status == 504
        assert info.value.extra == {"changed": [], "unknown": [path], "not_tried": [str(other)]}
        # The blocked change has not landed, and reading the flag would work; the answer is still "unknown".
        assert not fsflags_of(Path(path))
        with pytest.raises(OutcomeUnknown):
            await imm.status([path])
        with pytest.raises(OutcomeUnknown):  # nor is a second change stacked behind the first
            await imm.set([path], False)
    finally:
        sh("fsfreeze", "-u", str(root))
    # Thawed: the late change lands, and the status now answers with it.
    assert (await imm.status([path, str(other)]))["immutable"] == {path: True, str(other): False}
    assert fsflags_of(Path(path))
    await imm.set([path], False)
    assert (await imm.status([path]))["immutable"] == {path: False}


def fsflags_of(path: Path) -> bool:
    """Whether lsattr(1) shows the file immutable (read by another program, not through the agent)."""
    return "i" in sh("lsattr", str(path)).split()[0]


@pytest.mark.root
async def test_over_the_socket_an_unknown_outcome_is_a_504_naming_the_paths(frozen_capable: Path,
                                                                           stack_config: Stack) -> None:
    """What omad's client receives: 504 with code outcome_unknown and which paths were changed, unknown, not
    tried; a status asked meanwhile is outcome_unknown too, and after the thaw it is the late change."""
    root = frozen_capable
    path, other = str(root / "ctx" / "b1.qcow2"), str(root / "ctx" / "b2.qcow2")
    Path(other).write_bytes(b"image")
    stack_config.add_config("volume-agent", "60-immutable.toml",
                            f'immutable_roots = ["{root}"]\nmount_timeout_seconds = 1\n')
    stack_config.start("volume-agent")
    client = AgentClient("volume-agent", stack_config.run_dir / "volume-agent.sock", timeout=30)
    try:
        sh("fsfreeze", "-f", str(root))
        try:
            with pytest.raises(TimedOut) as info:
                await client.call("POST", "/immutability/lock", json={"paths": [other, path]})
            assert info.value.code == "outcome_unknown"
            assert info.value.extra["unknown"] == [other] and info.value.extra["not_tried"] == [path]
            with pytest.raises(TimedOut, match="outcome unknown"):
                await client.call("POST", "/immutability/status", json={"paths": [other]})
        finally:
            sh("fsfreeze", "-u", str(root))
        assert (await client.call("POST", "/immutability/status", json={"paths": [other, path]}))["immutable"] \
            == {other: True, path: False}
        await client.call("POST", "/immutability/unlock", json={"paths": [other]})
    finally:
        await client.close()
        subprocess.run(["chattr", "-i", other], capture_output=True, timeout=30)


async def test_status_takes_no_more_paths_than_a_lock_does(stack_config: Stack) -> None:
    """Every route bounds its input: a status request for more files than a lock may name is refused before
    the agent opens any of them (it would otherwise open and read up to a 4 MiB body's worth of paths)."""
    from oma_common.rpc import AgentClient

    from volume_agent.immutability import MAX_PATHS

    repo = stack_config.state / "repo"
    repo.mkdir()
    paths = []
    for i in range(MAX_PATHS + 1):
        (repo / f"b{i}.qcow2").write_bytes(b"image")
        paths.append(str(repo / f"b{i}.qcow2"))
    stack_config.add_config("volume-agent", "60-immutable.toml", f'immutable_roots = ["{repo}"]\n')
    stack_config.start("volume-agent")
    client = AgentClient("volume-agent", stack_config.run_dir / "volume-agent.sock", timeout=60)
    try:
        for route in ("/immutability/status", "/immutability/lock"):
            with pytest.raises(Invalid):
                await client.call("POST", route, json={"paths": paths})
            with pytest.raises(Invalid):
                await client.call("POST", route, json={"paths": []})
        answer = await client.call("POST", "/immutability/status", json={"paths": paths[:MAX_PATHS]})
        assert len(answer["immutable"]) == MAX_PATHS
    finally:
        await client.close()


async def test_a_root_omad_replaced_with_a_link_before_a_start_locks_nothing_through_it(stack_config: Stack) -> None:
    """The appliance's immutable root lies in omad's own directory (/var/lib/oma/repositories in
    /var/lib/oma, owned by oma). A compromised omad replaces it with a symlink to a directory of root's before
    volume-agent starts: what the link leads to must not become the root, or omad could make root's files
    immutable (or clear an administrator's lock)."""
    import subprocess

    from oma_common.rpc import AgentClient

    oma = stack_config.state / "oma"
    repos = oma / "repositories"
    repos.mkdir(parents=True)
    os.chown(oma, 65534, 65534)
    os.chown(repos, 65534, 65534)
    victim = stack_config.state / "victim"
    victim.mkdir(mode=0o700)
    (victim / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.rename(repos, oma / "repositories.old")
    repos.symlink_to(victim)
    stack_config.add_config("volume-agent", "60-immutable.toml", f'immutable_roots = ["{repos}"]\n')
    stack_config.start("volume-agent")
    client = AgentClient("volume-agent", stack_config.run_dir / "volume-agent.sock", timeout=60)
    try:
        with pytest.raises((Invalid, Unavailable)):
            await client.call("POST", "/immutability/lock", json={"paths": [str(repos / "passwd")]})
        with pytest.raises((Invalid, Unavailable)):
            await client.call("POST", "/immutability/lock", json={"paths": [str(victim / "passwd")]})
        (victim / "passwd").write_text("still writable\n")
    finally:
        await client.close()
        subprocess.run(["chattr", "-i", str(victim / "passwd")], check=False)
