"""The socket-activation launcher: the listener at fd 3 with LISTEN_FDS/LISTEN_PID, run isolated and cheap."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_pool.adapters import listen_fd

pytestmark = [pytest.mark.timeout(30)]

# The program the launcher execs: reports what socket activation handed it, as qemu-nbd would see it.
REPORT = """
import json, os, socket
s = socket.socket(fileno=3)
print(json.dumps({"pid": os.getpid(), "listen_pid": os.environ.get("LISTEN_PID"),
                  "listen_fds": os.environ.get("LISTEN_FDS"), "names": os.environ.get("LISTEN_FDNAMES"),
                  "sockname": list(s.getsockname()[:2]),
                  "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
                  "nodelay": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)}))
s.detach()
"""


def poisoned_path(tmp_path: Path) -> Path:
    """A directory whose nbd_pool and oma_common fail to import: on sys.path, any such import fails."""
    for pkg in ("nbd_pool", "oma_common"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f"raise ImportError('the launcher imported {pkg}')\n")
    (tmp_path / "sitecustomize.py").write_text("raise ImportError('the launcher ran site')\n")
    return tmp_path


def launch(fd: int, program: list[str], *, env: dict[str, str] | None = None,
           pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(listen_fd.launcher_argv(fd, program), capture_output=True, text=True, timeout=20,
                          env=env, pass_fds=pass_fds or (fd,), check=False)


def test_the_launcher_imports_only_os_and_sys() -> None:
    """Every import in the launcher is paid on every export start: it must stay at os and sys."""
    tree = ast.parse(Path(listen_fd.LAUNCHER).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported == {"os", "sys"}


def test_the_launcher_runs_isolated_and_hands_over_the_listener(tmp_path: Path, free_port: int) -> None:
    argv = listen_fd.launcher_argv(7, ["prog"])
    assert argv[:4] == [sys.executable, "-I", "-S", listen_fd.LAUNCHER] and os.path.isabs(argv[3])
    # PYTHONPATH and the like lead to packages that fail on import: the launcher reads neither.
    env = {**os.environ, "PYTHONPATH": str(poisoned_path(tmp_path)), "LISTEN_FDNAMES": "stale",
           "PYTHONSTARTUP": str(tmp_path / "sitecustomize.py")}
    with listen_fd.listen("127.0.0.1", free_port) as sock:
        res = launch(sock.fileno(), [sys.executable, "-I", "-c", REPORT], env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["listen_pid"] == str(got["pid"]) and got["listen_fds"] == "1" and got["names"] is None
    assert got["sockname"] == ["127.0.0.1", free_port] and got["listening"] == 1 and got["nodelay"] == 1


def test_a_listener_already_at_fd_3_stays_there(free_port: int) -> None:
    with fd_at_3(listen_fd.listen("127.0.0.1", free_port).detach()):
        res = launch(3, [sys.executable, "-I", "-c", REPORT])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["sockname"] == ["127.0.0.1", free_port]


def test_refuses_when_fd_3_is_passed_to_the_program_too(free_port: int) -> None:
    r, w = os.pipe()
    try:
        with fd_at_3(r), listen_fd.listen("127.0.0.1", free_port) as sock:
            res = launch(sock.fileno(), ["/bin/true"], pass_fds=(sock.fileno(), 3))
    finally:
        os.close(w)
    assert res.returncode == 2 and "fd 3 is passed to the program too" in res.stderr


def test_a_program_that_cannot_run_is_reported(free_port: int) -> None:
    with listen_fd.listen("127.0.0.1", free_port) as sock:
        res = launch(sock.fileno(), ["/nonexistent/qemu-nbd"])
    assert res.returncode == 127 and "cannot execute /nonexistent/qemu-nbd" in res.stderr


def test_bad_arguments_are_refused() -> None:
    res = subprocess.run([sys.executable, "-I", "-S", listen_fd.LAUNCHER, "x", "--", "/bin/true"],
                         capture_output=True, text=True, timeout=20, check=False)
    assert res.returncode == 2 and "usage" in res.stderr


@contextlib.contextmanager
def fd_at_3(fd: int) -> Iterator[None]:
    """`fd` moved to descriptor 3 of this process for the block (whatever held 3 is put back after)."""
    saved: tuple[int, bool] | None = None
    if fd != 3:
        with contextlib.suppress(OSError):
            saved = (os.dup(3), os.get_inheritable(3))
        os.dup2(fd, 3, inheritable=False)
        os.close(fd)
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved[0], 3, inheritable=saved[1])
            os.close(saved[0])
        else:
            os.close(3)
