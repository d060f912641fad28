"""`make run`'s launcher: the four daemons up and /health green within 30 s, Ctrl-C stops all of them."""

from __future__ import annotations

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
