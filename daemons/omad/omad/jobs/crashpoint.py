"""Fault injection for tests: a named point where omad dies as `kill -9` would, when the crash file names it.

The file (`[failover] crash_file`, empty = off) holds one point's name; the first process to reach that point
removes the file and kills itself with SIGKILL — no cleanup, no finally blocks, exactly what a crash leaves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def crash_if_named(crash_file: Path | None, name: str, resource: str) -> None:
    """Die (once) when the crash file names this point."""
    if crash_file is None:
        return
    with contextlib.suppress(FileNotFoundError):
        if crash_file.read_text().strip() == name:
            crash_file.unlink()
            log.warning("crash file names %s: dying now", name, extra={"resource": resource})
            os.kill(os.getpid(), signal.SIGKILL)
