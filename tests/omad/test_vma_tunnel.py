"""The VMA's SSH tunnel through a real sshd on a loopback port, configured with the packaged drop-in.

sshd asks `omactl vma authorized-keys %u %f` for the keys of vma_tunnel, as the appliance's does (here as root,
because the test's omad and its database are root's; on the appliance both are the user oma). An approved key
may open the API and NBD forwards and the VMA's remote forward, nothing else; revoking it ends the live tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ..rig import ROOT, Api, Stack
from .enrollment_rig import VmaKey, approved, enroll, verified

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

TUNNEL_USER = "vma_tunnel"
DROP_IN = ROOT / "packaging" / "debian" / "etc" / "ssh" / "sshd_config.d" / "oma-vma-tunnel.conf"
SSH = ["ssh", "-F", "/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
       "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


def free_port(candidates: range | None = None) -> int:
    for port in candidates or [0]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port in {candidates}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def tunnel_account() -> Iterator[str]:
    """The tunnel user, as the package creates it (created here when missing, and removed again)."""
    created = subprocess.run(["getent", "passwd", TUNNEL_USER], capture_output=True).returncode != 0
    if created:
        subprocess.run(["useradd", "--system", "--shell", "/usr/sbin/nologin", "--no-create-home", "--home-dir",
                        "/nonexistent", TUNNEL_USER], check=True)
    try:
        yield TUNNEL_USER
    finally:
        if created:
            subprocess.run(["userdel", TUNNEL_USER], check=False)


@dataclasses.dataclass
class Sshd:
    port: int
    host_key_pub: Path
    log: Path

    def ssh(self, key: Path, *args: str) -> list[str]:
        return [*SSH, "-i", str(key), "-p", str(self.port), *args, f"{TUNNEL_USER}@127.0.0.1"]


@contextlib.contextmanager
def run_sshd(stack: Stack, workdir: Path) -> Iterator[Sshd]:
    """sshd -D on a free loopback port with the packaged drop-in; paths it checks are root-owned and not
    group- or world-writable (sshd's rule for AuthorizedKeysCommand), so they live under /run, not /tmp."""
    made_privsep = not Path("/run/sshd").exists()
    if made_privsep:
        os.mkdir("/run/sshd", 0o755)
    conf_dir = Path(tempfile.mkdtemp(prefix="oma-sshd-", dir="/run"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        os.chmod(conf_dir, 0o755)
        command = conf_dir / "omactl"
        # sshd runs the command with an empty environment: the interpreter's module path is passed on here.
        path = f"export PYTHONPATH='{os.environ['PYTHONPATH']}'\n" if os.environ.get("PYTHONPATH") else ""
        command.write_text(f"#!/bin/sh\n{path}exec {sys.executable} -m omad.ctl --config {stack.config_dirs['omad']} "
                           "\"$@\"\n")
        command.chmod(0o755)
        host_key = conf_dir / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        drop_in = DROP_IN.read_text().replace("/usr/bin/omactl", str(command)).replace(
            "AuthorizedKeysCommandUser oma", "AuthorizedKeysCommandUser root")
        port = free_port()
        config = conf_dir / "sshd_config"
        config.write_text(f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\nPidFile {conf_dir}/sshd.pid\n"
                          "UsePAM yes\nLogLevel VERBOSE\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                          f"{drop_in}")
        log = workdir / "sshd.log"
        proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(log)])
        deadline = time.monotonic() + 10
        while not listening(port):
            assert proc.poll() is None, f"sshd exited: {log.read_text() if log.exists() else ''}"
            assert time.monotonic() < deadline, "sshd does not listen"
            time.sleep(0.05)
        yield Sshd(port, host_key.with_suffix(".pub"), log)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(conf_dir, ignore_errors=True)
        if made_privsep:
            shutil.rmtree("/run/sshd", ignore_errors=True)


class VmaApi(BaseHTTPRequestHandler):
    """The VMA's API at the far end of the remote forward."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b'{"service": "vma"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclasses.dataclass
class Rig:
    stack: Stack
    sshd: Sshd
    admin: Api
    anon: Api
    tmp: Path
    api_port: int
    vma_listen: int  # where the VMA's API lands on this appliance (permitlisten)
    vma_api: int  # the VMA's own API port (its end of the remote forward)


@pytest.fixture
async def rig(stack_config: Stack, tunnel_account: str, short_tmp: Path) -> AsyncIterator[Rig]:
    # The real tunnel user again (the rig's default lets the test's own user stand in), and the VMA's API on a
    # free port instead of 9081, so that the test does not depend on 9081 being free.
    vma_listen = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", 0), VmaApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with run_sshd(stack_config, short_tmp) as sshd:
        stack_config.add_config("omad", "90-tunnel.toml",
                                f'[vma]\nurl = "http://127.0.0.1:{vma_listen}"\n[enrollment]\n'
                                f'tunnel_user = "{tunnel_account}"\nssh_host_key = "{sshd.host_key_pub}"\n')
        stack_config.start()
        admin, anon = Api(stack_config.url), Api(stack_config.url)
        await admin.login("admin", stack_config.admin_password)
        try:
            yield Rig(stack_config, sshd, admin, anon, short_tmp, int(stack_config.url.rsplit(":", 1)[1]),
                      vma_listen, server.server_address[1])
        finally:
            await admin.close()
            await anon.close()
            server.shutdown()
            server.server_close()


@contextlib.asynccontextmanager
async def tunnel(rig: Rig, key: Path, *forwards: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`ssh -N` with these forwards, up when the VMA's remote forward listens; ended afterwards."""
    proc = await asyncio.create_subprocess_exec(*rig.sshd.ssh(key, "-N", "-o", "ExitOnForwardFailure=yes", *forwards),
                                                stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not listening(rig.vma_listen):
            if proc.returncode is not None:
                err = (await proc.stderr.read()).decode() if proc.stderr else ""
                raise AssertionError(f"ssh exited {proc.returncode}: {err}\n{rig.sshd.log.read_text()}")
            assert time.monotonic() < deadline, "the tunnel did not come up"
            await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def ssh_exit(rig: Rig, key: Path, *args: str, command: tuple[str, ...] = ()) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*rig.sshd.ssh(key, *args), *command, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return int(proc.returncode or 0), out.decode(errors="replace")


async def cannot_log_in(rig: Rig, key: Path) -> None:
    code, out = await ssh_exit(rig, key, "-N")
    assert code == 255 and "Permission denied" in out, (code, out)


async def http_status(port: int, path: str, *, user: str | None = None) -> str:
    """GET through a separate process (as `user` when given); prints the HTTP status."""
    code = ("import sys,urllib.request,urllib.error\n"
            "try:\n print(urllib.request.urlopen(sys.argv[1],timeout=10).status)\n"
            "except urllib.error.HTTPError as e:\n print(e.code)\n")
    prefix = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"] if user else []
    proc = await asyncio.create_subprocess_exec(*prefix, sys.executable, "-c", code, f"http://127.0.0.1:{port}{path}",
                                                stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


def nbd_size(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/disk"], capture_output=True, text=True,
                          timeout=30)


@contextlib.contextmanager
def nbd_server(tmp: Path) -> Iterator[int]:
    """An NBD export of a 1 MiB image on a free port of the NBD range (from its top), checked by a handshake of
    its own before use. qemu-storage-daemon, not qemu-nbd: an nbd-pool starting anywhere on this machine (other
    tests' stacks) ends every qemu-nbd serving a port of its range as its own orphan."""
    image = tmp / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(1024 * 1024)
    for port in range(10200, 10099, -1):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                continue  # taken
        proc = subprocess.Popen(["qemu-storage-daemon",
                                 "--blockdev", f"driver=file,node-name=f0,filename={image},read-only=on",
                                 "--blockdev", "driver=raw,node-name=d0,file=f0,read-only=on",
                                 "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                                 "--export", "type=nbd,id=e0,node-name=d0,name=disk,writable=off"],
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while proc.poll() is None and not listening(port) and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None and nbd_size(port).returncode == 0:
                yield port
                return
        finally:
            proc.terminate()
            proc.wait(10)
    raise RuntimeError("no NBD port free")


async def test_an_approved_key_opens_exactly_the_tunnel(rig: Rig) -> None:
    key = VmaKey.fresh("vma-east")
    eid = await approved(rig.admin, rig.anon, key)
    # The VMA learns which host key to expect, and as which user to log in.
    status, result = await rig.anon.get("/vma/enroll/result", params={"enrollment_id": eid})
    host_fp = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(rig.sshd.host_key_pub)],
                             capture_output=True, text=True, check=True).stdout.split()[1]
    assert (result["host_key_hash"], result["ssh_user"]) == (host_fp, TUNNEL_USER), result
    key_file = key.write(rig.tmp)
    local_api, local_nbd = free_port(), free_port()
    with nbd_server(rig.tmp) as nbd_port:
        async with tunnel(rig, key_file, "-L", f"{local_api}:127.0.0.1:{rig.api_port}",
                          "-L", f"{local_nbd}:127.0.0.1:{nbd_port}",
                          "-R", f"127.0.0.1:{rig.vma_listen}:127.0.0.1:{rig.vma_api}"):
            # HTTP through the local forward; a machine route without a token is accepted through the tunnel
            # (404: no such backup, not 401), refused from another local user straight on 127.0.0.1.
            assert await http_status(local_api, "/health") == "200"
            machine = "/api/v1/backups/changeid?vm_name=nothing&disk_id=0"
            assert await http_status(local_api, machine) == "404"
            assert await http_status(rig.api_port, machine, user="nobody") == "401"
            assert await http_status(rig.api_port, machine) == "401"  # root is not the tunnel either
            # An NBD handshake through the NBD forward.
            info = nbd_size(local_nbd)
            assert info.returncode == 0 and info.stdout.strip() == str(1024 * 1024), info.stderr
            # The VMA's API through the remote forward.
            assert await http_status(rig.vma_listen, "/api/v1/health") == "200"
            status, active = await rig.admin.get("/admin/vma/active")
            assert active["tunnel_up"] is True and active["connections"][0]["last_login_at"]

        # A command and a shell are refused (nologin runs instead, no PTY is given).
        code, out = await ssh_exit(rig, key_file, command=("echo", "pwned"))
        assert code != 0 and "pwned" not in out, out
        code, out = await ssh_exit(rig, key_file, "-tt")
        assert code != 0 and "PTY allocation request failed" in out, out
        # A forward to another port opens but the channel is refused: nothing comes back from the service.
        other = socket.create_server(("127.0.0.1", 0))
        other_port = other.getsockname()[1]
        other.settimeout(3)
        local_other = free_port()
        try:
            async with tunnel(rig, key_file, "-L", f"{local_other}:127.0.0.1:{other_port}",
                              "-R", f"127.0.0.1:{rig.vma_listen}:127.0.0.1:{rig.vma_api}"):
                with socket.create_connection(("127.0.0.1", local_other), timeout=5) as c:
                    c.settimeout(5)
                    assert c.recv(16) == b""  # closed at once: sshd denied the channel
                with pytest.raises(TimeoutError):
                    other.accept()
        finally:
            other.close()
        # A second remote forward is refused (ExitOnForwardFailure makes ssh give up).
        code, out = await ssh_exit(rig, key_file, "-N", "-o", "ExitOnForwardFailure=yes",
                                   "-R", f"127.0.0.1:{rig.vma_listen}:127.0.0.1:{rig.vma_api}",
                                   "-R", f"127.0.0.1:{free_port()}:127.0.0.1:{rig.vma_api}")
        assert code == 255 and "remote port forwarding failed" in out, out
    assert "request was denied" in rig.sshd.log.read_text()


async def test_keys_that_are_not_approved_cannot_log_in(rig: Rig) -> None:
    unverified, forged, waiting, refused = (VmaKey.fresh(n) for n in ("unverified", "forged", "waiting", "refused"))
    status, _ = await enroll(rig.admin, rig.anon, unverified)
    assert status == 200
    status, out = await enroll(rig.admin, rig.anon, forged)
    status, body = await rig.anon.post("/vma/enroll/verify", {"enrollment_id": out["enrollment_id"],
                                                              "signature": VmaKey.fresh().sign(out["challenge"])})
    assert status == 401
    await verified(rig.admin, rig.anon, waiting)
    eid = await verified(rig.admin, rig.anon, refused)
    status, _ = await rig.admin.post(f"/admin/vma/reject/{eid}", {"reason": "no"})
    assert status == 200
    # An unknown pairing code gives nothing either (used and expired ones: test_vma_enrollment.py).
    status, out = await enroll(rig.admin, rig.anon, VmaKey.fresh("late"), code="ABCD-EFGH-JKMN")
    assert status == 401
    for key in (unverified, forged, waiting, refused):
        await cannot_log_in(rig, key.write(rig.tmp))


async def test_revoking_ends_the_live_tunnel_within_seconds(rig: Rig) -> None:
    key = VmaKey.fresh("vma-west")
    eid = await approved(rig.admin, rig.anon, key)
    key_file = key.write(rig.tmp)
    local_api = free_port()
    async with tunnel(rig, key_file, "-L", f"{local_api}:127.0.0.1:{rig.api_port}",
                      "-R", f"127.0.0.1:{rig.vma_listen}:127.0.0.1:{rig.vma_api}") as ssh:
        assert await http_status(local_api, "/health") == "200"
        started = time.monotonic()
        status, body = await rig.admin.delete(f"/admin/vma/revoke/{eid}", params={"revoked_by": "erin"})
        assert status == 200 and body["sessions_terminated"] >= 1, body
        await asyncio.wait_for(ssh.wait(), 5)
        elapsed = time.monotonic() - started
        assert not listening(rig.vma_listen) and not listening(local_api)
        print(f"tunnel ended {elapsed:.2f} s after the revocation was sent")
    await cannot_log_in(rig, key_file)
    status, log = await rig.admin.get("/admin/vma/audit", params={"event_type": "tunnel.terminate"})
    event = log["events"][0]
    assert event["actor"] == "admin" and event["outcome"] == "ok" and len(event["details"]["sessions"]) >= 1
    status, active = await rig.admin.get("/admin/vma/active")
    assert active["count"] == 0 and active["tunnel_up"] is False
