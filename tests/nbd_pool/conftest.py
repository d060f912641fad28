"""Fixtures for nbd-pool's daemon tests: a free port range, the real daemon over its socket, images, and a
check that a test leaves no qemu process, loop device or mount behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from nbd_pool.adapters.orphans import list_orphans, release_orphans

from ..rig import Stack

MIB = 1024 * 1024
POOL_SIZE = 101  # as the product's 10100-10200


def free_range(size: int = POOL_SIZE, attempts: int = 200) -> range:
    """`size` consecutive ports nobody listens on now, away from the product's range (other sessions on this
    machine may run nbd-pool there) and from the kernel's ephemeral range."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 32000 - size)
        ports = range(base, base + size)
        if all(_bindable(p) for p in ports):
            return ports
    raise RuntimeError(f"no {size} consecutive free ports found")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def sh(*argv: str | Path, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """A setup or client command in a test (blocking is fine here)."""
    res = subprocess.run([str(a) for a in argv], input=input, capture_output=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed ({res.returncode}): {res.stderr.decode(errors='replace')}")
    return res


async def ash(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """`sh` off the event loop (the daemon under test is another process, but the test's own aiohttp
    client shares this loop)."""
    return await asyncio.to_thread(sh, *argv, check=check)


def make_source(path: Path, size: int = 64 * MIB, seed: int = 1) -> Path:
    """Half pseudo-random data, half zeros written as data (clients must detect them)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // 2 // MIB):
            f.write(rnd.randbytes(MIB))
        f.write(bytes(size // 2))
    return path


def sha256_of_image(image: Path, fmt: str, tmp: Path) -> str:
    """The guest-visible bytes of an image, hashed (converted to raw first)."""
    raw = tmp / f"{image.name}.check.raw"
    sh("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, raw)
    h = hashlib.sha256()
    with open(raw, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    raw.unlink()
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


class Agent:
    """nbd-pool's socket API, answering (status, json) without interpreting errors."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket_path)))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self._client().request(method, f"http://nbd-pool{path}", json=body,
                                          timeout=aiohttp.ClientTimeout(total=90)) as r:
            text = await r.text()
            return r.status, json.loads(text) if text else None

    async def get(self, path: str) -> tuple[int, Any]:
        return await self.request("GET", path)

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.request("POST", path, body)

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, out = await self.request(method, path, body)
        assert status in (200, 201), (method, path, status, out)
        return out


@dataclass
class Pool:
    """A running nbd-pool on its own port range, with a repository directory it may export from."""

    stack: Stack
    ports: range
    repo: Path
    agent: Agent
    extra: list[str] = field(default_factory=list)

    @property
    def work_root(self) -> Path:
        return self.stack.state / "nbd-pool" / "work"

    @property
    def daemon(self) -> Any:
        return self.stack.daemons["nbd-pool"]

    def start(self) -> None:
        self.stack.start("nbd-pool")

    def kill9(self) -> None:
        self.daemon.stop(sig=9)

    def stop(self) -> int:
        return int(self.daemon.stop())

    def image(self, name: str, size: str = "64M") -> Path:
        path = self.repo / name
        sh("qemu-img", "create", "-q", "-f", "qcow2", path, size)
        return path

    async def export(self, job_id: str, path: Path, name: str, *, read_only: bool = False, fmt: str | None = None,
                     port: int | None = None) -> dict[str, Any]:
        """Allocate a port for the job (unless given) and export `path` on it."""
        if port is None:
            alloc = await self.agent.ok("POST", "/ports/allocate", {"job_id": job_id, "count": 1, "export_names": [name]})
            port = alloc["allocated_ports"][0]["port"]
        body: dict[str, Any] = {"export_name": name, "port": port, "path": str(path), "read_only": read_only,
                                "job_id": job_id}
        if fmt:
            body["format"] = fmt
        return await self.agent.ok("POST", "/exports", body)  # type: ignore[no-any-return]

    async def clean_up(self) -> None:
        """Release every job and detach every attachment through the API, as omad and restore-mounter would."""
        status = await self.agent.ok("GET", "/ports/status")
        for job in sorted({a["job_id"] for a in status["allocations"]}):
            await self.agent.ok("POST", f"/jobs/{job}/release")
        for a in (await self.agent.ok("GET", "/attachments"))["attachments"]:
            await self.agent.ok("DELETE", f"/attachments/{a['attachment_id']}")


def url(port: int, name: str) -> str:
    return f"nbd://127.0.0.1:{port}/{name}"


def _leftovers(root: Path, ports: range) -> list[str]:
    async def scan() -> list[str]:
        found = await list_orphans(root, ports=ports)
        if not found:
            return []
        what = ([f"loop {x.device} ({x.back_file})" for x in found.loops]
                + [f"pid {p.pid}: {' '.join(p.argv)}" for p in found.processes]
                + [f"FUSE mount {m.mount_point}" for m in found.fuse_mounts])
        await release_orphans(found, stop_timeout=5)  # leave the machine clean for the next test either way
        return what

    return asyncio.run(scan())


def _mounts_under(root: Path) -> list[str]:
    real = str(root.resolve())
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4]
        if point == real or point.startswith(real + "/"):
            out.append(point)
    return out


@pytest.fixture
def no_leftovers(short_tmp: Path) -> Iterator[range]:
    """A free port range for the test; afterwards nothing may remain that references the test's directory
    or listens in that range: qemu-nbd, qemu-storage-daemon, loop devices, FUSE or other mounts."""
    ports = free_range()
    yield ports
    left = _leftovers(short_tmp, ports)
    mounts = _mounts_under(short_tmp)
    for m in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", m], capture_output=True)
    assert not left and not mounts, f"left behind: {left + mounts}"


def pool_config(ports: range, repo: Path, extra: str = "") -> str:
    return (f"port_min = {ports.start}\nport_max = {ports.stop - 1}\n"
            f'export_roots = ["{repo}"]\n' + extra)


@pytest_asyncio.fixture
async def make_pool(no_leftovers: range, stack_config: Stack) -> AsyncIterator[Any]:
    """Configure (extra TOML lines allowed) and start nbd-pool; releases everything through its API after the
    test, before the daemon stops (a stopping nbd-pool leaves its exports running on purpose)."""
    made: list[Pool] = []
    repo = stack_config.state / "repo"
    repo.mkdir(exist_ok=True)

    async def make(extra: str = "") -> Pool:
        stack_config.add_config("nbd-pool", "50-test.toml", pool_config(no_leftovers, repo, extra))
        pool = Pool(stack_config, no_leftovers, repo, Agent(stack_config.run_dir / "nbd-pool.sock"))
        await asyncio.to_thread(pool.start)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        try:
            if pool.daemon.running():
                await pool.clean_up()
        finally:
            await pool.agent.close()


@pytest_asyncio.fixture
async def pool(make_pool: Any) -> Pool:
    """nbd-pool with the default options on a free port range."""
    return await make_pool()  # type: ignore[no-any-return]
