"""Tests for oma_common.process with real (small python) child processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from oma_common.process import (
    AdoptedChild,
    ChildFailed,
    ChildNotReady,
    PidMismatch,
    ProcessIdentity,
    StderrRing,
    SupervisedChild,
    pid_matches,
    read_cmdline,
)
from oma_common.command import CommandFailed, run

from ..lib.gate import Gate, cancel_inside, children, open_fds

pytestmark = [pytest.mark.timeout(30)]

PY = sys.executable

# A child that announces itself on stderr, creates a ready file, ignores SIGTERM and sleeps.
STUBBORN = """
import signal, sys, time, pathlib
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("stubborn up", file=sys.stderr, flush=True)
pathlib.Path(sys.argv[1]).touch()
time.sleep(60)
"""

SLEEPER = "import sys, time; print('sleeping', file=sys.stderr, flush=True); time.sleep(60)"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def file_probe(path: Path):
    async def probe() -> bool:
        return path.exists()

    return probe


@pytest.mark.asyncio
async def test_start_waits_for_probe_and_stop_terminates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="oma.process")
    ready = tmp_path / "ready"
    code = f"import sys, time, pathlib; print('hello', file=sys.stderr, flush=True); time.sleep(0.2); pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    child = SupervisedChild([PY, "-c", code], resource_id="export-7")
    assert await child.start(file_probe(ready), timeout=10) is True
    assert child.running and child.pid is not None
    assert os.getsid(child.pid) == child.pid  # own session, so it survives the daemon's process group
    assert child.identity.argv[0] == PY and child.identity.start_time
    code_ = await child.stop(timeout=5)
    assert code_ == -signal.SIGTERM
    assert not child.running and not _alive(child.pid)
    assert "hello" in child.stderr_tail()
    messages = [r.getMessage() for r in caplog.records]
    assert any("export-7" in m and "hello" in m for m in messages)
    assert any("export-7" in m and "exited with code -15" in m for m in messages)


@pytest.mark.asyncio
async def test_child_dying_before_ready_raises_with_code_and_stderr() -> None:
    code = "import sys; print('cannot open image: no such file', file=sys.stderr); sys.exit(3)"
    child = SupervisedChild([PY, "-c", code], resource_id="export-1")

    async def never() -> bool:
        return False

    with pytest.raises(ChildFailed) as info:
        await child.start(never, timeout=10)
    assert info.value.returncode == 3
    assert "cannot open image" in str(info.value) and "code 3" in str(info.value)


@pytest.mark.asyncio
async def test_missing_program_is_child_failed(tmp_path: Path) -> None:
    child = SupervisedChild([str(tmp_path / "no-such-program")], resource_id="x")
    with pytest.raises(ChildFailed, match="cannot be executed"):
        await child.start()


@pytest.mark.asyncio
async def test_not_ready_in_time_stops_the_child() -> None:
    child = SupervisedChild([PY, "-c", SLEEPER], resource_id="slow")
    attempts = 0

    async def failing() -> bool:
        nonlocal attempts
        attempts += 1
        raise ConnectionRefusedError("port closed")

    started = time.monotonic()
    with pytest.raises(ChildNotReady, match="port closed"):
        await child.start(failing, timeout=0.5, interval=0.05)
    assert time.monotonic() - started < 5
    assert attempts > 2
    assert child.pid is not None and not _alive(child.pid)


@pytest.mark.asyncio
async def test_stop_escalates_to_sigkill(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="oma.process")
    ready = tmp_path / "ready"
    child = SupervisedChild([PY, "-c", STUBBORN, str(ready)], resource_id="stubborn")
    await child.start(file_probe(ready), timeout=10)
    started = time.monotonic()
    assert await child.stop(timeout=0.3, kill_timeout=5) == -signal.SIGKILL
    assert time.monotonic() - started < 3
    assert child.pid is not None and not _alive(child.pid)
    assert any("SIGKILL" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_release_leaves_child_running_and_adoption_stops_it(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = SupervisedChild([PY, "-c", STUBBORN, str(ready)], resource_id="survivor")
    await child.start(file_probe(ready), timeout=10)
    ident = ProcessIdentity.from_dict(child.release().to_dict())  # round-trip as a daemon would persist it
    assert _alive(ident.pid)
    adopted = AdoptedChild.adopt_identity(ident, resource_id="survivor")
    assert adopted.running
    await adopted.stop(timeout=0.3, kill_timeout=5)  # ignores SIGTERM: escalates via pidfd
    assert not adopted.running
    assert not _alive(ident.pid)


@pytest.mark.asyncio
async def test_adoption_refuses_a_pid_whose_cmdline_differs() -> None:
    other = SupervisedChild([PY, "-c", SLEEPER], resource_id="other")
    await other.start()
    try:
        assert other.pid is not None
        # Right after exec the kernel may still show an empty cmdline for a moment.
        deadline = time.monotonic() + 5
        while not read_cmdline(other.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert pid_matches(other.pid, [PY, "-c", SLEEPER])
        assert not pid_matches(other.pid, ["qemu-nbd", "-t"])
        assert not pid_matches(other.pid, lambda argv: "qemu-nbd" in argv[0])
        assert not pid_matches(other.pid, [PY, "-c", SLEEPER], start_time=1.0)  # a recycled pid
        with pytest.raises(PidMismatch):
            AdoptedChild.adopt(other.pid, ["qemu-nbd", "-t"], resource_id="export-9")
        assert _alive(other.pid)  # refused adoption signals nothing
    finally:
        await other.stop()
    with pytest.raises(PidMismatch):
        AdoptedChild.adopt(other.pid, [PY], resource_id="gone")
    assert read_cmdline(other.pid) is None


def test_stderr_ring_is_bounded() -> None:
    ring = StderrRing(max_lines=3, max_line_chars=5)
    for i in range(10):
        ring.append(f"line{i}-long")
    assert len(ring.lines()) == 3
    assert ring.lines()[-1] == "line9…"


@pytest.mark.asyncio
async def test_run_reports_output_failure_and_timeout() -> None:
    ok = await run([PY, "-c", "print('out')"])
    assert ok.returncode == 0 and ok.text.strip() == "out"
    with pytest.raises(CommandFailed) as info:
        await run([PY, "-c", "import sys; sys.stderr.write('bad thing'); sys.exit(2)"])
    assert info.value.returncode == 2 and "bad thing" in str(info.value)
    assert (await run([PY, "-c", "import sys; sys.exit(4)"], check=False)).returncode == 4
    with pytest.raises(CommandFailed, match="timed out"):
        await run([PY, "-c", "import time; time.sleep(30)"], timeout=0.3)
    with pytest.raises(CommandFailed, match="cannot be executed"):
        await run(["/nonexistent/program"])


@pytest.mark.asyncio
async def test_run_says_why_from_stdout_when_stderr_is_empty() -> None:
    with pytest.raises(CommandFailed) as info:
        await run([PY, "-c", "import sys; print('said on stdout'); sys.exit(1)"])
    assert info.value.stderr == "said on stdout"


DAEMONISE = """
import os, sys, time
pid = os.fork()
if pid == 0:
    time.sleep(30)  # the daemon keeps stdout and stderr open
    os._exit(0)
print(pid)
sys.stderr.write("forked")
"""


@pytest.mark.asyncio
async def test_run_detaching_returns_when_the_program_does_not_its_daemon() -> None:
    res = await run([PY, "-c", DAEMONISE], timeout=10, detaching=True)
    daemon = int(res.text)
    try:
        assert res.seconds < 10 and res.error_text == "forked" and psutil.pid_exists(daemon)
    finally:
        os.kill(daemon, signal.SIGKILL)


@pytest.mark.asyncio
async def test_event_loop_stays_responsive_during_start_and_stop(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = SupervisedChild([PY, "-c", STUBBORN, str(ready)], resource_id="ticks")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        await child.start(file_probe(ready), timeout=10)
        await child.stop(timeout=0.3)
    finally:
        task.cancel()
    assert ticks > 10


@pytest.mark.asyncio
async def test_an_exit_nobody_asked_for_is_a_warning_even_with_code_0(caplog: pytest.LogCaptureFixture) -> None:
    """qemu-nbd ends with 0 on a SIGTERM from anyone: that it ended unasked is what the log must say."""
    caplog.set_level(logging.INFO, logger="oma.process")
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); time.sleep(60)"
    child = SupervisedChild([PY, "-c", code], resource_id="export-8")
    await child.start()
    await asyncio.sleep(0.3)  # its handler is installed
    assert child.pid is not None
    os.kill(child.pid, signal.SIGTERM)  # someone else
    assert await child.wait() == 0
    record = next(r for r in caplog.records if "export-8" in r.getMessage() and "exited" in r.getMessage())
    assert record.levelno == logging.WARNING and "without being asked to stop" in record.getMessage()


@pytest.mark.asyncio
async def test_a_child_spawned_for_a_cancelled_start_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    before, kids = open_fds(), children()
    gate = Gate(subprocess.Popen)
    monkeypatch.setattr(subprocess, "Popen", gate)  # fork/exec held in its thread until released
    child = SupervisedChild([PY, "-c", SLEEPER], resource_id="export-9")
    task = asyncio.create_task(child.start(timeout=10))
    await cancel_inside(gate, task)
    assert children() <= kids and open_fds() == before


@pytest.mark.asyncio
@pytest.mark.parametrize("failing", ["process_start_time", "pidfd_open"])
async def test_a_failure_right_after_the_spawn_kills_the_child(monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    import oma_common.process as process

    def broken(_pid: int) -> object:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(process if failing == "process_start_time" else process.os, failing, broken)
    before, kids = open_fds(), children()
    child = SupervisedChild([PY, "-c", SLEEPER], resource_id="export-10")
    with pytest.raises(OSError, match="Too many open files"):
        await child.start(timeout=10)
    assert children() <= kids and open_fds() == before
    assert child.pid is None and not child.running
