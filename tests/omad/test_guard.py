"""Every route is closed unless declared public; the VMA's machine endpoints take no token only from the tunnel."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from oma_common import config
from oma_common.web import Auth, Call, route
from omad.api import app as api_app
from omad.auth.service import AuthService
from omad.clients.agents import Agents
from omad.config import Config
from omad.main import assemble
from omad.store.db import Database
from omad.vma.tunnel import TunnelPeers

# The only routes reachable without a token. Adding one means adding it here, on purpose.
PUBLIC = {
    ("GET", "/health"), ("GET", "/api/v1/health"), ("POST", "/api/v1/auth/login"),
    ("GET", "/api/v1/openapi.json"), ("GET", "/swagger"), ("GET", "/swagger/"), ("GET", "/api/v1/swagger"),
    ("GET", "/api/v1/swagger/"), ("POST", "/api/v1/vma/enroll"), ("POST", "/api/v1/vma/enroll/verify"),
    ("GET", "/api/v1/vma/enroll/result"),
}

# The VMA's machine endpoints (CONTRACTS.md, "Authentication"): no token needed through the VMA's tunnel (a
# loopback peer owned by the tunnel user); a wrong or expired token is still refused. Adding one means adding it
# here, on purpose.
MACHINE = {
    ("GET", "/api/v1/replications/changeid"), ("POST", "/api/v1/replications/{job_id}/changeid"),
    ("GET", "/api/v1/backups/changeid"), ("POST", "/api/v1/backups/{backup_id}/complete"),
    ("POST", "/api/v1/telemetry/{job_type}/{job_id}"),
}


@dataclasses.dataclass
class App:
    server: TestServer
    db: Database
    admin_token: str
    expired_session: str
    auth: AuthService


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    (tmp_path / "a.toml").write_text(f'state_dir = "{tmp_path}"\nrun_dir = "{tmp_path}/run"\n')
    cfg = config.load(Config, [tmp_path])
    db = Database(cfg.database_path)
    await db.open()
    await db.migrate()
    agents = Agents(cfg)
    omad = await assemble(cfg, db, agents)
    application, auth = omad.app, omad.auth
    token = await auth.create_token("walker", "admin")
    await auth.add_user("old", "password-123", "admin")
    session = await auth.login_password("old", "password-123", "127.0.0.1")
    await db.execute("UPDATE sessions SET expires_at = '2000-01-01T00:00:00Z'")
    server = TestServer(application, host="127.0.0.1")
    await server.start_server()
    try:
        yield App(server, db, token, session.session_token, auth)
    finally:
        await server.close()
        await agents.close()
        await db.close()


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def routes_of(application: web.Application) -> list[tuple[str, str]]:
    out = []
    for r in application.router.routes():
        if r.method in ("HEAD", "OPTIONS") or isinstance(r.resource, web.StaticResource):
            continue
        out.append((r.method, r.resource.canonical))
    return sorted(set(out))


async def test_every_non_public_route_needs_a_valid_token(app: App) -> None:
    routes = routes_of(app.server.app)
    assert len(routes) >= 8
    machine = {r for r in routes if r in MACHINE}
    declared_machine = {(r.method, r.resource.canonical) for r in app.server.app.router.routes()
                        if getattr(r.handler, "__oma_spec__", None) and r.handler.__oma_spec__.auth.value == "machine"}
    assert declared_machine == machine, "a route uses the loopback rule without being one of the VMA's"
    assert PUBLIC <= set(routes), "a public route disappeared"
    async with aiohttp.ClientSession() as s:
        for method, path in routes:
            url = str(app.server.make_url(concrete(path)))
            if (method, path) in PUBLIC:
                async with s.request(method, url, allow_redirects=False) as r:
                    assert r.status != 401, (method, path)
                continue
            refused = [{"Authorization": "Bearer omat_wrong"}, {"Authorization": "Bearer " + app.expired_session}]
            if (method, path) not in MACHINE:
                refused += [{}, {"Authorization": "Basic YWRtaW46YWRtaW4="}]
            for header in refused:
                async with s.request(method, url, headers=header, json={}) as r:
                    assert r.status == 401, (method, path, header, r.status)
                    body = await r.json()
                    assert body["code"] == "unauthorized" and body["error"] and body["timestamp"]
            async with s.request(method, url, headers={"Authorization": "Bearer " + app.admin_token}, json={}) as r:
                assert r.status != 401, (method, path)


async def test_static_swagger_assets_are_public_and_served(app: App) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/swagger/", "/api/v1/swagger/swagger-ui-bundle.js", "/swagger/init.js"):
            async with s.get(str(app.server.make_url(path))) as r:
                assert r.status == 200, path
        async with s.get(str(app.server.make_url("/api/v1/swagger/../../etc/passwd"))) as r:
            assert r.status in (403, 404)


class MachineProbe:
    """A route under the MACHINE policy, as the VMA's changeid/complete/telemetry routes are declared."""

    @route("POST", "/probe/machine", auth=Auth.MACHINE)
    async def probe(self, call: Call) -> dict[str, Any]:
        return {"caller": call.principal.name}


@pytest.fixture
async def machine_app(app: App) -> AsyncIterator[tuple[str, App]]:
    """omad's application with one machine route, served on every address (for the namespace test)."""
    # The test's own user plays the tunnel user here; tests/omad/test_vma_tunnel.py goes through a real sshd.
    tunnel = TunnelPeers(pwd.getpwuid(os.getuid()).pw_name)
    application = api_app.build([MachineProbe()], app.auth, tunnel=tunnel, cors_origins=["*"], max_body=4096)
    runner = web.AppRunner(application)
    await runner.setup()
    site = web.TCPSite(runner, "0.0.0.0", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


async def test_machine_route_accepts_the_tunnel_user_without_token(machine_app: tuple[str, App]) -> None:
    url, app = machine_app
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/api/v1/probe/machine") as r:
            assert r.status == 200 and (await r.json())["caller"] == "vma-tunnel"
        async with s.post(url + "/api/v1/probe/machine", headers={"Authorization": "Bearer omat_bad"}) as r:
            assert r.status == 401  # a wrong token is never rescued by the tunnel rule
        async with s.post(url + "/api/v1/probe/machine", headers={"Authorization": "Bearer " + app.admin_token}) as r:
            assert r.status == 200 and (await r.json())["caller"] == "walker"


CALL = ("import sys,urllib.request,urllib.error\n"
        "req=urllib.request.Request(sys.argv[1],data=b'{}',method='POST',headers=dict(h.split(': ',1) for h in sys.argv[2:]))\n"
        "try:\n print(urllib.request.urlopen(req,timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n print(e.code)\n")


@pytest.mark.root
async def test_machine_route_refuses_another_local_user_without_token(machine_app: tuple[str, App]) -> None:
    """Loopback is not enough: a process of another user on this host (nobody) needs a token."""
    url, app = machine_app
    for headers, expected in (([], "401"), ([f"Authorization: Bearer {app.admin_token}"], "200")):
        proc = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", CALL,
            url + "/api/v1/probe/machine", *headers, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        assert out.decode().strip() == expected


@pytest.fixture
def netns() -> Any:
    """A network namespace joined to this host by a veth pair: a second host, 198.18.7.2 → 198.18.7.1."""
    name = f"omat{uuid.uuid4().hex[:8]}"
    host_if, ns_if = f"{name}h", f"{name}n"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", name)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", "198.18.7.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", name, "addr", "add", "198.18.7.2/30", "dev", ns_if)
        ip("-n", name, "link", "set", ns_if, "up")
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.root
async def test_machine_route_refuses_another_host_without_token(machine_app: tuple[str, App], netns: str) -> None:
    url, app = machine_app
    port = url.rsplit(":", 1)[1]
    code = CALL
    remote = f"http://198.18.7.1:{port}/api/v1/probe/machine"
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, sys.executable, "-c", code, remote, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out.decode().strip() == "401"
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, sys.executable, "-c", code, remote, f"Authorization: Bearer {app.admin_token}",
        stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out.decode().strip() == "200"
