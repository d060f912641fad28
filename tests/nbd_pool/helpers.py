"""Helpers for the tests of nbd-pool (and of omad's /nbd API): free port ranges, the daemon's socket API,
NBD clients, images, and the scan for leftovers."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from nbd_pool.adapters.orphans import list_orphans, release_orphans
from oma_common.statefile import write_atomically

from ..lib.filetree import path_sha256
from .. import rig
from ..rig import Stack

MIB = 1024 * 1024
POOL_SIZE = 101  # as the product's 10100-10200


def free_range(size: int = POOL_SIZE) -> range:
    """`size` consecutive ports nobody listens on, this test process's own (tests/rig.py)."""
    return rig.free_range(size)


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
    digest = path_sha256(raw)
    raw.unlink()
    return digest


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


def leftovers(root: Path, ports: range) -> list[str]:
    """Everything that references `root` or listens in `ports`: qemu-nbd and qemu-storage-daemon processes,
    loop devices, FUSE and other mounts. Whatever is found is removed too, so that one failed test does not
    fail the next ones."""

    async def scan() -> list[str]:
        found = await list_orphans(root, ports=ports)
        if not found:
            return []
        what = ([f"loop {x.device} ({x.back_file})" for x in found.loops]
                + [f"pid {p.pid}: {' '.join(p.argv)}" for p in found.processes]
                + [f"FUSE mount {m.mount_point}" for m in found.fuse_mounts])
        await release_orphans(found, stop_timeout=5)
        return what

    left = asyncio.run(scan())
    real = str(root.resolve())
    mounts = [line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    mounts = [m for m in mounts if m == real or m.startswith(real + "/")]
    for m in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", m], capture_output=True)
    return left + [f"mount {m}" for m in mounts]


def pool_config(ports: range, repo: Path, extra: str = "") -> str:
    return (f"port_min = {ports.start}\nport_max = {ports.stop - 1}\n"
            f'export_roots = ["{repo}"]\n' + extra)


def vouch(registry: Path, *devices: tuple[str, Path]) -> None:
    """Write volume-agent's registry as it does: these (device, link) pairs attached here for CloudStack volumes."""
    items = []
    for i, (device, link) in enumerate(devices):
        rdev = os.stat(device).st_rdev
        items.append({"volume_id": f"00000000-0000-0000-0000-{i:012d}", "serial": f"{i:020d}",
                      "link_path": str(link), "device_path": device,
                      "rdev": f"{os.major(rdev)}:{os.minor(rdev)}"})
    registry.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_atomically(registry, json.dumps({"kind": "vouched-devices", "version": 1, "items": items}))
