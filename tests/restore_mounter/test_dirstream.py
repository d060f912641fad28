"""Reading a directory from a readdir position, and the cursors built on it (no mounts needed)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from restore_mounter.dirstream import DirStream
from restore_mounter.files import BadCursor, Cursor


def test_pages_resume_at_their_position_and_see_each_name_once(tmp_path: Path) -> None:
    want = {f"n{i}" for i in range(2500)}
    for name in want:
        (tmp_path / name).touch()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen: list[str] = []
        position = 0
        while True:
            page: list[tuple[str, int]] = []
            with DirStream(fd, position) as entries:
                for item in entries:
                    page.append(item)
                    if len(page) == 333:
                        break
            seen += [name for name, _ in page]
            if len(page) < 333:
                break
            position = page[-1][1]
        assert len(seen) == len(want) and set(seen) == want
        assert sorted(os.listdir(fd)) == sorted(want)  # the caller's descriptor is left at the start
    finally:
        os.close(fd)


def test_cursors_round_trip_and_garbage_is_refused() -> None:
    c = Cursor.encode(1234, 2 ** 62 + 5, 77)
    assert Cursor.decode(c, 1234) == (77, 2 ** 62 + 5)
    with pytest.raises(BadCursor):
        Cursor.decode(c, 1235)  # another directory
    rng = random.Random(7)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for _ in range(2000):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 64)))
        with pytest.raises(BadCursor):  # refused, never decoded into a position nor another exception
            Cursor.decode(junk, 1234)


def test_a_failed_open_leaves_nothing_to_complain_about() -> None:
    import gc
    import sys

    unraisable: list[object] = []
    old, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with pytest.raises(OSError):
            DirStream(-1)  # os.dup fails before the stream exists
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert unraisable == []
