"""volume-agent's locks as a compromised omad would try them: omad owns the repository directories, so it
can swap any of them for a symlink or another directory; the attribute must only ever reach a regular file
below the root that volume-agent saw at start-up."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from oma_common.errors import Invalid, Unavailable
from volume_agent.immutability import Immutability

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
