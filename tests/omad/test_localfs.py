"""omad's repository file calls: a copy that times out or is cancelled stops and leaves no file behind."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from oma_common.errors import TimedOut
from omad.adapters.localfs import CHUNK, LocalFs

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("end", ["timeout", "cancel"])
async def test_a_copy_given_up_stops_and_removes_its_file(tmp_path: Path, end: str) -> None:
    src, dst = tmp_path / "disk.qcow2", tmp_path / "copy.qcow2.partial"
    src.write_bytes(os.urandom(1024) * (8 * CHUNK // 1024))  # 8 chunks
    entered, release, copied = threading.Event(), threading.Event(), []

    def progress(done: int) -> None:  # in the copy's thread: held after the first chunk until released
        copied.append(done)
        entered.set()
        assert release.wait(30)

    fs = LocalFs(timeout=30)
    task = asyncio.create_task(fs.copy_file(src, dst, progress=progress, timeout=0.5 if end == "timeout" else None))
    assert await asyncio.to_thread(entered.wait, 30)
    if end == "cancel":
        task.cancel()  # the copy job cancelled
    with pytest.raises(TimedOut if end == "timeout" else asyncio.CancelledError):
        await task  # returns at once: a thread stuck on a dead share would never let the caller go
    release.set()
    for _ in range(300):  # the thread ends at its next chunk and removes what it wrote
        if not dst.exists():
            break
        await asyncio.sleep(0.01)
    assert not dst.exists()
    assert copied == [CHUNK]  # it stopped after the chunk it was in, not after copying everything
