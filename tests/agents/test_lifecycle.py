"""Every agent: binds its socket 0660, answers /health, refuses a second instance, replaces a stale
socket, checks each caller's uid, and exits 0 on SIGTERM with its socket removed."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oma_common.devrun import AGENTS, MODULES, DaemonProcess

from ..rig import Stack


def unix_get(path: Path, url: str = "/health") -> tuple[int, dict]:
    """A raw HTTP/1.0 GET over the unix socket, so the test does not share the daemons' client code."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(f"GET {url} HTTP/1.0\r\nHost: agent\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("name", AGENTS)
def test_agent_serves_health_and_stops_cleanly(stack_config: Stack, name: str) -> None:
    stack_config.start(name)
    sock = stack_config.run_dir / f"{name}.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    status, body = unix_get(sock)
    assert status == 200 and body["daemon"] == name and body["status"] == "ok"
    started = time.monotonic()
    assert stack_config.daemons[name].stop(timeout=5) == 0
    assert time.monotonic() - started < 5
    assert not sock.exists()


@pytest.mark.parametrize("name", AGENTS)
def test_second_instance_refuses_a_live_socket(stack_config: Stack, name: str) -> None:
    stack_config.start(name)
    second = subprocess.run([sys.executable, "-m", MODULES[name], "--config", str(stack_config.config_dirs[name])],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert "another instance" in second.stderr
    assert unix_get(stack_config.run_dir / f"{name}.sock")[0] == 200  # the first one is untouched


def test_stale_socket_from_a_crash_is_replaced(stack_config: Stack) -> None:
    stack_config.run_dir.mkdir(parents=True, exist_ok=True)
    path = stack_config.run_dir / "nbd-pool.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening, then abandoned: what a kill -9 leaves
    stale.close()
    assert path.exists()
    stack_config.start("nbd-pool")
    assert unix_get(path)[0] == 200


def test_kill_9_then_restart_works(stack_config: Stack) -> None:
    stack_config.start("volume-agent")
    d = stack_config.daemons["volume-agent"]
    d.stop(sig=9)
    assert (stack_config.run_dir / "volume-agent.sock").exists()
    stack_config.start("volume-agent")
    assert unix_get(stack_config.run_dir / "volume-agent.sock")[0] == 200


@pytest.mark.parametrize("name", AGENTS)
def test_caller_uid_not_permitted_is_refused(stack_config: Stack, name: str) -> None:
    other = 4242 if os.getuid() != 4242 else 4243
    stack_config.add_config(name, "50-only-other.toml", f"[socket]\nallowed_users = [{other}]\n")
    stack_config.start(name)
    status, body = unix_get(stack_config.run_dir / f"{name}.sock")
    assert status == 403
    assert body["code"] == "forbidden" and f"uid {os.getuid()}" in body["details"]


@pytest.mark.root
def test_permitted_user_by_name_other_uid_refused(stack_config: Stack) -> None:
    """As root: `nobody` may connect (the socket is opened to it) but is not on the list → 403."""
    stack_config.add_config("nbd-pool", "50-mode.toml", "[socket]\nmode = 0o666\nallowed_users = [\"root\"]\n")
    stack_config.start("nbd-pool")
    sock = stack_config.run_dir / "nbd-pool.sock"
    os.chmod(stack_config.state, 0o755)
    os.chmod(stack_config.run_dir, 0o755)
    code = ("import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
            "s.sendall(b'GET /health HTTP/1.0\\r\\n\\r\\n');print(s.recv(100).split()[1].decode())")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code,
                          str(sock)], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "403", out.stderr
    assert unix_get(sock)[0] == 200  # root is on the list


# Three requests on one kept-alive connection; prints each answer's status.
KEPT_ALIVE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rb")
for _ in range(3):
    s.sendall(b"GET /health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    status = f.readline().split()[1].decode()
    length = 0
    while (line := f.readline().strip()):
        name, _, value = line.partition(b":")
        length = int(value) if name.lower() == b"content-length" else length
    f.read(length)
    print(status, flush=True)
"""


@pytest.mark.root
def test_every_request_of_a_kept_alive_connection_is_checked(stack_config: Stack) -> None:
    """Connections stay open across calls (AgentClient keeps them alive): a refused peer is refused on each
    request of its connection, not only the first, and a permitted one is answered on each."""
    stack_config.add_config("nbd-pool", "50-mode.toml", "[socket]\nmode = 0o666\nallowed_users = [\"root\"]\n")
    stack_config.start("nbd-pool")
    sock = str(stack_config.run_dir / "nbd-pool.sock")
    os.chmod(stack_config.state, 0o755)
    os.chmod(stack_config.run_dir, 0o755)
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                             KEPT_ALIVE, sock], capture_output=True, text=True, timeout=30)
    assert nobody.stdout.split() == ["403"] * 3, nobody.stderr
    root = subprocess.run([sys.executable, "-c", KEPT_ALIVE, sock], capture_output=True, text=True, timeout=30)
    assert root.stdout.split() == ["200"] * 3, root.stderr


def test_daemon_process_reports_exit_before_ready(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("port_min = 0\n")  # violates min=1
    d = DaemonProcess("nbd-pool", tmp_path)
    with pytest.raises(Exception, match="exited with 1"):
        d.start(timeout=20)
