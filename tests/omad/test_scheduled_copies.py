"""The scheduled copy rules' service on a fake clock, on real QCOW2 chains: each pass copies the policy's
completed backups a scheduled rule's destination does not hold yet — rules of higher priority first, with
their verify_after_copy, disabled rules, disabled policies and immediate rules left out — copies nothing
twice, picks up a new incremental on the next pass, and never copies a backup whose verification fails."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from omad.backup.copies import ScheduledCopies
from omad.config import PolicyConfig
from omad.store.db import Database

from .policy_rig import PolicyRig, same_content

pytestmark = pytest.mark.timeout(120)


async def asked(rig: PolicyRig) -> list[tuple[str, str]]:
    """(backup, destination) of each copy the schedule asked for, in the order asked."""
    return [(r["source_backup_id"], r["destination_repository_id"])
            for r in await rig.copy_rows(created_by="schedule")]


async def test_scheduled_rules_copy_what_their_destinations_lack(db: Database, tmp_path: Path) -> None:
    cfg = PolicyConfig(copy_interval_seconds=600)
    rig = await PolicyRig.build(db, tmp_path, cfg=cfg)
    for repo in ("primary", "low", "high", "off", "now", "other"):
        await rig.repo(repo)
    await rig.policy("pol-1", "primary", [
        {"id": "rule-low", "destination_repository_id": "low", "priority": 1, "verify_after_copy": True},
        {"id": "rule-high", "destination_repository_id": "high", "priority": 5, "verify_after_copy": False},
        {"id": "rule-off", "destination_repository_id": "off", "priority": 9, "enabled": False},
        {"id": "rule-now", "destination_repository_id": "now", "copy_mode": "immediate"}])
    await rig.policy("pol-2", "primary", [{"destination_repository_id": "other"}], enabled=False)
    a0 = await rig.backup("a0", "primary", policy="pol-1")
    a1 = await rig.backup("a1", "primary", day=1, parent=a0, policy="pol-1")
    bad = await rig.backup("bad", "primary", day=2, policy="pol-1")
    data = bytearray(rig.image("primary", bad).read_bytes())
    data[-1] ^= 0xFF  # one byte off: its recorded checksum no longer matches
    rig.image("primary", bad).write_bytes(bytes(data))
    await rig.backup("lone", "primary", day=2)  # under no policy
    await rig.backup("p2", "primary", day=2, policy="pol-2")  # its policy is disabled

    service = ScheduledCopies(db, rig.copies, rig.clock, interval_seconds=cfg.copy_interval_seconds)
    await service.start()
    try:
        await asyncio.sleep(0.02)
        assert await rig.copy_rows() == []  # nothing before the first interval is up
        rig.clock.advance(seconds=600)
        for _ in range(200):
            if len(await asked(rig)) >= 6:
                break
            await asyncio.sleep(0.02)
        rows = await rig.settle()
        # The high-priority rule first; oldest backups first within a rule.
        assert await asked(rig) == [(a0, "high"), (a1, "high"), (bad, "high"), (a0, "low"), (a1, "low"),
                                    (bad, "low")]
        done = {(r["source_backup_id"], r["destination_repository_id"]): r for r in rows}
        for dest, rule, verify in (("high", "rule-high", 0), ("low", "rule-low", 1)):
            for b in (a0, a1):
                row = done[(b, dest)]
                assert row["status"] == "completed" and row["rule_id"] == rule, row
                assert row["verify_after_copy"] == verify and row["verified"] == verify, row
                assert same_content(rig.image("primary", b), rig.image(dest, f"{b}@{dest}"))
            assert (await rig.verifier.problems(f"{a1}@{dest}"))[0] == []
            # The corrupted source is not copied: its copy failed at the source's verification, at once (no
            # retry), and left nothing in the destination.
            row = done[(bad, dest)]
            assert row["status"] == "failed" and row["attempts"] == 1, row
            assert "source verification failed" in row["error_message"], row
            assert str(rig.image("primary", bad)) in row["error_message"], row
            assert not list((tmp_path / dest).rglob("bad@*"))
        assert {d for _, d in done} == {"high", "low"}  # not the disabled rule's, the immediate's or pol-2's
        assert await db.scalar("SELECT verify_status FROM backup_jobs WHERE backup_id = ?", (bad,)) == "failed"

        # Next pass: everything is held, and the bad backup is known bad — nothing is asked for.
        assert await service.due() == []
        rig.clock.advance(seconds=600)
        await asyncio.sleep(0.2)
        assert len(await rig.copy_rows()) == len(rows)

        # A new incremental: the pass after copies it alone, on top of the copies already there.
        a2 = await rig.backup("a2", "primary", day=3, parent=a1, policy="pol-1")
        rig.clock.advance(seconds=600)
        for _ in range(200):
            if len(await asked(rig)) >= 8:
                break
            await asyncio.sleep(0.02)
        await rig.settle()
        assert (await asked(rig))[6:] == [(a2, "high"), (a2, "low")]
        for dest in ("high", "low"):
            [row] = await rig.copy_rows(source_backup_id=a2, destination_repository_id=dest)
            assert row["status"] == "completed", row
            assert await db.scalar("SELECT parent_backup_id FROM backup_jobs WHERE backup_id = ?",
                                   (f"{a2}@{dest}",)) == f"{a1}@{dest}"
            assert same_content(rig.image("primary", a2), rig.image(dest, f"{a2}@{dest}"))
    finally:
        await service.stop()
