"""The test rig: the real daemons as processes in a temporary directory, and an HTTP client for omad."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from oma_common.devrun import AGENTS, DaemonProcess, write_local_configs

ROOT = Path(__file__).resolve().parent.parent
#: A whole stack stops as systemd stops the units: omad first, then the agents side by side, except that
#: restore-mounter (After=nbd-pool.service) is stopped before nbd-pool.
STOP_PHASES = (("omad",), ("restore-mounter", "volume-agent"), ("nbd-pool",))
assert sorted(n for phase in STOP_PHASES for n in phase) == sorted(("omad", *AGENTS))

# NBD port ranges for the test stacks. Several test runs share this machine, and an nbd-pool starting up stops
# every qemu-nbd listening in its range that it does not know (reconcile.py: a crash's orphans): two stacks
# with overlapping ranges kill each other's exports. So each test process claims a block of its own (an
# flock'ed file, released when the process ends) and hands out ranges from it in turn; the blocks lie below
# the kernel's ephemeral ports and away from the product's 10100-10200.
PORT_BLOCKS = range(20480, 32768, 512)
PORT_LOCKS = Path("/tmp/oma-test-port-blocks")
_port_block: tuple[range, int] | None = None  # this process's block, and where its next range starts
_port_lock_fd: int | None = None


def _claim_port_block() -> range | None:
    global _port_lock_fd
    PORT_LOCKS.mkdir(mode=0o777, exist_ok=True)
    for base in random.sample(list(PORT_BLOCKS), len(PORT_BLOCKS)):
        fd = os.open(PORT_LOCKS / f"{base}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _port_lock_fd = fd  # held (open) until the process ends
        return range(base, base + PORT_BLOCKS.step)
    return None


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nbd-pool probes (TIME_WAIT is free)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_range(size: int) -> range:
    """`size` consecutive ports nobody listens on, from this test process's own block (see PORT_BLOCKS): no
    other test process on the machine hands them out. Successive calls take successive ranges of the block,
    so stacks of one process running at the same time do not share ports either."""
    global _port_block
    if _port_block is None:
        block = _claim_port_block()
        if block is None:
            raise RuntimeError(f"every NBD port block under {PORT_LOCKS} is claimed by another test process")
        _port_block = (block, block.start)
    block, start = _port_block
    if size > len(block):
        raise ValueError(f"at most {len(block)} ports per range")
    for _ in range(len(block)):
        if start + size > block.stop:
            start = block.start
        ports = range(start, start + size)
        start += size
        if all(_bindable(p) for p in ports):
            _port_block = (block, start)
            return ports
    raise RuntimeError(f"no {size} consecutive free ports in {block.start}-{block.stop - 1}")


@dataclass
class Stack:
    """The four daemons started from drop-ins under `state` (omad on a free port)."""

    state: Path
    daemons: dict[str, DaemonProcess] = field(default_factory=dict)
    url: str = ""

    @property
    def config_dirs(self) -> dict[str, Path]:
        return {name: self.state / "config" / f"{name}.d" for name in ("omad", *AGENTS)}

    @property
    def run_dir(self) -> Path:
        return self.state / "run"

    @property
    def admin_password(self) -> str:
        return (self.state / "admin-password").read_text().strip()

    @property
    def database(self) -> Path:
        return self.state / "oma.db"

    def add_config(self, daemon: str, name: str, text: str) -> None:
        (self.config_dirs[daemon] / name).write_text(text)

    def start(self, *names: str, timeout: float = 30.0) -> None:
        logs = self.state / "logs"
        logs.mkdir(exist_ok=True)
        names = names or (*AGENTS, "omad")
        # The agents start side by side; omad last, as systemd orders them.
        batches = [[n for n in names if n != "omad"], [n for n in names if n == "omad"]]
        for batch in batches:
            launched = []
            for name in batch:
                d = DaemonProcess(name, self.config_dirs[name], log_path=logs / f"{name}.log")
                d.launch()
                self.daemons[name] = launched.append(d) or d
            for d in launched:
                d.wait_ready(timeout)
                if d.name == "omad":
                    self.url = d.status.removeprefix("listening on ").strip()

    def stop(self, *names: str) -> dict[str, int]:
        """Stop the daemons named, one after the other in that order; with no names, the whole stack in
        STOP_PHASES (the daemons of a phase at once)."""
        codes = {}
        for phase in [(name,) for name in names] or STOP_PHASES:
            running = [d for d in map(self.daemons.get, phase) if d is not None and d.proc is not None]
            if len(running) == 1:
                codes[running[0].name] = running[0].stop()
            elif running:
                with ThreadPoolExecutor(len(running)) as pool:
                    codes.update(zip((d.name for d in running), pool.map(DaemonProcess.stop, running)))
        return codes

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read or poke omad's database directly (WAL allows it while omad runs)."""
        with contextlib.closing(sqlite3.connect(self.database, timeout=5)) as conn:
            rows = conn.execute(query, params).fetchall()
            conn.commit()
            return rows

    def omactl(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "omad.ctl", "--config", str(self.config_dirs["omad"]), *args],
                              input=stdin, capture_output=True, text=True, timeout=60)


def make_stack(tmp: Path, port: int = 0) -> Stack:
    write_local_configs(tmp, port)
    stack = Stack(tmp)
    # The VMA simulator runs inside the test process, so the test's own user stands in for the tunnel user whose
    # loopback sockets may call the machine routes without a token (tests/omad/test_vma_tunnel.py puts the real
    # vma_tunnel back and goes through sshd).
    stack.add_config("omad", "20-tunnel-user.toml",
                     f'[enrollment]\ntunnel_user = "{pwd.getpwuid(os.getuid()).pw_name}"\n')
    # Not the product's 10100-10200, which every stack would share (tests needing more ports add a later drop-in).
    ports = free_range(24)
    stack.add_config("nbd-pool", "15-ports.toml", f"port_min = {ports.start}\nport_max = {ports.stop - 1}\n")
    return stack


@contextlib.contextmanager
def running_stack(tmp: Path, *names: str) -> Iterator[Stack]:
    stack = make_stack(tmp)
    try:
        stack.start(*names)
        yield stack
    finally:
        stack.stop()


class Api:
    """A small aiohttp client for omad's /api/v1 that returns (status, json)."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.session = aiohttp.ClientSession()

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(self, token: str | None) -> dict[str, str]:
        t = self.token if token is None else token
        return {"Authorization": f"Bearer {t}"} if t else {}

    async def request(self, method: str, path: str, *, json_body: Any = None, data: bytes | str | None = None,
                      params: dict[str, Any] | None = None, token: str | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, Any]:
        url = path if path.startswith("http") else f"{self.base}{path if path.startswith('/health') else '/api/v1' + path}"
        h = {**self._headers(token), **(headers or {})}
        async with self.session.request(method, url, json=json_body, data=data, params=params, headers=h) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text) if text else None
            except ValueError:
                return r.status, text

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return await self.request("POST", path, json_body=body, **kw)

    async def put(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return await self.request("PUT", path, json_body=body, **kw)

    async def delete(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.request("DELETE", path, **kw)

    async def login(self, username: str, password: str) -> str:
        status, body = await self.post("/auth/login", {"username": username, "password": password})
        assert status == 200, body
        self.token = body["session_token"]
        return self.token


def tool_missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def is_root() -> bool:
    return os.geteuid() == 0
