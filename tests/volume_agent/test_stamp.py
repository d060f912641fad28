"""The stamp adapter opens the device by its path: it must refuse a path that no longer names the device
the agent vouched for (checked on the opened descriptor), and leave no descriptor behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from volume_agent.adapters import stamp


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_stamp_refuses_a_path_that_is_another_device(tmp_path: Path) -> None:
    # A regular file on a disk filesystem (O_DIRECT works there); its st_rdev is 0:0, never the vouched 7:0.
    image = Path("/var/tmp") / f"oma-stamp-test-{os.getpid()}"
    try:
        image.write_bytes(b"\0" * 65536)
        before = _open_fds()
        with pytest.raises(stamp.DeviceChanged):
            stamp.write(str(image), "a" * 32, "7:999")
        with pytest.raises(stamp.DeviceChanged):
            stamp.read(str(image), "7:999")
        assert _open_fds() == before
        assert image.read_bytes() == b"\0" * 65536  # nothing written
        # Without an expected device (or with the right one) it reads and writes as before.
        st = os.stat(image)
        assert stamp.write(str(image), "b" * 32, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}") == 65536 - 4096
        assert stamp.read(str(image)) == ("b" * 32, 65536 - 4096)
    finally:
        image.unlink(missing_ok=True)
