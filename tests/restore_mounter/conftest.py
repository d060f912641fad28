"""The real restore-mounter over its real socket, attaching through a real nbd-pool (fuse-loop here, kernel-nbd
on the appliance), as the appliance does. The tests build raw images; the agent is handed QCOW2 copies of
them, as backups are."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psutil
import pytest

from ..lib.diskimages import MiB, run, to_qcow2
from ..lib.filetree import Tree, materialize
from ..rig import Stack, make_stack

DAEMON = "restore-mounter"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60) -> None:
        super().__init__("restore-mounter", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Handover:
    """An answer of GET /mounts/{id}/open: the descriptor it carried (None for an error) and the connection
    that holds the mount. Set `fd` to None after closing it yourself."""

    reply: Reply
    fd: int | None
    conn: socket.socket


@dataclass
class Agent:
    """A small synchronous HTTP client for the agent's socket (its own code, not the daemons' client)."""

    socket_path: Path
    stack: Stack
    images: dict[Path, Path] = field(default_factory=dict)  # raw image → its QCOW2 copy

    def image(self, raw: Path) -> Path:
        """The QCOW2 copy of a raw image the test built (what a backup is), made once."""
        if raw.suffix == ".qcow2":
            return raw
        if raw not in self.images:
            self.images[raw] = to_qcow2(raw, raw.with_suffix(".qcow2"))
        return self.images[raw]

    def open(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:
        conn = UnixHTTPConnection(str(self.socket_path))
        url = path + ("?" + urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, url, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        return conn, conn.getresponse()

    def request(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None,
                headers: dict[str, str] | None = None) -> Reply:
        conn, resp = self.open(method, path, params, body, headers)
        try:
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def raw_get(self, target: str) -> Reply:
        """GET with the request target exactly as given (no encoding by the client)."""
        conn = UnixHTTPConnection(str(self.socket_path))
        try:
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.endheaders()
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def mount(self, image: Path, mount_id: str | None = None, expect: int = 201) -> dict[str, Any]:
        body: dict[str, Any] = {"image": str(self.image(image))}
        if mount_id:
            body["mount_id"] = mount_id
        r = self.request("POST", "/mounts", body=body)
        assert r.status == expect, r.body
        return r.json  # type: ignore[no-any-return]

    def unmount(self, mount_id: str, force: bool = False) -> Reply:
        return self.request("DELETE", f"/mounts/{mount_id}", {"force": "true"} if force else None)

    def files(self, mount_id: str, path: str = "/", **params: Any) -> dict[str, Any]:
        r = self.request("GET", f"/mounts/{mount_id}/files", {"path": path, **params})
        assert r.status == 200, r.body
        return r.json  # type: ignore[no-any-return]

    def all_files(self, mount_id: str, path: str = "/") -> dict[str, dict[str, Any]]:
        listing = self.files(mount_id, path, recursive="true", limit=10000)
        assert not listing["truncated"]
        return {e["path"]: e for e in listing["files"]}

    def download(self, mount_id: str, path: str) -> Reply:
        """A file's bytes as omad gets them: read from the descriptor GET /mounts/{id}/open hands over. An
        answer without a descriptor (an error) comes back as it is."""
        return self.fetch(f"/mounts/{quote(mount_id, safe='')}/open?" + urlencode({"path": path}))

    def fetch(self, target: str) -> Reply:
        """GET an /open request target exactly as given; the body is the handed-over file's bytes."""
        with self.handover(target) as h:
            if h.fd is None:
                return h.reply
            data = bytearray()
            while chunk := os.pread(h.fd, 4 * MiB, len(data)):
                data += chunk
            return Reply(h.reply.status, h.reply.headers, bytes(data))

    @contextlib.contextmanager
    def handover(self, target: str) -> Iterator[Handover]:
        """GET `target` (an /open request) and receive the descriptor riding on the answer (SCM_RIGHTS); the
        connection, which is the mount's hold, stays open until the block ends, then both are closed."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        h: Handover | None = None
        try:
            sock.settimeout(60)
            sock.connect(str(self.socket_path))
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: restore-mounter\r\n\r\n".encode("latin-1"))
            buf, need, head = b"", None, ""
            while need is None or len(buf) < need:
                data, got, _, _ = socket.recv_fds(sock, 65536, 4)
                fds += got
                if not data:
                    raise AssertionError(f"the answer ended after {len(buf)} bytes: {buf[:200]!r}")
                buf += data
                if need is None and b"\r\n\r\n" in buf:
                    head = buf[:buf.index(b"\r\n\r\n")].decode("latin-1")
                    length = int(re.search(r"(?im)^content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                    need = len(head) + 4 + length
            lines = head.split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            assert len(fds) <= 1, fds
            h = Handover(Reply(int(lines[0].split()[1]), headers, buf[len(head) + 4:]), fds.pop() if fds else None,
                         sock)
            yield h
        finally:
            for fd in fds + ([h.fd] if h is not None and h.fd is not None else []):
                os.close(fd)
            sock.close()

    @property
    def mount_root(self) -> Path:
        return self.stack.state / "restore"


def start_agent(stack: Stack, extra: str = "") -> Agent:
    """nbd-pool (exporting the test's images) and restore-mounter, both real daemons on their sockets."""
    if "nbd-pool" not in stack.daemons or not stack.daemons["nbd-pool"].running():
        stack.add_config("nbd-pool", "50-test.toml", f'export_roots = ["{stack.state}"]\n')
        stack.start("nbd-pool")
    stack.add_config(DAEMON, "50-test.toml", extra)
    stack.start(DAEMON)
    return Agent(stack.run_dir / f"{DAEMON}.sock", stack)


def attachments(stack: Stack) -> list[dict[str, Any]]:
    """nbd-pool's attachments, asked on its own socket."""
    conn = UnixHTTPConnection(str(stack.run_dir / "nbd-pool.sock"))
    try:
        conn.request("GET", "/attachments")
        return json.loads(conn.getresponse().read())["attachments"]  # type: ignore[no-any-return]
    finally:
        conn.close()


@pytest.fixture
def agent_config(short_tmp: Path) -> Iterator[Stack]:
    """restore-mounter's configuration, not started; stopped (and its mounts removed) after the test."""
    s = make_stack(short_tmp)
    try:
        yield s
    finally:
        cleanup(s)


@contextlib.contextmanager
def module_stack(prefix: str) -> Iterator[Stack]:
    """A stack in a short temporary directory of its own (`stack.state`), for a module's fixture (root
    only); afterwards its mounts and daemons are cleaned up and the directory removed."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts)")
    stack = make_stack(Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")))
    try:
        yield stack
    finally:
        try:
            cleanup(stack)
        finally:
            shutil.rmtree(stack.state, ignore_errors=True)


def cleanup(stack: Stack) -> None:
    """Unmount whatever the test left (through the daemon when it runs), then stop it; assert no leaks."""
    d = stack.daemons.get(DAEMON)
    if d is not None and d.running():
        agent = Agent(stack.run_dir / f"{DAEMON}.sock", stack)
        for m in agent.request("GET", "/mounts").json["mounts"]:
            agent.unmount(m["mount_id"], force=True)
    pool = stack.daemons.get("nbd-pool")
    if pool is not None and pool.running():  # nbd-pool keeps attachments across its own stop, by design
        for a in attachments(stack):
            conn = UnixHTTPConnection(str(stack.run_dir / "nbd-pool.sock"))
            try:
                conn.request("DELETE", f"/attachments/{a['attachment_id']}")
                conn.getresponse().read()
            finally:
                conn.close()
    stack.stop()
    leftovers = leaks(stack.state / "restore", [])
    assert not leftovers, leftovers


def leaks(mount_root: Path, images: list[Path]) -> list[str]:
    """Mounts under the root; loop devices on the images or on nbd-pool's FUSE files beside the root (the
    test's state directory); qemu-storage-daemons serving the images; live FUSE daemons serving the root."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4]
            if point.startswith(str(mount_root) + "/"):
                out.append(f"mount {point}")
    wanted = {str(p) for p in images} | {str(p.with_suffix(".qcow2")) for p in images}
    state = str(mount_root.parent) + "/"
    res = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"]).stdout
    for d in json.loads(res).get("loopdevices", []) if res.strip() else []:
        back = (d.get("back-file") or "").removesuffix(" (deleted)")
        if back in wanted or back.startswith(state):
            out.append(f"loop {d['name']} {d['back-file']}")
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if not cmd or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        name = os.path.basename(cmd[0])
        if name in ("ntfs-3g", "fusefat") and any(str(mount_root) in a for a in cmd):
            out.append(f"fuse pid {p.pid} {cmd}")
        if name == "qemu-storage-daemon" and any(w in a for a in cmd for w in wanted):
            out.append(f"qemu-storage-daemon pid {p.pid}")
    return out


# --- an attach held in the real nbd-pool ---------------------------------------------------------------------

HOLD = 90.0  # seconds the stand-in waits at most for the word to go on


@dataclass
class HeldAttach:
    """A stand-in for qemu-storage-daemon that waits until `release()`; `entered()` once nbd-pool started it."""

    dir: Path

    def entered(self) -> bool:
        return (self.dir / "entered").exists()

    def release(self) -> None:
        (self.dir / "release").touch()


@pytest.fixture
def held_attach(agent_config: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldAttach]:
    """Every attach of the nbd-pool started after this is held until `release()`: nbd-pool finds
    qemu-storage-daemon on PATH, where a stand-in comes first that waits for the word, then execs the real program
    (same pid, same argv). nbd-pool's readiness deadline is raised, so that the hold does not end the attach."""
    real = shutil.which("qemu-storage-daemon")
    assert real is not None
    hold = HeldAttach(agent_config.state / "hold")
    bin_dir = hold.dir / "bin"
    bin_dir.mkdir(parents=True)
    stand_in = bin_dir / "qemu-storage-daemon"
    stand_in.write_text(
        "#!/usr/bin/python3 -I\n"
        "import os, sys, time\n"
        f"hold = {str(hold.dir)!r}\n"
        "open(os.path.join(hold, 'entered'), 'a').close()\n"
        f"deadline = time.monotonic() + {HOLD}\n"
        "while not os.path.exists(os.path.join(hold, 'release')) and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        f"os.execv({real!r}, ['qemu-storage-daemon', *sys.argv[1:]])\n")
    stand_in.chmod(0o755)
    # The daemons started by this test inherit it (the rig passes the environment on).
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    agent_config.add_config("nbd-pool", "60-hold.toml", f"ready_timeout_seconds = {HOLD + 30}\n")
    try:
        yield hold
    finally:
        hold.release()  # whatever happened, nbd-pool's attach goes on and ends, before the stack is cleaned up
        pool = agent_config.daemons.get("nbd-pool")
        if pool is not None and pool.running():
            nbd_pool_settled(agent_config)


def nbd_pool_settled(stack: Stack) -> None:
    """Until nbd-pool has ended the attach it was making (a detach waits for its attachments' lock)."""
    conn = UnixHTTPConnection(str(stack.run_dir / "nbd-pool.sock"), timeout=HOLD + 30)
    try:
        conn.request("DELETE", "/attachments/att-none")
        assert conn.getresponse().status == 404
    finally:
        conn.close()


def special_ext4(path: Path, tree: Tree, size_mib: int = 64) -> Path:
    """A whole-disk ext4 image holding `tree` plus a FIFO, a socket and device nodes (mkfs.ext4 -d copies
    them; the tree builders make none)."""
    src = Path(tempfile.mkdtemp(dir=path.parent, prefix=".src-"))
    try:
        os.chmod(src, 0o755)
        materialize(tree, src)
        (src / "dev").mkdir()
        os.mkfifo(src / "dev" / "fifo")
        os.mknod(src / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(src / "dev" / "sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(src / "dev" / "sock"))
        sock.close()
        with open(path, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "special", "-d", src, path])
    finally:
        shutil.rmtree(src)
    return path
