"""The start-up sweep of volumes created for removed VM contexts: a fault of ours in it is logged, not lost."""

from __future__ import annotations

import asyncio
import logging

import pytest

from omad.replication import volume_creates
from omad.store.db import Database


async def test_a_sweep_that_fails_unexpectedly_is_logged(db: Database, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    async def broken(_db: object) -> list[object]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(volume_creates.store, "volume_creates_without_context", broken)
    sweep = volume_creates.ContextlessCreates(db, object())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger=volume_creates.__name__):
        await sweep.start()
        assert sweep._task is not None
        await asyncio.gather(sweep._task, return_exceptions=True)
        await asyncio.sleep(0)  # the done callbacks run
    assert any("sweep failed" in r.message and r.exc_info for r in caplog.records), caplog.records
    await sweep.stop()
