"""The scheduled verification service on a fake clock, on real QCOW2 chains: every `verify_interval_seconds`
the backups never verified or verified longer than `reverify_after_hours` ago are verified and the result is
stored (a corrupted one as failed, naming its file); backups verified recently are left alone."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest

from omad.config import PolicyConfig
from omad.schedule.clock import iso
from omad.store.db import Database

from .policy_rig import T0, PolicyRig

pytestmark = pytest.mark.timeout(120)


async def states(db: Database) -> dict[str, tuple[str | None, str | None]]:
    rows = await db.fetchall("SELECT backup_id, verify_status, verified_at FROM backup_jobs")
    return {r["backup_id"]: (r["verify_status"], r["verified_at"]) for r in rows}


async def wait_verified(db: Database, backups: set[str], at: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while {b for b, (_, when) in (await states(db)).items() if when == at} != backups:
        assert time.monotonic() < deadline, (at, await states(db))
        await asyncio.sleep(0.02)


async def test_the_scheduled_pass_verifies_stale_backups_only(db: Database, tmp_path: Path) -> None:
    rig = await PolicyRig.build(db, tmp_path, cfg=PolicyConfig(verify_interval_seconds=3600,
                                                               reverify_after_hours=24))
    await rig.repo("primary")
    long_ago, lately = iso(T0 - timedelta(days=3)), iso(T0 - timedelta(hours=2))
    never = await rig.backup("never", "primary")
    old = await rig.backup("old", "primary", day=-5, verified_at=long_ago)
    fresh = await rig.backup("fresh", "primary", day=-1, verified_at=lately)
    inc = await rig.backup("inc", "primary", day=-0.5, parent=fresh, verified_at=long_ago)
    bad = await rig.backup("bad", "primary", day=-4)
    bad_image = rig.image("primary", bad)
    data = bytearray(bad_image.read_bytes())
    data[-1] ^= 0xFF  # one byte of its data: qemu-img check passes, the recorded checksum does not
    bad_image.write_bytes(bytes(data))

    await rig.verifier.start()
    try:
        await asyncio.sleep(0.02)  # asleep on the clock: nothing verified before the interval is up
        assert (await states(db))[never] == (None, None)

        rig.clock.advance(seconds=3600)
        first = iso(rig.clock.now())
        await wait_verified(db, {never, old, inc, bad}, first)
        after = await states(db)
        assert after[never] == ("ok", first) and after[old] == ("ok", first) and after[inc] == ("ok", first)
        assert after[fresh] == ("ok", lately)  # verified 2 h before: not again
        assert after[bad] == ("failed", first)
        [problem] = json.loads(await db.scalar("SELECT verify_errors FROM backup_jobs WHERE backup_id = ?", (bad,)))
        assert problem["file"] == str(bad_image) and "checksum mismatch" in problem["problem"], problem
        assert (await rig.verifier.result(bad))["errors"] == [problem]

        # An hour later every backup is fresh (`fresh` was verified 3 h ago): the pass verifies nothing.
        rig.clock.advance(seconds=3600)
        await asyncio.sleep(0.2)
        assert await states(db) == after

        # Past reverify_after_hours since the first pass (and past it for `fresh`): all are verified again.
        rig.clock.advance(hours=24)
        again = iso(rig.clock.now())
        await wait_verified(db, {never, old, fresh, inc, bad}, again)
        assert (await states(db))[bad] == ("failed", again)
    finally:
        await rig.verifier.stop()
