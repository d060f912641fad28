"""omad's restore mount rows against what restore-mounter says, while a mount is being made and at start-up.

In process, with restore-mounter replaced by a fake whose POST /mounts can be held half-way: the races between
a mount being made and the reads that bring the rows in line (the list, one mount) cannot be timed with the
real daemons."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oma_common.contracts.restore_mounter import Mount as AgentMount
from oma_common.errors import Conflict, NotFound, TimedOut
from omad.audit import Audit
from omad.restore.service import DiskImage, RestoreService
from omad.store import restore_mounts as store
from omad.store.db import Database, StorageFull, utcnow


class FakeMounter:
    """restore-mounter as omad's client sees it; `hold` keeps a POST /mounts from reaching it until set."""

    def __init__(self) -> None:
        self.held: dict[str, AgentMount] = {}
        self.hold = asyncio.Event()
        self.hold.set()
        self.asked = asyncio.Event()
        self.unmounted: list[str] = []

    async def mount(self, image: str, mount_id: str) -> AgentMount:
        self.asked.set()
        await self.hold.wait()  # the request is on its way: restore-mounter does not know the mount yet
        m = AgentMount(mount_id=mount_id, image=image, mount_path=f"/mnt/{mount_id}", status="mounted",
                       device="/dev/loop9", backend="fuse_loop", attachment_id="a-1", filesystem_type="ext4",
                       created_at=utcnow(), last_activity_at=None, expires_at=None, idle_timeout_seconds=600,
                       in_use=False, active_operations=0, error=None, filesystems=[])
        self.held[mount_id] = m
        return m

    async def mounts(self) -> list[AgentMount]:
        return list(self.held.values())

    async def state(self, mount_id: str) -> AgentMount:
        if mount_id not in self.held:
            raise NotFound("mount not found", mount_id)
        return self.held[mount_id]

    async def unmount(self, mount_id: str, *, force: bool = False) -> Any:
        self.unmounted.append(mount_id)
        if self.held.pop(mount_id, None) is None:
            raise NotFound("mount not found", mount_id)


class Images:
    async def image_for(self, backup_id: str, disk_index: int) -> DiskImage:
        return DiskImage(path=f"/repo/{backup_id}/disk{disk_index}.qcow2", backup_status="completed")


def service(db: Database, mounter: FakeMounter) -> RestoreService:
    return RestoreService(db, Audit(db), mounter, Images())  # type: ignore[arg-type]


async def half_made(db: Database, restore: RestoreService,
                    mounter: FakeMounter) -> tuple[asyncio.Future[Any], store.Mount]:
    """A POST /restore/mount on its way to restore-mounter, held there; its task and its row."""
    mounter.hold.clear()
    mounting = asyncio.ensure_future(restore.mount("b-1", 0, "admin"))
    await asyncio.wait_for(mounter.asked.wait(), 5)
    (row,) = await store.held(db)
    return mounting, row


async def test_reading_the_mounts_while_one_is_being_made_leaves_it_mounting(db: Database) -> None:
    mounter = FakeMounter()
    restore = service(db, mounter)
    mounting, row = await half_made(db, restore, mounter)

    # The GUI's list and a look at the mount, while restore-mounter has not been reached yet.
    listed = await restore.mounts()
    assert [(m.mount_id, m.status) for m in listed.mounts] == [(row.id, "mounting")]
    one = await restore.mount_state(row.id)
    assert one.status == "mounting" and one.ended_at is None

    mounter.hold.set()
    made = await asyncio.wait_for(mounting, 5)
    assert made.status == "mounted" and made.ended_at is None
    after = await store.get(db, row.id)
    assert after.status == "mounted" and after.ended_at is None
    assert [m.mount_id for m in (await restore.mounts()).mounts] == [row.id]


async def test_a_mount_omad_died_making_ends_at_start_up(db: Database) -> None:
    """omad stopped between recording a mount and hearing restore-mounter's answer: at the next start the row
    ends (restore-mounter's mount, if it made one, is removed), never `mounting` for good."""
    mounter = FakeMounter()
    async with db.transaction() as tx:
        await store.start(tx, "rm-left", backup_id="b-1", disk_index=0, image_path="/repo/b-1/disk0.qcow2",
                          actor="admin", now=utcnow())
        await store.start(tx, "rm-never", backup_id="b-1", disk_index=1, image_path="/repo/b-1/disk1.qcow2",
                          actor="admin", now=utcnow())
    await mounter.mount("/repo/b-1/disk0.qcow2", "rm-left")  # restore-mounter made it; omad never heard

    await service(db, mounter).reconcile()

    assert await store.held(db) == []
    assert mounter.held == {} and mounter.unmounted == ["rm-left"]
    for mount_id in ("rm-left", "rm-never"):
        row = await store.get(db, mount_id)
        assert row.status in ("failed", "expired") and row.ended_at is not None, row


async def test_a_mount_whose_caller_went_away_ends(db: Database) -> None:
    """The POST is cancelled (its client gone) before restore-mounter answered: the row does not stay
    `mounting` (nothing else ends it while omad runs), and restore-mounter is asked to remove what it made."""
    mounter = FakeMounter()
    restore = service(db, mounter)
    mounting, row = await half_made(db, restore, mounter)
    mounting.cancel()
    await asyncio.gather(mounting, return_exceptions=True)
    assert mounting.cancelled()
    ended = await store.get(db, row.id)
    assert ended.status == "failed" and ended.ended_at is not None, ended
    assert mounter.unmounted == [row.id]
    assert (await restore.mounts()).mounts == []


async def test_a_mount_unmounted_while_being_made_stays_ended(db: Database) -> None:
    """DELETE /restore/{id} while the POST is on its way to restore-mounter ends the row; the POST's late
    success neither revives it (mounted with ended_at set) nor leaves restore-mounter's mount behind."""
    mounter = FakeMounter()
    restore = service(db, mounter)
    mounting, row = await half_made(db, restore, mounter)
    await restore.unmount(row.id, "admin")
    mounter.hold.set()
    with pytest.raises(Conflict):
        await asyncio.wait_for(mounting, 5)
    ended = await store.get(db, row.id)
    assert ended.status == "unmounted" and ended.ended_at is not None, ended
    assert mounter.held == {}


async def assert_abandoned(db: Database, mounter: FakeMounter) -> None:
    """The one mount restore-mounter made was removed from it at once and its row failed: nothing held."""
    assert await store.held(db) == []
    assert mounter.held == {} and len(mounter.unmounted) == 1
    ended = await store.get(db, mounter.unmounted[0])
    assert ended.status == "failed" and ended.ended_at is not None, ended


async def test_a_mount_whose_answer_timed_out_is_removed_from_restore_mounter(db: Database) -> None:
    """restore-mounter made the mount but its answer did not arrive in time: the row fails and the mount it
    made is removed at once, not left holding a device until idle expiry or the next start-up."""

    class LateMounter(FakeMounter):
        async def mount(self, image: str, mount_id: str) -> AgentMount:
            await super().mount(image, mount_id)
            raise TimedOut("restore-mounter timed out", "no answer in time")

    mounter = LateMounter()
    restore = service(db, mounter)
    with pytest.raises(TimedOut):
        await restore.mount("b-1", 0, "admin")
    await assert_abandoned(db, mounter)


async def test_a_mount_made_but_not_recorded_ends(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """restore-mounter made the mount but recording it failed (or the call was cancelled right then): the row
    does not stay `mounting` (nothing else ends it while omad runs) and restore-mounter's mount goes."""
    mounter = FakeMounter()
    restore = service(db, mounter)

    async def broken_write(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("disk I/O error")

    monkeypatch.setattr(store, "mark_mounted", broken_write)
    with pytest.raises(RuntimeError):
        await restore.mount("b-1", 0, "admin")
    await assert_abandoned(db, mounter)


async def test_a_mount_made_while_the_database_refuses_writes_is_removed(db: Database,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """restore-mounter made the mount, then the disk filled: neither the mount nor the row's failure can be
    recorded. The mount goes all the same (not left holding a loop device until idle expiry), and the caller
    hears the storage error; the row is left for the next start-up's reconcile."""
    mounter = FakeMounter()
    restore = service(db, mounter)

    async def full(*args: Any, **kwargs: Any) -> bool:
        raise StorageFull("the appliance's storage is full", "nothing of this change was stored")

    monkeypatch.setattr(store, "mark_mounted", full)
    monkeypatch.setattr(store, "fail", full)
    with pytest.raises(StorageFull):
        await restore.mount("b-1", 0, "admin")
    assert mounter.held == {} and len(mounter.unmounted) == 1
