"""StateFile's shared saves: concurrent changes share a write, every caller returns only once its change is on
disk, a failed write fails each of its callers (and none of their changes is written later), the document is
never torn."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from oma_common import statefile
from oma_common.statefile import Damaged, StateFile

pytestmark = [pytest.mark.timeout(30)]


class Writes:
    """Stands in for write_atomically: writes for real, but the first call waits until `release` is set (a
    disk busy with an fsync), and the calls numbered in `fail` (1, 2, …) raise ENOSPC."""

    def __init__(self) -> None:
        self.real = statefile.write_atomically
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: set[int] = set()
        self.calls = 0

    def __call__(self, path: Path, text: str, mode: int = 0o600, *, sync_directory: bool = True) -> None:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(20), "the test never let the first write go"
        if self.calls in self.fail:
            raise OSError(28, "No space left on device")
        self.real(path, text, mode, sync_directory=sync_directory)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    w = Writes()
    monkeypatch.setattr(statefile, "write_atomically", w)
    return w


def saved(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())["items"])


async def test_concurrent_changes_share_writes_and_each_returns_once_its_change_is_on_disk(
        tmp_path: Path, writes: Writes) -> None:
    doc = StateFile(tmp_path / "things.json", "things", damaged=Damaged.REFUSE)
    items: list[dict[str, Any]] = []

    async def change(i: int) -> None:
        items.append({"i": i})
        await doc.save(lambda: list(items))
        assert {"i": i} in saved(doc.path)  # durable when the call returns

    first = asyncio.create_task(change(0))
    await asyncio.to_thread(writes.entered.wait, 10)  # the first write is under way (its snapshot taken)
    rest = [asyncio.create_task(change(i)) for i in range(1, 10)]
    await asyncio.sleep(0)  # they all join the next write while the first is held
    writes.release.set()
    await asyncio.gather(first, *rest)
    assert doc.writes == writes.calls == 2  # 10 changes, 2 writes: the first, then the other nine at once
    assert saved(doc.path) == [{"i": i} for i in range(10)]


async def test_a_failed_write_fails_each_of_its_callers_and_their_undone_changes_are_not_written_later(
        tmp_path: Path, writes: Writes) -> None:
    doc = StateFile(tmp_path / "things.json", "things", damaged=Damaged.REFUSE)
    items: list[str] = []

    async def change(name: str) -> None:
        items.append(name)
        try:
            await doc.save(lambda: [{"name": n} for n in items])
        except BaseException:
            items.remove(name)  # the callers' undo, as Pool and Exports do
            raise

    writes.fail = {2, 3}
    held = asyncio.create_task(change("held"))
    await asyncio.to_thread(writes.entered.wait, 10)
    joined = [asyncio.create_task(change(f"j{i}")) for i in range(3)]
    await asyncio.sleep(0)
    writes.release.set()
    await held  # write 1 works
    results = await asyncio.gather(*joined, return_exceptions=True)  # write 2, which all three share, fails
    assert all(isinstance(r, OSError) and r.errno == 28 for r in results), results
    assert writes.calls == 2 and items == ["held"] and saved(doc.path) == [{"name": "held"}]

    # A change made while a failing write is under way goes into the next write, without the failed ones.
    writes.release.clear()
    writes.entered.clear()
    doomed = asyncio.create_task(change("doomed"))  # write 3 fails
    await asyncio.to_thread(writes.entered.wait, 10)
    later = asyncio.create_task(change("later"))  # write 4
    await asyncio.sleep(0)
    writes.release.set()
    with pytest.raises(OSError):
        await doomed
    await later
    assert writes.calls == 4 and saved(doc.path) == [{"name": "held"}, {"name": "later"}]


async def test_a_cancelled_caller_stops_waiting_but_its_change_is_still_written(tmp_path: Path,
                                                                                writes: Writes) -> None:
    doc = StateFile(tmp_path / "things.json", "things", damaged=Damaged.REFUSE)
    items = [{"a": 1}]
    task = asyncio.create_task(doc.save(lambda: list(items)))
    await asyncio.to_thread(writes.entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    items.append({"b": 2})
    writes.release.set()
    await doc.save(lambda: list(items))  # waits for the first write to end, then writes again
    assert saved(doc.path) == [{"a": 1}, {"b": 2}] and doc.writes == 2


async def test_saves_never_leave_a_torn_document_and_never_go_backwards(tmp_path: Path) -> None:
    doc = StateFile(tmp_path / "things.json", "things", damaged=Damaged.REFUSE, sync_directory=False)
    items: list[dict[str, Any]] = []
    seen: list[int] = []
    stop = threading.Event()

    def read_all_the_time() -> None:  # a reader that never sees a partial file
        while not stop.is_set():
            if doc.path.exists():
                seen.append(len(doc.load()))

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for round_ in range(20):
            async def change(i: int) -> None:
                items.append({"i": i, "pad": "x" * 4000})
                await doc.save(lambda: list(items))
            await asyncio.gather(*(change(round_ * 5 + k) for k in range(5)))
    finally:
        stop.set()
        reader.join()
    assert len(doc.load()) == 100 and seen == sorted(seen)
    assert doc.writes < 100
    assert not list(tmp_path.glob(".*.tmp"))
