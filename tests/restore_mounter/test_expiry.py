"""Idle expiry in-process with an injected clock: the rule, the inhibitors, the sweep, on real mounts of images
attached by a real nbd-pool."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oma_common import errors
from oma_common.rpc import AgentClient
from restore_mounter.attach import NbdPoolAttacher
from restore_mounter.confine import default_resolver
from restore_mounter.expiry import IdlePolicy, Sweeper
from restore_mounter.files import Browser
from restore_mounter.mounts import MountManager
from restore_mounter.state import MountsFile

from ..lib.diskimages import mbr_ext4, to_qcow2
from ..rig import make_stack
from .conftest import cleanup, leaks

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@dataclasses.dataclass
class Activity:
    last_activity: float
    in_use: bool = False


def test_idle_rule() -> None:
    clock = FakeClock()
    policy = IdlePolicy(clock, 3600)
    m = Activity(clock.monotonic())
    clock.advance(3599)
    assert not policy.expired(m) and policy.expires_at(m) == clock.time() + 1
    clock.advance(1)
    assert policy.expired(m) and policy.expires_at(m) == clock.time()
    m.in_use = True  # a held mount never expires, however long ago it was last used
    assert not policy.expired(m) and policy.idle_for(m) == 0 and policy.expires_at(m) == clock.time() + 3600


@dataclasses.dataclass
class Rig:
    manager: MountManager
    clock: FakeClock
    sweeper: Sweeper
    image: Path
    root: Path


@pytest.fixture
async def rig(short_tmp: Path) -> AsyncIterator[Rig]:
    import os
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts)")
    clock = FakeClock()
    stack = make_stack(short_tmp)
    stack.add_config("nbd-pool", "50-test.toml", f'export_roots = ["{short_tmp}"]\n')
    root = short_tmp / "restore"
    root.mkdir(mode=0o700)
    client = AgentClient("nbd-pool", stack.run_dir / "nbd-pool.sock", timeout=60)
    manager = MountManager(attacher=NbdPoolAttacher(client), state=MountsFile(short_tmp / "mounts.json"),
                           mount_root=root, max_mounts=4, policy=IdlePolicy(clock, 3600), clock=clock,
                           resolver=default_resolver())
    raw = mbr_ext4(short_tmp / "disk.raw", {"etc/hostname": b"guest\n"}).path
    image = to_qcow2(raw, short_tmp / "disk.qcow2")
    try:
        stack.start("nbd-pool")
        yield Rig(manager, clock, Sweeper(manager.sweep, 60, clock), image, root)
    finally:
        try:
            for m in manager.all():
                await manager.unmount(m.mount_id, force=True)
            await client.close()
        finally:
            cleanup(stack)
        assert leaks(root, [image]) == []


@pytest.mark.root
async def test_sweep_removes_only_what_expired(rig: Rig) -> None:
    mgr, clock = rig.manager, rig.clock
    a, _ = await mgr.mount(str(rig.image), "a")
    clock.advance(1800)
    b, _ = await mgr.mount(str(rig.image), "b")
    assert mgr.describe(a)["expires_at"] == "2027-01-15T09:00:00Z"  # last used at 08:00:00 (wall 1_800_000_000)
    clock.advance(1800)
    assert [m.mount_id for m in mgr.expired()] == ["a"]
    assert await rig.sweeper.sweep_once() == 1
    assert [m.mount_id for m in mgr.all()] == ["b"]
    assert rig.sweeper.status()["expired_total"] == 1 and rig.sweeper.status()["last_sweep_at"] == clock.time()
    assert not Path(a.record.mount_path).exists() and leaks(rig.root, [])
    clock.advance(3600)
    assert await rig.sweeper.sweep_once() == 1 and mgr.all() == []


@pytest.mark.root
async def test_status_is_not_activity_but_browsing_is(rig: Rig) -> None:
    mgr, clock = rig.manager, rig.clock
    m, _ = await mgr.mount(str(rig.image), "m")
    clock.advance(3000)
    mgr.describe(m)
    mgr.get("m")
    mgr.all()
    mgr.resources()
    assert mgr.policy.idle_for(m) == 3000  # reading status did not count
    async with mgr.use("m") as held:
        Browser().listing(held, "/")
    assert mgr.policy.idle_for(m) == 0
    clock.advance(3599)
    assert mgr.expired() == []
    clock.advance(1)
    assert mgr.expired() == [m]


@pytest.mark.root
async def test_a_running_download_holds_the_mount(rig: Rig) -> None:
    mgr, clock = rig.manager, rig.clock
    m, _ = await mgr.mount(str(rig.image), "m")
    release = asyncio.Event()
    started = asyncio.Event()

    async def long_download() -> None:
        async with mgr.use("m"):
            started.set()
            await release.wait()

    task = asyncio.create_task(long_download())
    await started.wait()
    clock.advance(10 * 3600)
    assert mgr.expired() == [] and await rig.sweeper.sweep_once() == 0
    with pytest.raises(errors.Conflict) as busy:
        await mgr.unmount("m")
    assert busy.value.code == "busy" and busy.value.extra["active_operations"] == 1
    release.set()
    await task
    assert mgr.policy.idle_for(m) == 0  # idle time starts when the last holder lets go
    clock.advance(3600)
    assert await rig.sweeper.sweep_once() == 1


@pytest.mark.root
async def test_forced_unmount_cancels_the_holders(rig: Rig) -> None:
    mgr = rig.manager
    await mgr.mount(str(rig.image), "m")
    started = asyncio.Event()

    async def stuck() -> None:
        async with mgr.use("m"):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(stuck())
    await started.wait()
    await mgr.unmount("m", force=True)
    assert task.cancelled() and mgr.all() == []
    with pytest.raises(errors.NotFound):
        async with mgr.use("m"):
            pass


@pytest.mark.root
async def test_slots(rig: Rig) -> None:
    for i in range(4):
        await rig.manager.mount(str(rig.image), f"m{i}")
    with pytest.raises(errors.Exhausted) as full:
        await rig.manager.mount(str(rig.image))
    assert full.value.extra == {"available_slots": 0, "max_mounts": 4}
    assert rig.manager.resources()["device_utilization"] == 100.0
