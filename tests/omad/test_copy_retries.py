"""A copy's retries, in process on real QCOW2 chains: the destination's filesystem refuses the first tries
(a substitute LocalFs whose rename into place fails, as on a destination that has gone read-only), the pauses
between tries double (recorded by the clock), and the copy completes on a later try; when every try fails
the copy is failed with the reason, and nothing of it is left in the destination."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from oma_common.errors import Unavailable
from omad.adapters.localfs import LocalFs
from omad.config import PolicyConfig
from omad.store.db import Database

from ..lib.scheduling import FakeClock
from .policy_rig import T0, PolicyRig, same_content

pytestmark = pytest.mark.timeout(120)


class SteppingClock(FakeClock):
    """A fake clock whose sleeps return at once, moving its time on and recording how long they were."""

    def __init__(self) -> None:
        super().__init__(T0)
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.set(self.now() + timedelta(seconds=seconds))


class RefusingFs(LocalFs):
    """LocalFs whose destination refuses to take a finished image into place for the first `refusals`
    renames of a file whose name holds `name` (the partial image has been written by then)."""

    def __init__(self, refusals: int, name: str) -> None:
        super().__init__()
        self.refusals = refusals
        self.name = name
        self.refused: list[Path] = []
        self.copied: list[Path] = []

    async def copy_file(self, src: Path, dst: Path, **kw: object) -> str:
        self.copied.append(src)
        return await super().copy_file(src, dst, **kw)  # type: ignore[arg-type]

    async def rename(self, src: Path, dst: Path) -> None:
        if self.name in dst.name and len(self.refused) < self.refusals:
            self.refused.append(src)
            assert src.exists()  # a partial image is there to be cleaned up
            raise Unavailable("cannot rename file", f"rename {src} to {dst}: Read-only file system")
        await super().rename(src, dst)


def leftovers(root: Path, backup_id: str) -> list[str]:
    return sorted(p.name for p in root.rglob(f"{backup_id}@*"))


async def test_a_copy_is_retried_with_doubling_pauses_until_it_succeeds(db: Database, tmp_path: Path) -> None:
    fs, clock = RefusingFs(2, "a0@"), SteppingClock()
    rig = await PolicyRig.build(db, tmp_path, fs=fs, clock=clock,
                                cfg=PolicyConfig(copy_attempts=4, copy_backoff_seconds=5.0))
    await rig.repo("primary")
    dest = await rig.repo("offsite")
    a0 = await rig.backup("a0", "primary")

    out = await rig.copies.request(a0, "offsite", actor="test")
    [row] = await rig.settle()
    assert row["id"] == out["copy_id"] and row["status"] == "completed", row
    assert row["attempts"] == 3 and row["error_message"] is None and row["progress_percent"] == 100
    assert clock.slept == [5.0, 10.0]  # before the 2nd and the 3rd try
    assert len(fs.refused) == 2 and len(fs.copied) == 3  # each try copied the image afresh
    assert leftovers(dest, a0) == ["a0@offsite-disk-2000.qcow2"]  # no partial file of a refused try
    assert same_content(rig.image("primary", a0), rig.image("offsite", "a0@offsite"))
    job = await rig.jobs.get(out["copy_id"])
    assert job["status"] == "completed", job
    found, _ = await rig.verifier.problems("a0@offsite")
    assert found == []


async def test_a_copy_that_fails_every_try_is_failed_and_leaves_nothing_partial(db: Database,
                                                                                 tmp_path: Path) -> None:
    fs, clock = RefusingFs(99, "a1@"), SteppingClock()
    rig = await PolicyRig.build(db, tmp_path, fs=fs, clock=clock,
                                cfg=PolicyConfig(copy_attempts=3, copy_backoff_seconds=2.0))
    await rig.repo("primary")
    dest = await rig.repo("offsite")
    a0 = await rig.backup("a0", "primary")
    a1 = await rig.backup("a1", "primary", day=1, parent=a0)

    out = await rig.copies.request(a1, "offsite", actor="test")
    rows = await rig.settle()
    row = next(r for r in rows if r["id"] == out["copy_id"])
    assert row["status"] == "failed" and row["attempts"] == 3, row
    assert row["copy_backup_id"] is None and row["completed_at"] is not None
    assert "cannot rename file" in row["error_message"] and "Read-only file system" in row["error_message"], row
    assert clock.slept == [2.0, 4.0]
    job = await rig.jobs.get(out["copy_id"])
    assert job["status"] == "failed" and "Read-only file system" in job["error_message"], job
    public = (await rig.copies.of_backup(a1))["copies"]
    assert [(c["status"], c["attempts"]) for c in public] == [("failed", 3)]

    # Nothing of the incremental's copy: no image, no partial file, no backup row in the destination.
    assert leftovers(dest, a1) == []
    assert await db.scalar("SELECT COUNT(*) FROM backup_jobs WHERE backup_id = 'a1@offsite'") == 0
    # The full below it was copied whole by the first try (and recorded, so later tries did not copy it
    # again): a complete, verified backup of the destination, not a partial one.
    assert leftovers(dest, a0) == ["a0@offsite-disk-2000.qcow2"]
    assert fs.copied.count(rig.image("primary", a0)) == 1 and fs.copied.count(rig.image("primary", a1)) == 3
    [full_copy] = await rig.copy_rows(source_backup_id=a0)
    assert full_copy["status"] == "completed" and full_copy["copy_backup_id"] == "a0@offsite"
    assert (await rig.verifier.problems("a0@offsite"))[0] == []

    # Asked again once the destination takes files, the copy completes on top of the full already there.
    fs.refusals = 0
    fs.refused.clear()
    again = await rig.copies.request(a1, "offsite", actor="test")
    assert again["copy_id"] != out["copy_id"]
    await rig.settle()
    assert (await rig.copies.get(again["copy_id"]))["status"] == "completed"
    assert same_content(rig.image("primary", a1), rig.image("offsite", "a1@offsite"))


class BrokenFs(LocalFs):
    """LocalFs with a fault of ours in it: renaming the finished image raises something that is not an OmaError."""

    async def rename(self, src: Path, dst: Path) -> None:
        raise RuntimeError("a bug")


async def test_a_copy_ended_by_a_fault_of_ours_is_failed_not_left_running(db: Database, tmp_path: Path) -> None:
    rig = await PolicyRig.build(db, tmp_path, fs=BrokenFs(), clock=SteppingClock(),
                                cfg=PolicyConfig(copy_attempts=3, copy_backoff_seconds=1.0))
    await rig.repo("primary")
    dest = await rig.repo("offsite")
    a0 = await rig.backup("a0", "primary")

    out = await rig.copies.request(a0, "offsite", actor="test")
    [row] = await rig.settle()
    assert row["status"] == "failed" and row["attempts"] == 1, row  # no retry of a bug
    assert "internal error" in row["error_message"] and "a bug" in row["error_message"], row
    job = await rig.jobs.get(out["copy_id"])
    assert job["status"] == "failed", job
    assert leftovers(dest, a0) == []


class StuckFs(LocalFs):
    """LocalFs whose rename of the finished image never ends (a destination that hangs)."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = asyncio.Event()

    async def rename(self, src: Path, dst: Path) -> None:
        self.stuck.set()
        await asyncio.Event().wait()


async def test_a_copy_cut_short_as_omad_stops_is_failed_not_left_running(db: Database, tmp_path: Path) -> None:
    """omad stops during a copy (its job is cancelled after the grace): the copy's row ends failed with its job,
    so asking for that copy again makes a new one instead of answering the dead one as live."""
    fs = StuckFs()
    rig = await PolicyRig.build(db, tmp_path, fs=fs, clock=SteppingClock(),
                                cfg=PolicyConfig(copy_attempts=3, copy_backoff_seconds=1.0))
    await rig.repo("primary")
    dest = await rig.repo("offsite")
    a0 = await rig.backup("a0", "primary")

    out = await rig.copies.request(a0, "offsite", actor="test")
    await asyncio.wait_for(fs.stuck.wait(), 60)
    await rig.jobs.drain(timeout=0)
    [row] = await rig.copy_rows()
    assert row["status"] == "failed" and "interrupted" in row["error_message"], row
    assert (await rig.jobs.get(out["copy_id"]))["status"] == "failed"
    assert leftovers(dest, a0) == []
    again = await rig.copies.request(a0, "offsite", actor="test")
    assert again["copy_id"] != out["copy_id"] and "existing" not in again, again
    await rig.jobs.drain(timeout=0)
