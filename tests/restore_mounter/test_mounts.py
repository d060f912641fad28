"""MountManager.mount, in this process against the real nbd-pool: a mount cancelled, failed or stopped while
nbd-pool attaches its image leaves no attachment behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from oma_common import errors
from oma_common.rpc import AgentClient
from restore_mounter.attach import Attachment, NbdPoolAttacher
from restore_mounter.confine import default_resolver
from restore_mounter.expiry import IdlePolicy, SystemClock
from restore_mounter.mounts import MountManager, ShuttingDown
from restore_mounter.state import MountsFile

from ..lib.diskimages import MiB, mbr_ext4, to_qcow2
from ..rig import Stack
from .conftest import HeldAttach, attachments, cleanup, leaks

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


@pytest.fixture
def pool(agent_config: Stack) -> Iterator[Stack]:
    """The real nbd-pool alone, exporting the test's state directory (restore-mounter runs in this process)."""
    agent_config.add_config("nbd-pool", "50-test.toml", f'export_roots = ["{agent_config.state}"]\n')
    agent_config.start("nbd-pool")
    yield agent_config


@pytest.fixture
def image(agent_config: Stack) -> Path:
    raw = mbr_ext4(agent_config.state / "disk.raw", {"etc/hostname": b"guest\n"}, size=32 * MiB).path
    return to_qcow2(raw, raw.with_suffix(".qcow2"))


@pytest.fixture
async def client(pool: Stack) -> AsyncIterator[AgentClient]:
    c = AgentClient("nbd-pool", pool.run_dir / "nbd-pool.sock", timeout=30)
    yield c
    await c.close()


def manager(stack: Stack, client: AgentClient, *, timeout: float = 30.0) -> MountManager:
    root = stack.state / "restore"
    root.mkdir(mode=0o700, exist_ok=True)
    clock = SystemClock()
    return MountManager(attacher=NbdPoolAttacher(client, timeout=timeout), state=MountsFile(stack.state / "mounts.json"),
                        mount_root=root, max_mounts=4, policy=IdlePolicy(clock, 3600), clock=clock,
                        resolver=default_resolver())


async def attaching(stack: Stack) -> None:
    """Until nbd-pool has begun attaching (its work directory for the attachment exists)."""
    for _ in range(600):
        if list(stack.state.rglob("work/att-*")):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nbd-pool never began attaching")


async def settled(client: AgentClient) -> None:
    """Until nbd-pool has ended the attach it was making: a detach waits for its attachments' lock."""
    with pytest.raises(errors.NotFound):
        await client.call("DELETE", "/attachments/att-none")


async def test_a_mount_cancelled_while_nbd_pool_attaches_leaves_no_attachment(pool: Stack, client: AgentClient,
                                                                              image: Path) -> None:
    m = manager(pool, client)
    task = asyncio.create_task(m.mount(str(image), "cancelled"))
    await attaching(pool)
    task.cancel()  # the client hangs up (or the daemon stops): nbd-pool attaches all the same
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled(client)
    assert attachments(pool) == [] and m.mounts == {}
    assert leaks(m.mount_root, [image]) == []


class GivesUp(NbdPoolAttacher):
    """Hangs up on nbd-pool once it has begun attaching and reports a timeout, as the client's timeout does."""

    def __init__(self, client: AgentClient, stack: Stack) -> None:
        super().__init__(client)
        self.stack = stack

    async def attach(self, image: str, owner: str) -> Attachment:
        request = asyncio.ensure_future(super().attach(image, owner))
        await attaching(self.stack)
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        raise errors.TimedOut("nbd-pool timed out", "nbd-pool did not answer POST /attachments in time")


async def test_a_mount_whose_attach_times_out_leaves_no_attachment(pool: Stack, client: AgentClient,
                                                                   image: Path) -> None:
    m = manager(pool, client)
    m.attacher = GivesUp(client, pool)
    with pytest.raises(errors.TimedOut):
        await m.mount(str(image), "late")
    assert m.mounts == {}
    await settled(client)  # nbd-pool finished the attach after the answer was given up (so the release
    # by owner right after the failure found nothing, but for a very quick attach)...
    assert [a["owner"] for a in attachments(pool)] in ([], ["restore-mounter:late"])
    await m.sweep()  # ...and it goes at the next sweep, not only at the next start of restore-mounter
    assert attachments(pool) == [] and leaks(m.mount_root, [image]) == []


async def test_stop_ends_a_mount_whose_caller_hung_up_while_nbd_pool_attaches(agent_config: Stack,
                                                                              held_attach: HeldAttach,
                                                                              image: Path) -> None:
    """aiohttp 3.8 (Debian 12's) cancels a handler when its client hangs up: the mount then waits for nbd-pool's
    answer (run_to_end). A stop meanwhile must not wait it out: the attach is given up after the grace."""
    agent_config.add_config("nbd-pool", "50-test.toml", f'export_roots = ["{agent_config.state}"]\n')
    agent_config.start("nbd-pool")
    client = AgentClient("nbd-pool", agent_config.run_dir / "nbd-pool.sock", timeout=120)
    try:
        m = manager(agent_config, client, timeout=120)
        task = asyncio.create_task(m.mount(str(image), "hung-up"))
        await attaching(agent_config)
        task.cancel()
        await asyncio.sleep(0.2)
        assert not task.done()  # waiting for nbd-pool's answer, which is held
        await asyncio.wait_for(m.stop(grace=0.5), 10)
        assert task.done()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert m.mounts == {} and MountsFile(agent_config.state / "mounts.json").load() == []
        with pytest.raises(ShuttingDown):
            await m.mount(str(image), "late")
        held_attach.release()
        await settled(client)
        # What nbd-pool made after we hung up carries the mount's owner tag, and goes by it.
        assert {a["owner"] for a in attachments(agent_config)} <= {"restore-mounter:hung-up"}
        await m.release_strays()
        assert attachments(agent_config) == [] and leaks(m.mount_root, [image]) == []
    finally:
        await client.close()
