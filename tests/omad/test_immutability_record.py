"""omad's record of which backups the filesystem holds immutable (`files_locked`), against volume-agent's
answers when a lock or unlock does not end cleanly (a hung filesystem: 504 `outcome_unknown`, the change
landing later): the record follows what a status read finds, never says "locked" about files that are not,
and a backup recorded "not locked" in an immutable repository is unlocked before removal anyway."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import pytest

from oma_common.contracts.volume_agent import Locked, LockStatus
from oma_common.errors import OmaError, TimedOut, Unavailable
from omad.adapters.localfs import LocalFs
from omad.audit import Audit
from omad.backup.immutability import Immutability
from omad.store import backups, repositories
from omad.store.db import Database

from .test_store_backups import complete_all, new_backup, repository
from ..lib.scheduling import FakeClock, add_contexts

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def unknown() -> OmaError:
    err = TimedOut("outcome unknown", "the filesystem did not set the attribute in time")
    err.code = "outcome_unknown"
    return err


class Disk:
    """volume-agent as omad sees it, over files' flags: each call may answer as told and change the flags
    as told (a change that lands though its answer was outcome_unknown)."""

    def __init__(self) -> None:
        self.flags: dict[str, bool] = {}
        self.calls: list[str] = []
        self.lock_answer: OmaError | None = None  # raised after the change landed, when `lands`
        self.unlock_answer: OmaError | None = None
        self.status_answer: OmaError | None = None
        self.lands = True

    def _change(self, paths: list[str], on: bool, answer: OmaError | None) -> Locked:
        if answer is None or self.lands:
            self.flags.update(dict.fromkeys(paths, on))
        if answer is not None:
            raise answer
        return Locked(paths, on)

    async def lock_files(self, paths: list[str]) -> Locked:
        self.calls.append("lock")
        return self._change(paths, True, self.lock_answer)

    async def unlock_files(self, paths: list[str]) -> Locked:
        self.calls.append("unlock")
        return self._change(paths, False, self.unlock_answer)

    async def files_status(self, paths: list[str]) -> LockStatus:
        self.calls.append("status")
        if self.status_answer is not None:
            raise self.status_answer
        return LockStatus({p: self.flags.get(p, False) for p in paths})


@dataclasses.dataclass
class Setup:
    db: Database
    disk: Disk
    immutability: Immutability
    files: list[Path]

    async def files_locked(self) -> bool:
        b = await backups.find_one(self.db, "b1")
        assert b is not None
        return b.files_locked


@pytest.fixture
async def setup(db: Database, tmp_path: Path) -> Setup:
    ctx = (await add_contexts(db, ["vm"]))["vm"]
    root = tmp_path / "repo"
    async with db.transaction() as tx:
        await repositories.create(tx, dataclasses.replace(repository("repo-1", "vault", root), is_immutable=True,
                                                          min_retention_days=7))
    await new_backup(db, ctx, "b1")
    assert await complete_all(db, "b1")
    files = await backups.image_paths(db, "b1")
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"image")
    disk = Disk()
    imm = Immutability(db, Audit(db), cast(Any, disk), LocalFs(), cast(Any, FakeClock(T0)))
    return Setup(db, disk, imm, files)


async def test_a_lock_whose_outcome_was_unknown_is_recorded_as_read_back(setup: Setup) -> None:
    setup.disk.lock_answer = unknown()  # ... and the change lands
    await setup.immutability.lock_new("b1")
    assert setup.disk.calls == ["lock", "status"]
    assert await setup.files_locked(), "the files are immutable on disk but omad records them mutable"


async def test_a_lock_that_did_not_land_is_not_recorded(setup: Setup) -> None:
    setup.disk.lock_answer, setup.disk.lands = unknown(), False
    await setup.immutability.lock_new("b1")
    assert not await setup.files_locked()


async def test_files_recorded_mutable_are_unlocked_before_removal_anyway(setup: Setup) -> None:
    """The lock answered outcome_unknown, the status could not be read either (the change still blocked),
    and the change landed afterwards: the record says "not locked" while the files are immutable."""
    setup.disk.lock_answer, setup.disk.status_answer = unknown(), unknown()
    await setup.immutability.lock_new("b1")
    assert not await setup.files_locked() and all(setup.disk.flags.values())
    setup.disk.status_answer = None
    await setup.immutability.release("b1", setup.files)
    assert setup.disk.flags == dict.fromkeys(map(str, setup.files), False), "removal would fail: still immutable"


async def test_a_filesystem_without_the_attribute_does_not_stop_a_removal(setup: Setup) -> None:
    setup.disk.lock_answer = Unavailable("no immutable attribute", "nfs")
    setup.disk.lock_answer.code = "no_immutable_attribute"
    setup.disk.status_answer, setup.disk.lands = setup.disk.lock_answer, False
    await setup.immutability.lock_new("b1")
    assert not await setup.files_locked()
    setup.disk.unlock_answer = setup.disk.lock_answer
    await setup.immutability.release("b1", setup.files)  # nothing to unlock: no error


async def test_an_unlock_whose_outcome_was_unknown_never_leaves_a_record_of_locked_files_that_are_not(
        setup: Setup) -> None:
    await setup.immutability.lock_new("b1")
    assert await setup.files_locked()
    setup.disk.unlock_answer, setup.disk.status_answer = unknown(), unknown()  # landed; not readable yet
    with pytest.raises(OmaError, match="outcome unknown"):
        await setup.immutability.release("b1", setup.files)
    assert not any(setup.disk.flags.values())
    assert not await setup.files_locked(), "omad records immutable files that are not"
    # Not landed, and readable: the record says what is on disk.
    await setup.immutability.lock_new("b1")
    setup.disk.status_answer, setup.disk.lands = None, False
    with pytest.raises(OmaError, match="outcome unknown"):
        await setup.immutability.release("b1", setup.files)
    assert all(setup.disk.flags.values()) and await setup.files_locked()
