"""Copies into one repository of backups of one chain, in process on real QCOW2 chains: a copy that waited for
the chain's lock while the copy of a backup above it copied its backup too finds itself done — it neither copies
again nor stays `running` (found by a scheduled-copies run under load: the copy of a0 waited, the copy of a1 took
the lock first and copied a0 with it; a0's copy then restarted, copied a0 a second time, failed on the existing
copy's id and stayed `running` for ever)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from omad.store.db import Database

from .policy_rig import PolicyRig, same_content

pytestmark = pytest.mark.timeout(120)


async def test_a_copy_waiting_while_the_copy_above_it_takes_its_backup_along_ends_done(db: Database,
                                                                                       tmp_path: Path) -> None:
    rig = await PolicyRig.build(db, tmp_path)
    for repo in ("primary", "dest"):
        await rig.repo(repo)
    a0 = await rig.backup("a0", "primary")
    a1 = await rig.backup("a1", "primary", day=1, parent=a0)
    async with rig.copies.locks.hold(f"copy-into:dest:{a0}", wait=True):  # both copies queue behind this
        above = await rig.copies.request(a1, "dest", actor="test")
        await asyncio.sleep(0.05)  # a1's copy is first in the lock's queue
        below = await rig.copies.request(a0, "dest", actor="test")
        await asyncio.sleep(0.05)
    rows = {r["id"]: r for r in await rig.settle()}
    assert set(rows) == {above["copy_id"], below["copy_id"]}, rows
    for r in rows.values():
        assert r["status"] == "completed" and r["error_message"] is None, r
    assert rows[below["copy_id"]]["copy_backup_id"] == f"{a0}@dest"
    for copy_id in rows:
        status, error = (await db.fetchone("SELECT status, error_message FROM jobs WHERE id = ?", (copy_id,))).values()
        assert (status, error) == ("completed", None), copy_id
    # One copy of each backup in the destination, the same content as the source.
    held = await db.fetchall("SELECT backup_id FROM backup_jobs WHERE repository_id = 'dest' ORDER BY backup_id")
    assert [r["backup_id"] for r in held] == [f"{a0}@dest", f"{a1}@dest"]
    for b in (a0, a1):
        assert same_content(rig.image("primary", b), rig.image("dest", f"{b}@dest"))
