"""`make run`'s launcher: the four daemons up and /health green within 30 s, Ctrl-C stops all of them."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil


def test_run_local_serves_health_and_stops_on_ctrl_c(short_tmp: Path) -> None:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "oma_common.devrun", "--state-dir", str(short_tmp), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.match(r"OMA API: (http://\S+)/api/v1", line)
            if m:
                url = m.group(1)
                break
        assert url, "the launcher never printed the API URL"
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            health = json.load(r)
        assert time.monotonic() - started < 30
        assert health["status"] == "healthy"
        children = psutil.Process(proc.pid).children()
        assert len(children) == 4
        assert (short_tmp / "admin-password").read_text().strip()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert out.index("omad: stopped (0)") < out.index("nbd-pool: stopped (0)")  # omad first
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
        assert not list((short_tmp / "run").glob("*.sock"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _launch(state: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "oma_common.devrun", "--state-dir", str(state), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        m = re.match(r"OMA API: (http://\S+)/api/v1", line)
        if m:
            return proc, m.group(1), seen
    raise AssertionError("the launcher never printed the API URL:\n" + "".join(seen))


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.load(r)


def _daemons(launcher_pid: int) -> dict[str, psutil.Process]:
    out = {}
    for c in psutil.Process(launcher_pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            argv = c.cmdline()
            if len(argv) > 2 and c.status() != psutil.STATUS_ZOMBIE:
                out[argv[2]] = c
    return out


def _wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        return _health(url)["status"] == "healthy"
    except OSError:
        return False


def test_a_crashed_daemon_is_restarted_alone(short_tmp: Path) -> None:
    proc, url, _ = _launch(short_tmp)
    try:
        before = _daemons(proc.pid)
        assert set(before) == {"omad", "nbd_pool", "restore_mounter", "volume_agent"}
        before["nbd_pool"].kill()
        def restarted() -> bool:
            now = _daemons(proc.pid).get("nbd_pool")
            return now is not None and now.pid != before["nbd_pool"].pid

        _wait_for(restarted)
        _wait_for(lambda: _healthy(url))
        after = _daemons(proc.pid)
        assert {n: p.pid for n, p in after.items() if n != "nbd_pool"} == \
               {n: p.pid for n, p in before.items() if n != "nbd_pool"}, "only the crashed daemon restarts"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_sighup_stops_every_daemon(short_tmp: Path) -> None:
    proc, _url, _ = _launch(short_tmp)
    children = list(_daemons(proc.pid).values())
    proc.send_signal(signal.SIGHUP)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    _wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 10)


def test_a_killed_launcher_leaves_nothing_and_the_next_one_starts(short_tmp: Path) -> None:
    proc, _url, _ = _launch(short_tmp)
    children = list(_daemons(proc.pid).values())
    proc.kill()  # as `kill -9` of the launcher's process group would
    proc.communicate(timeout=10)
    # The kernel sends each daemon SIGTERM (PR_SET_PDEATHSIG) and they drain.
    _wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 20)
    proc2, url2, _ = _launch(short_tmp)
    try:
        assert _health(url2)["status"] == "healthy"
    finally:
        proc2.send_signal(signal.SIGINT)
        proc2.communicate(timeout=30)


def test_daemons_left_by_an_earlier_launcher_are_replaced(short_tmp: Path) -> None:
    from oma_common.devrun import DaemonProcess, write_local_configs

    dirs = write_local_configs(short_tmp.resolve(), 0)
    orphan = DaemonProcess("nbd-pool", dirs["nbd-pool"])  # no parent-death signal: as an older launcher left it
    orphan.start()
    try:
        proc, url, seen = _launch(short_tmp)
        try:
            assert any(f"nbd_pool (pid {orphan.pid})" in line for line in seen), "".join(seen)
            assert orphan.proc is not None and orphan.proc.poll() is not None
            assert _health(url)["status"] == "healthy"
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
    finally:
        orphan.stop()


def test_readiness_is_the_main_process_speaking_on_a_socket_that_leaves_no_file(short_tmp: Path) -> None:
    """NOTIFY_SOCKET is an abstract address (nothing in /tmp to outlive a killed launcher), and a READY=1
    from any other process is ignored, as systemd's NotifyAccess=main does."""
    import socket

    from oma_common.devrun import DaemonProcess, write_local_configs

    d = DaemonProcess("nbd-pool", write_local_configs(short_tmp.resolve(), 0)["nbd-pool"])
    d.launch()
    try:
        address = psutil.Process(d.pid).environ()["NOTIFY_SOCKET"]
        assert address.startswith("@"), address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as spoof:
            spoof.sendto(b"READY=1\nSTATUS=spoofed", "\0" + address[1:])
        d.wait_ready()
        assert d.status != "spoofed" and d.running()
        # The daemon really is ready: its API socket answers.
        assert list((short_tmp / "run").glob("*.sock"))
    finally:
        d.stop()
