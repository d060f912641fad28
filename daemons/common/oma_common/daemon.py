"""Process plumbing shared by the daemons: stop signals, the agents' socket settings, and exit codes."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any
from pathlib import Path

from . import schema
from .errors import OmaError

log = logging.getLogger(__name__)


class StopSignal:
    """Set by SIGTERM or SIGINT; a second signal while stopping is logged and ignored (shutdown drains)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signame = ""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on, sig)

    def _on(self, sig: signal.Signals) -> None:
        if self.event.is_set():
            log.info("%s received again; still stopping", sig.name)
            return
        self.signame = sig.name
        log.info("%s received; stopping", sig.name)
        self.event.set()

    async def wait(self) -> str:
        await self.event.wait()
        return self.signame


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> None:
    """Run a daemon's async main; a configuration or start-up error exits 1 with one clear line."""
    try:
        code: int = asyncio.run(main())
    except OmaError as e:
        print(f"error: {e.message}: {e.details}", file=sys.stderr)
        code = 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full: {e}", file=sys.stderr)  # a key or state file at start-up
        code = 1
    except KeyboardInterrupt:
        code = 0
    # The loop is gone and its handlers with it: a late stop signal must not turn a clean exit into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


@dataclasses.dataclass
class SocketConfig:
    """Where an agent listens and who may call it."""

    path: str = schema.spec("", description="unix socket to listen on; empty = <run_dir>/<daemon>.sock")
    mode: int = schema.spec(0o660, description="permissions of the socket file")
    group: str = schema.spec("oma", description="group owning the socket (omad's group); "
                                                "left as is when that group does not exist")
    allowed_users: list[str | int] = schema.spec(
        factory=lambda: ["root", "oma"],
        description="users (names or uids) whose calls are accepted; the peer of every request is checked")

    def socket_path(self, run_dir: str, daemon: str) -> Path:
        return Path(self.path) if self.path else Path(run_dir) / f"{daemon}.sock"

