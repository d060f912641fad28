"""Ending the VMA tunnel's sshd sessions when omad revokes a key: omad runs unprivileged and cannot signal them.

Narrow on purpose: the only processes it signals are sshd's per-connection monitors (root, titled
"sshd: <tunnel user> [priv]") that omad names by pid and start time, as sshd's AuthorizedKeysCommand recorded
them when it handed out the revoked key. A monitor that gets SIGTERM passes it to its unprivileged session
process and both exit, closing the connection (OpenSSH monitor.c, monitor_child_handler), so no capability
beyond being root (the monitor's own uid) is needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

import psutil

from oma_common.contracts.volume_agent import SkippedSession, Terminated
from oma_common.process import AdoptedChild, ChildUnkillable, PidMismatch

log = logging.getLogger("volume_agent.tunnels")

PROGRAMS = ("sshd", "sshd-session")


@dataclasses.dataclass(frozen=True)
class Session:
    pid: int
    start_time: float


class TunnelSessions:
    def __init__(self, user: str, *, stop_timeout: float = 3.0) -> None:
        self.user = user
        self.stop_timeout = stop_timeout

    def _is_monitor(self, argv: list[str]) -> bool:
        title = " ".join(argv).strip()
        return any(title.startswith(f"{p}: {self.user} ") or title == f"{p}: {self.user}" for p in PROGRAMS)

    def _refusal(self, pid: int) -> str | None:
        """Why `pid` is not a tunnel session's sshd monitor (None: it is one)."""
        try:
            p = psutil.Process(pid)
            exe = os.path.basename(p.exe())
            uid = p.uids().real
        except psutil.Error as e:
            return f"not readable: {type(e).__name__}"
        if exe not in PROGRAMS:
            return f"runs {exe}, not sshd"
        if uid != 0:
            return "not sshd's privileged monitor"
        return None

    async def terminate(self, sessions: list[Session]) -> Terminated:
        terminated: list[int] = []
        skipped: list[SkippedSession] = []
        # /proc is read for every pid named, off the event loop: omad may name any number of them.
        refusals = await asyncio.to_thread(lambda: [self._refusal(s.pid) for s in sessions])
        for s, reason in zip(sessions, refusals):
            if reason is None:
                try:
                    monitor = AdoptedChild.adopt(s.pid, self._is_monitor, resource_id=f"tunnel-session:{s.pid}",
                                                 start_time=s.start_time, logger=log)
                except PidMismatch as e:
                    reason = str(e)
                else:
                    try:
                        await monitor.stop(timeout=self.stop_timeout, kill_timeout=self.stop_timeout)
                    except ChildUnkillable as e:
                        reason = str(e)
                    else:
                        terminated.append(s.pid)
                        log.info("ended the %s tunnel session of sshd pid %d", self.user, s.pid,
                                 extra={"resource": f"tunnel-session:{s.pid}"})
                        continue
            skipped.append(SkippedSession(s.pid, reason))
        return Terminated(terminated, skipped)
