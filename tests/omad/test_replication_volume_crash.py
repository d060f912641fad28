"""omad (or volume-agent) dying while a sync creates a disk's CloudStack volume: the next sync of the VM takes the
volume that create made — one volume per disk, never a second one, never a VM refused for ever with "volume
exists" — and copies that disk in full; a volume created for a VM context removed meanwhile is deleted at omad's
start. The real daemons, the CloudStack simulator (volumes attached here are loop devices), the VMA simulator."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cs import AIOCloudStack

from oma_common.rpc import AgentClient
from omad.replication.replications import volume_vm_name
from tests.sim.cloudstack import CloudStackSim

from ..rig import Stack
from .replication_rig import VM, Rig
from .test_replication import SIZES, open_twins, rig  # noqa: F401  (rig: the fixture)

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@pytest.fixture
def stack_config(stack_config: Stack) -> Stack:
    stack_config.add_config("omad", "70-crash.toml", f'[failover]\ncrash_file = "{crash_file(stack_config)}"\n')
    return stack_config


# A VM named literally as `app 01`'s volumes are (its name reduced, and the hash that tells it apart).
TWIN = "app-01-a22b2178"


@pytest.fixture
async def twins(cloudstack_sim: CloudStackSim, stack_config: Stack, tmp_path: Path) -> AsyncIterator[Rig]:
    """The rig's VM `app 01` and another, TWIN, whose volume names are the same."""
    async with open_twins(stack_config, cloudstack_sim, tmp_path, TWIN) as r:
        yield r


def crash_file(stack: Stack) -> Path:
    return stack.state / "crash-at"


def ours(rig: Rig) -> dict[str, list[str]]:
    """The replication volumes CloudStack has, by name → ids."""
    found: dict[str, list[str]] = {}
    for vol in list(rig.cs.inv.volumes.values()):
        if vol.name.startswith("migration-"):
            found.setdefault(vol.name, []).append(vol.id)
    return found


def pending(rig: Rig) -> list[tuple[Any, ...]]:
    return rig.stack.sql("SELECT disk_id, volume_name FROM replication_volume_creates ORDER BY disk_id")


async def until(what: Callable[[], bool], message: Callable[[], str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message()
        await asyncio.sleep(0.05)


async def cut_start(rig: Rig, kill: Callable[[], Awaitable[None]]) -> str:
    """POST /replications while `kill` makes omad die (or its start fail); the job it recorded."""
    start = asyncio.ensure_future(rig.start())
    await kill()
    with contextlib.suppress(Exception):  # omad died under the request
        await start
    jobs = rig.stack.sql("SELECT job_id FROM replication_jobs")
    assert len(jobs) == 1, jobs
    return str(jobs[0][0])


async def cut_at(rig: Rig, point: str) -> str:
    """POST /replications while omad dies at the crash point `point`; the job it recorded."""
    crash_file(rig.stack).write_text(point)

    async def dies() -> None:
        await until(lambda: not crash_file(rig.stack).exists(), lambda: f"{point} not reached\n{rig.log_tail()}")

    return await cut_start(rig, dies)


async def restarted(rig: Rig, daemon: str = "omad") -> None:
    omad = rig.stack.daemons[daemon]
    await until(lambda: not omad.running(), lambda: f"{daemon} did not die\n{rig.log_tail()}")
    await asyncio.to_thread(rig.stack.start, daemon)


async def next_sync_takes_it(rig: Rig, cut: str, before: dict[str, list[str]]) -> dict[str, Any]:
    """The cut job ended; the next sync completes with one volume per disk (the one made before, if any), copies
    both disks in full and leaves nothing pending."""
    ended = await rig.wait(cut)
    assert ended["status"] == "failed", ended
    assert [d for d, _ in pending(rig)] == ["disk-2000"]
    done = await rig.sync()
    assert done["replication_type"] == "initial"
    after = ours(rig)
    assert sorted(len(ids) for ids in after.values()) == [1, 1], after
    assert {d["volume_id"] for d in done["disks"]} == {ids[0] for ids in after.values()}
    for name, ids in before.items():  # the volume made for the cut job is the one in use
        assert after[name] == ids, (name, before, after)
    assert [d.sync_type for d in rig.state.job(done["job_id"]).disks] == ["full", "full"]
    rig.assert_volumes_hold_sources(done)
    assert pending(rig) == []
    await rig.assert_released()
    again = await rig.sync()  # and the sync after it continues from there
    assert again["replication_type"] == "incremental"
    assert ours(rig) == after
    return done


@pytest.mark.parametrize("point", ["replication:volume-create", "replication:volume-attach",
                                   "replication:volume-save"])
async def test_omad_killed_around_a_volume_create_the_next_sync_takes_that_volume(rig: Rig, point: str) -> None:
    """Killed after recording the intent (nothing asked yet), after volume-agent created the volume (not
    attached), after it was attached here (not recorded): the next sync has the same one volume per disk."""
    cut = await cut_at(rig, point)
    await restarted(rig)
    before = ours(rig)
    if point == "replication:volume-create":
        assert before == {}
    else:
        assert sorted(len(ids) for ids in before.values()) == [1], before
        attached = rig.cs.attached_here()
        assert attached == (list(before.values())[0] if point == "replication:volume-save" else []), attached
    await next_sync_takes_it(rig, cut, before)


async def test_a_create_recorded_under_the_name_before_the_hash_takes_that_volume(rig: Rig) -> None:
    """A create omad recorded before names were told apart by a hash: `app 01`'s first disk asked for
    `migration-app-01-disk-0` and omad died before recording the volume. After the upgrade the next sync takes
    the volume made under the name the row recorded (not the name `app 01`'s volumes have now)."""
    cut = await cut_at(rig, "replication:volume-create")
    omad = rig.stack.daemons["omad"]
    await until(lambda: not omad.running(), lambda: rig.log_tail())
    old = "migration-app-01-disk-0"
    assert pending(rig) == [("disk-2000", "migration-app-01-a22b2178-disk-0")]
    agent = AgentClient("volume-agent", rig.stack.run_dir / "volume-agent.sock", timeout=60)
    try:
        made = await agent.call("POST", "/volumes", json={"vm_name": "app-01", "disk_unit": 0,
                                                          "size_bytes": SIZES[0] + 5 * 1024**3})
    finally:
        await agent.close()
    assert made["name"] == old
    rig.stack.sql("UPDATE replication_volume_creates SET volume_name = ?", (old,))
    await asyncio.to_thread(rig.stack.start, "omad")
    done = await next_sync_takes_it(rig, cut, {old: [made["volume_id"]]})
    assert done["disks"][0]["volume_id"] == made["volume_id"]


async def test_the_volume_made_deleted_in_cloudstack_meanwhile_a_new_one_is_made(rig: Rig) -> None:
    """Killed after the create (volume detached); the volume is then deleted in CloudStack directly, which
    volume-agent's record of a detached volume does not notice: the next sync makes a new one."""
    cut = await cut_at(rig, "replication:volume-attach")
    await restarted(rig)
    [made] = [ids[0] for ids in ours(rig).values()]
    cs = AIOCloudStack(rig.cs.endpoint, rig.cs.api_key, rig.cs.secret_key, poll_interval=0.05)
    await cs.deleteVolume(id=made)
    done = await next_sync_takes_it(rig, cut, {})
    assert made not in {d["volume_id"] for d in done["disks"]}


async def test_omad_killed_while_volume_agent_creates_the_next_sync_waits_for_it(rig: Rig) -> None:
    """omad dies while volume-agent waits on CloudStack's createVolume job; it is restarted and the next sync
    asked for while that create is still under way: the sync waits for it and takes it."""
    rig.cs.faults.job_seconds = 10.0  # longer than omad's restart and the cut job's end

    async def kill() -> None:
        await until(lambda: "createVolume" in rig.cs.commands.calls, lambda: rig.log_tail())
        rig.stack.daemons["omad"].stop(sig=signal.SIGKILL)

    cut = await cut_start(rig, kill)
    await restarted(rig)
    rig.cs.faults.job_seconds = 0.0  # the create under way keeps its own delay
    ended = await rig.wait(cut)
    assert ended["status"] == "failed", ended
    await next_sync_takes_it(rig, cut, {})
    assert rig.cs.commands.calls.count("createVolume") == 2  # one per disk: none asked again
    assert "volume-agent is still creating" in rig.log_tail(lines=2000)  # the sync came while it was under way


async def test_volume_agent_killed_mid_create_the_next_sync_takes_what_it_made(rig: Rig) -> None:
    """volume-agent dies while CloudStack creates the volume: the sync fails; volume-agent's start-up keeps the
    volume (its record said a create was under way); the next sync takes it."""
    rig.cs.faults.job_seconds = 2.0

    async def kill() -> None:
        await until(lambda: "createVolume" in rig.cs.commands.calls, lambda: rig.log_tail())
        rig.stack.daemons["volume-agent"].stop(sig=signal.SIGKILL)

    cut = await cut_start(rig, kill)
    ended = await rig.wait(cut)
    assert ended["status"] == "failed", ended
    rig.cs.faults.job_seconds = 0.0
    await restarted(rig, "volume-agent")
    before = ours(rig)
    assert sorted(len(ids) for ids in before.values()) == [1], before
    await next_sync_takes_it(rig, cut, before)
    assert rig.cs.commands.calls.count("createVolume") == 2


async def test_a_volume_created_for_a_removed_context_is_deleted_at_start(rig: Rig) -> None:
    """omad dies with the new volume attached here and not recorded; its VM context is removed before omad starts
    again: that volume is detached and deleted, nothing is left pending."""
    await cut_at(rig, "replication:volume-save")
    omad = rig.stack.daemons["omad"]
    await until(lambda: not omad.running(), lambda: rig.log_tail())
    assert len(ours(rig)) == 1 and len(rig.cs.attached_here()) == 1
    with contextlib.closing(sqlite3.connect(rig.stack.database)) as db:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("DELETE FROM jobs")
        db.execute("DELETE FROM vm_replication_contexts")
        db.commit()
    await asyncio.to_thread(rig.stack.start, "omad")
    await until(lambda: not pending(rig), lambda: rig.log_tail())
    assert ours(rig) == {} and rig.cs.attached_here() == []
    assert Counter(c for c in rig.cs.commands.calls if "Volume" in c)["deleteVolume"] == 1


async def test_another_vm_of_the_same_volume_name_does_not_take_the_volume(twins: Rig) -> None:
    """`app 01` dies with its new volume not yet recorded; `app-01-a22b2178`, named literally as `app 01`'s volumes
    are, asks for that name: refused (409 volume exists, as before), it leaves nothing pending that could make its
    next sync take the other VM's volume; `app 01`'s next sync takes it."""
    rig = twins
    assert volume_vm_name(TWIN) == volume_vm_name(VM)  # a genuine collision
    cut = await cut_at(rig, "replication:volume-attach")
    await restarted(rig)
    before = ours(rig)
    assert (await rig.wait(cut))["status"] == "failed"
    twin = next(v for v in rig.state.inventory.discovery()["vms"] if v["name"] == TWIN)
    for _ in range(2):
        status, body = await rig.api.post("/replications", {"source_vm": twin, "ossea_config_id": 1})
        assert status == 409 and body["error"] == "volume exists", body
        assert [d for d, _ in pending(rig)] == ["disk-2000"]  # app 01's only
    assert ours(rig) == before
    rows = rig.stack.sql("SELECT c.vm_name FROM replication_volume_creates p JOIN vm_replication_contexts c"
                         " ON c.context_id = p.vm_context_id")
    assert rows == [(VM,)], rows
    await next_sync_takes_it(rig, cut, before)


async def test_omad_killed_before_the_vma_took_the_sync_the_adopted_job_fails_saying_so(rig: Rig) -> None:
    """Killed with the volumes recorded and the exports started, before the VMA was asked: after the restart the
    monitor adopts the job, the VMA does not know it, and the job fails saying omad stopped before the VMA took
    it (not that the VMA lost it); its exports and ports are released and the next sync works."""
    cut = await cut_at(rig, "replication:vma")
    await restarted(rig)
    ended = await rig.wait(cut)
    assert ended["status"] == "failed" and "before the VMA took" in str(ended["error_message"]), ended
    assert cut not in rig.state.jobs
    await rig.assert_released()
    done = await rig.sync()
    rig.assert_volumes_hold_sources(done)
