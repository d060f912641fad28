"""Child processes: supervised children and adoption of survivors after a restart (one-shot commands: command.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import select
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import psutil

from .blocking import run_blocking

log = logging.getLogger("oma.process")

#: What `pid_matches` compares a process with: the argv prefix it was started with, or a predicate on its argv.
Expectation = Union[Sequence[str], Callable[[list[str]], bool]]

#: A readiness probe: returns a truthy value once the child serves (handed back by `start`); a falsy value or
#: any exception means "not yet".
ReadyProbe = Callable[[], Awaitable[Any]]


class ProcessError(Exception):
    """Base class of the errors of this module."""


class ChildFailed(ProcessError):
    """A child could not be executed, or exited while we waited for it to become ready."""

    def __init__(self, resource_id: str, argv0: str, returncode: int | None, stderr_tail: str, reason: str = "") -> None:
        self.resource_id = resource_id
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        what = reason or f"exited with code {returncode}"
        super().__init__(f"{resource_id}: {argv0} {what}" + (f": {stderr_tail}" if stderr_tail else ""))


class ChildNotReady(ProcessError):
    """A child kept running but did not pass its readiness probe before the deadline; it has been stopped."""

    def __init__(self, resource_id: str, timeout: float, last_error: str, stderr_tail: str) -> None:
        self.resource_id = resource_id
        self.last_error = last_error
        self.stderr_tail = stderr_tail
        detail = "; ".join(x for x in (last_error, stderr_tail) if x)
        super().__init__(f"{resource_id}: not ready after {timeout:g}s" + (f": {detail}" if detail else ""))


class ChildUnkillable(ProcessError):
    """A process survived SIGKILL for the whole grace period (uninterruptible sleep, usually stuck I/O)."""


class PidMismatch(ProcessError):
    """A remembered pid is gone, a zombie, or now belongs to another program: it must not be signalled."""


@dataclasses.dataclass(frozen=True)
class ProcessIdentity:
    """What a daemon persists about a child so that a later instance can adopt or kill it safely."""

    pid: int
    argv: tuple[str, ...]
    start_time: float | None  # psutil create_time(); tells a reused pid apart from the remembered process

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "argv": list(self.argv), "start_time": self.start_time}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessIdentity:
        start = data.get("start_time")
        return cls(int(data["pid"]), tuple(str(a) for a in data["argv"]), None if start is None else float(start))


class StderrRing:
    """The last lines a child wrote to stderr, bounded in lines and in bytes per line."""

    def __init__(self, max_lines: int = 200, max_line_chars: int = 2000) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._max_line_chars = max_line_chars

    def append(self, line: str) -> str:
        if len(line) > self._max_line_chars:
            line = line[: self._max_line_chars] + "…"
        self._lines.append(line)
        return line

    def lines(self) -> list[str]:
        return list(self._lines)

    def tail(self, n: int = 10) -> str:
        return " | ".join(list(self._lines)[-n:])


def read_cmdline(pid: int) -> list[str] | None:
    """The argv of `pid` from /proc, or None if it is gone, a zombie or a kernel thread (empty cmdline)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if not raw:
        return None
    return [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def process_start_time(pid: int) -> float | None:
    """psutil's create_time() of `pid`, or None if it is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _matches(argv: list[str], expected: Expectation) -> bool:
    if callable(expected):
        return bool(expected(argv))
    prefix = list(expected)
    return len(prefix) > 0 and argv[: len(prefix)] == prefix


def pid_matches(pid: int, expected: Expectation, *, start_time: float | None = None) -> bool:
    """Whether `pid` is alive (not a zombie) and runs what we expect, checked in /proc before any signal.

    `expected` is the argv prefix the process was started with, or a predicate on its argv. With
    `start_time` (from `ProcessIdentity`), a recycled pid that happens to run the same command is refused too.
    """
    if pid <= 1:
        return False
    argv = read_cmdline(pid)
    if argv is None or not _matches(argv, expected):
        return False
    if start_time is not None:
        actual = process_start_time(pid)
        # create_time is derived from boot time and clock ticks; allow for float rounding only.
        if actual is None or abs(actual - start_time) > 0.05:
            return False
    return True


def _signal_name(code: int | None) -> str:
    if code is None or code >= 0:
        return ""
    with contextlib.suppress(ValueError):
        return f" ({signal.Signals(-code).name})"
    return ""


def describe_exit(code: int | None) -> str:
    """How a process ended, in words ("was killed by SIGKILL", "exited with code 1"); "" when unknown."""
    if code is None:
        return ""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _pidfd_exit_future(loop: asyncio.AbstractEventLoop, pidfd: int) -> asyncio.Future[None]:
    """A future resolved when the process behind `pidfd` exits (a pidfd polls readable at exit, child or not)."""
    fut: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        loop.remove_reader(pidfd)
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(pidfd, on_readable)
    return fut



async def terminate(
    name: str, pid: int, send: Callable[[int], None], exited: asyncio.Future[None], *,
    timeout: float, kill_timeout: float, logger: logging.Logger,
) -> None:
    """The one stop sequence: SIGTERM, wait `timeout`, SIGKILL, wait `kill_timeout`, else ChildUnkillable.

    `send(signum)` delivers a signal the pid-reuse-safe way the caller has (its own child's process group,
    or a pidfd); a process that is already gone counts as stopped.
    """
    if exited.done():
        return
    logger.info("%s: stopping pid %d (SIGTERM)", name, pid)
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(exited), timeout)
        return
    except asyncio.TimeoutError:
        logger.warning("%s: pid %d still running %gs after SIGTERM; sending SIGKILL", name, pid, timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(signal.SIGKILL)
    try:
        await asyncio.wait_for(asyncio.shield(exited), kill_timeout)
    except asyncio.TimeoutError:
        raise ChildUnkillable(f"{name}: pid {pid} survived SIGKILL for {kill_timeout:g}s") from None


def _kill_spawned(popen: subprocess.Popen[bytes]) -> None:
    """Undo a spawn nobody waits for any more: kill its process group (its own session) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=5.0)  # SIGKILLed: quick unless stuck in the kernel (run off the loop, run_blocking)
    if popen.stderr is not None:
        popen.stderr.close()


class SupervisedChild:
    """One long-running child program: argv list, own session, stderr logged, readiness probed, stopped in steps.

    The child is spawned with subprocess.Popen and watched through a pidfd, not with
    asyncio.create_subprocess_exec: asyncio's subprocess transport kills a still-running child when it is
    closed or garbage-collected (BaseSubprocessTransport.close), so a daemon that exits without stopping
    its exports would take them down. Here nothing but `stop()` signals the child; `release()` lets it go.
    The qemu programs ignore SIGPIPE, so a child released this way survives our end of its stderr pipe
    closing (its later messages are lost until a new daemon adopts it with `AdoptedChild`).
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        resource_id: str,
        logger: logging.Logger | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stderr_lines: int = 200,
        pass_fds: Sequence[int] = (),
    ) -> None:
        """`pass_fds`: descriptors the child inherits (e.g. images it is given as /proc/self/fd/N)."""
        if not argv:
            raise ValueError("empty argv")
        self._pass_fds = tuple(pass_fds)
        self.argv: tuple[str, ...] = tuple(os.fspath(a) for a in argv)
        self.resource_id = resource_id
        self._log = logger or log
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._stderr = StderrRing(stderr_lines)
        self._popen: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._exited: asyncio.Future[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pipe_transport: asyncio.BaseTransport | None = None
        self._start_time: float | None = None
        self._released = False
        self._stopping = False  # stop() asked it to end: an exit before that is news, whatever its code
        self._stop_lock = asyncio.Lock()

    # --- state -------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit code once reaped (negative: killed by that signal), else None."""
        return self._popen.returncode if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    @property
    def identity(self) -> ProcessIdentity:
        if self._popen is None:
            raise ProcessError(f"{self.resource_id}: not started")
        return ProcessIdentity(self._popen.pid, self.argv, self._start_time)

    def stderr_tail(self, lines: int = 10) -> str:
        return self._stderr.tail(lines)

    def stderr_lines(self) -> list[str]:
        return self._stderr.lines()

    # --- start and readiness -----------------------------------------------------------------------------

    async def start(self, probe: ReadyProbe | None = None, *, timeout: float = 10.0, interval: float = 0.05) -> Any:
        """Spawn the child and, with `probe`, wait until it passes while checking that it is still alive.

        Returns the probe's result. On ChildFailed (exec error or early exit) or ChildNotReady (deadline)
        nothing is left running: the child is stopped before the error is raised.
        """
        if self._popen is not None:
            raise ProcessError(f"{self.resource_id}: already started")
        loop = asyncio.get_running_loop()

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # own session and process group: no terminal signal or group kill reaches it
                close_fds=True,
                pass_fds=self._pass_fds,
                env=self._env,
                cwd=self._cwd,
            )

        try:
            # fork/exec waits for the exec to succeed; keep it off the loop. A child spawned for a caller
            # cancelled meanwhile is killed, not left running unsupervised.
            popen = await run_blocking(spawn, undo=_kill_spawned)
        except OSError as exc:
            raise ChildFailed(self.resource_id, self.argv[0], None, "", f"cannot be executed: {exc}") from exc
        assert popen.stderr is not None
        pidfd: int | None = None
        try:
            start_time = process_start_time(popen.pid)
            pidfd = os.pidfd_open(popen.pid)  # EMFILE/ENFILE here would leave the child unwatched
            exited = _pidfd_exit_future(loop, pidfd)
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
            _kill_spawned(popen)  # nothing watches it yet: kill and reap it before the error goes up
            raise
        self._popen, self._start_time, self._pidfd, self._exited = popen, start_time, pidfd, exited
        exited.add_done_callback(self._on_exit)
        reader = asyncio.StreamReader()
        try:
            self._pipe_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                                   popen.stderr)
        except BaseException:
            await self.stop(timeout=2.0)
            raise
        self._reader_task = asyncio.create_task(self._read_stderr(reader), name=f"stderr-{self.resource_id}")
        self._log.info("%s: started pid %d: %s", self.resource_id, popen.pid, " ".join(self.argv))
        if probe is None:
            return None
        try:
            return await self._wait_ready(probe, timeout, interval)
        except BaseException:
            await self.stop(timeout=2.0)
            raise

    async def _wait_ready(self, probe: ReadyProbe, timeout: float, interval: float) -> Any:
        assert self._exited is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_error = ""
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ChildNotReady(self.resource_id, timeout, last_error, self.stderr_tail())
            attempt = asyncio.ensure_future(asyncio.wait_for(probe(), remaining))
            await asyncio.wait({attempt, self._exited}, return_when=asyncio.FIRST_COMPLETED)
            if self._exited.done():
                attempt.cancel()
                with contextlib.suppress(BaseException):
                    await attempt
                await self._drain_stderr()
                assert self._popen is not None
                raise ChildFailed(self.resource_id, self.argv[0], self._popen.poll(), self.stderr_tail())
            try:
                result = attempt.result()
            except asyncio.TimeoutError:
                last_error = "readiness probe timed out"
                continue
            except Exception as exc:  # a probe that raises simply means "not yet"
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if result:
                    self._log.info("%s: ready (pid %d)", self.resource_id, self.pid)
                    return result
                last_error = "readiness probe not satisfied"
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), min(interval, max(deadline - loop.time(), 0)))

    # --- exit, stop, release -----------------------------------------------------------------------------

    def _on_exit(self, _fut: asyncio.Future[None]) -> None:
        assert self._popen is not None
        self._popen.poll()  # reap now: the pidfd said it exited, so this does not block
        self._close_pidfd()
        code = self._popen.returncode
        # Unasked, even code 0 is a warning: the qemu servers end with 0 on a SIGTERM from anyone.
        asked = self._stopping and code in (0, -signal.SIGTERM)
        self._log.log(logging.INFO if asked else logging.WARNING, "%s: pid %d exited with code %s%s%s",
                      self.resource_id, self._popen.pid, code, _signal_name(code), "" if self._stopping else
                      " without being asked to stop")

    async def _read_stderr(self, reader: asyncio.StreamReader) -> None:
        pending = b""
        try:
            while chunk := await reader.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._log_line(raw)
                if len(pending) > 65536:  # a runaway line without newline: log what we have
                    self._log_line(pending)
                    pending = b""
            if pending:
                self._log_line(pending)
        except (ConnectionError, OSError):
            pass

    def _log_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            line = self._stderr.append(line)
            self._log.info("%s: %s: %s", self.resource_id, os.path.basename(self.argv[0]), line)

    async def _drain_stderr(self) -> None:
        # After exit, read what is left in the pipe (bounded: a grandchild may keep it open).
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader_task), 1.0)

    async def wait(self) -> int | None:
        """Wait until the child exits; return its exit code."""
        if self._exited is None:
            raise ProcessError(f"{self.resource_id}: not started")
        await asyncio.shield(self._exited)
        await self._drain_stderr()
        assert self._popen is not None
        return self._popen.poll()

    async def stop(self, timeout: float = 10.0, kill_timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL the process group, wait, reap; return the exit code."""
        if self._popen is None or self._exited is None:
            return None
        if self._released:
            raise ProcessError(f"{self.resource_id}: released; adopt pid {self._popen.pid} to stop it")
        async with self._stop_lock:
            popen = self._popen
            self._stopping = True

            def send(signum: int) -> None:
                # Safe against pid reuse: the child is not reaped until its pidfd fires. SIGKILL goes to the
                # process group, so helpers it forked go too.
                if signum == signal.SIGKILL:
                    os.killpg(popen.pid, signum)
                else:
                    popen.send_signal(signum)

            await terminate(self.resource_id, popen.pid, send, self._exited, timeout=timeout,
                            kill_timeout=kill_timeout, logger=self._log)
            await self._drain_stderr()
            self._close_pipe()
            return self._popen.poll()

    def release(self) -> ProcessIdentity:
        """Stop supervising without signalling: the child keeps running (daemon shutdown or handover).

        Returns what to persist so that the next daemon can adopt it with `AdoptedChild.adopt`.
        """
        ident = self.identity
        self._released = True
        if self._exited is not None and not self._exited.done():
            self._exited.remove_done_callback(self._on_exit)
            if self._pidfd is not None:
                asyncio.get_running_loop().remove_reader(self._pidfd)
            self._exited.cancel()
        self._close_pidfd()
        self._close_pipe()
        # The Popen object may go: if the child exits while this process still runs, subprocess's own
        # bookkeeping (_active/_cleanup) reaps it, so no zombie is left on hosts whose init does not reap.
        self._log.info("%s: released pid %d (left running)", self.resource_id, ident.pid)
        return ident

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _close_pipe(self) -> None:
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
        if self._pipe_transport is not None:
            self._pipe_transport.close()
            self._pipe_transport = None


class AdoptedChild:
    """A process started by an earlier daemon instance: not our child, so watched and signalled via a pidfd.

    Only built by `adopt`, which checks /proc/<pid>/cmdline (and the start time) before anything can be
    signalled. The exit code of a process that is not our child cannot be known.
    """

    def __init__(
        self, pid: int, pidfd: int, resource_id: str, argv: list[str], start_time: float | None, logger: logging.Logger | None
    ) -> None:
        self.pid = pid
        self.resource_id = resource_id
        self.argv = tuple(argv)
        self.start_time = start_time
        self._pidfd: int | None = pidfd
        self._log = logger or log
        self._exited: asyncio.Future[None] | None = None
        self._stop_lock = asyncio.Lock()

    @classmethod
    def adopt(
        cls,
        pid: int,
        expected: Expectation,
        *,
        resource_id: str,
        start_time: float | None = None,
        logger: logging.Logger | None = None,
    ) -> AdoptedChild:
        """Take over `pid` if it is alive and matches `expected`; raise PidMismatch otherwise."""
        try:
            pidfd = os.pidfd_open(pid)
        except (OSError, ValueError) as exc:  # ESRCH: gone; EINVAL: not a valid pid
            raise PidMismatch(f"{resource_id}: pid {pid} is gone") from exc
        try:
            argv = read_cmdline(pid)
            if argv is None or not pid_matches(pid, expected, start_time=start_time):
                raise PidMismatch(f"{resource_id}: pid {pid} does not run the expected program (cmdline {argv!r})")
            # The cmdline we read belonged to the process behind our pidfd only if that one has not exited since.
            if _pidfd_exited(pidfd):
                raise PidMismatch(f"{resource_id}: pid {pid} exited while being adopted")
        except BaseException:
            os.close(pidfd)
            raise
        (logger or log).info("%s: adopted pid %d: %s", resource_id, pid, " ".join(argv))
        return cls(pid, pidfd, resource_id, argv, start_time or process_start_time(pid), logger)

    @classmethod
    def adopt_identity(cls, ident: ProcessIdentity, *, resource_id: str, logger: logging.Logger | None = None) -> AdoptedChild:
        return cls.adopt(ident.pid, ident.argv, resource_id=resource_id, start_time=ident.start_time, logger=logger)

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.argv, self.start_time)

    @property
    def running(self) -> bool:
        if self._pidfd is None:
            return False
        return not _pidfd_exited(self._pidfd)

    def _exit_future(self) -> asyncio.Future[None]:
        if self._exited is None:
            loop = asyncio.get_running_loop()
            if self._pidfd is None:
                self._exited = loop.create_future()
                self._exited.set_result(None)
            else:
                self._exited = _pidfd_exit_future(loop, self._pidfd)
        return self._exited

    async def wait(self) -> None:
        await asyncio.shield(self._exit_future())

    async def stop(self, timeout: float = 10.0, kill_timeout: float = 5.0) -> None:
        """SIGTERM through the pidfd, wait, SIGKILL, wait. A zombie left by a non-reaping init counts as gone."""
        async with self._stop_lock:
            if self._pidfd is None:
                return
            pidfd = self._pidfd
            await terminate(f"{self.resource_id} (adopted)", self.pid,
                            lambda signum: signal.pidfd_send_signal(pidfd, signum), self._exit_future(),
                            timeout=timeout, kill_timeout=kill_timeout, logger=self._log)
            self._log.info("%s: adopted pid %d exited (exit code unknown: not our child)", self.resource_id, self.pid)
            self.close()

    def close(self) -> None:
        """Forget the process without signalling it."""
        if self._exited is not None and not self._exited.done():
            self._exited.cancel()  # nobody may wait forever on a process we no longer watch
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
