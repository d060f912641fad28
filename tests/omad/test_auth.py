"""Logins for people and machines, sessions, tokens through omactl, and failed-login limiting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import psutil

from ..rig import Api, Stack


async def test_password_login_and_logout(stack: Stack, anon: Api) -> None:
    status, body = await anon.post("/auth/login", {"username": "admin", "password": stack.admin_password})
    assert status == 200 and body["success"] is True and body["expires_at"].endswith("Z")
    token = body["session_token"]
    assert (await anon.get("/auth/me", token=token)) == (200, {"name": "admin", "role": "admin", "kind": "user"})
    assert (await anon.post("/auth/logout", token=token))[0] == 200
    assert (await anon.get("/auth/me", token=token))[0] == 401
    # Only a digest of the session is stored.
    assert not stack.sql("SELECT 1 FROM sessions WHERE token_hash = ?", (token,))


async def test_wrong_password_is_401_with_the_clients_shape(stack: Stack, anon: Api) -> None:
    status, body = await anon.post("/auth/login", {"username": "admin", "password": "nope-nope"})
    assert status == 401
    assert body["success"] is False and body["error_message"]
    status, body = await anon.post("/auth/login", {"username": "ghost", "password": "nope-nope"})
    assert status == 401 and body["success"] is False


def test_an_unknown_user_is_checked_against_a_hash_of_the_same_cost() -> None:
    """The stand-in hash for unknown users has a real hash's algorithm and parameters (so checking it takes as
    long, and timing does not reveal usernames) and matches no password."""
    import argon2

    from omad.auth import secrets

    real = secrets._hasher.hash("nope-nope")
    params = lambda h: h.rsplit("$", 2)[0]  # noqa: E731 - $argon2id$v=..$m=..,t=..,p=..
    assert params(secrets.DUMMY_HASH) == params(real)
    for guess in ("", "nope-nope", "admin"):
        try:
            secrets._hasher.verify(secrets.DUMMY_HASH, guess)
            raise AssertionError(f"{guess!r} matched the stand-in hash")
        except argon2.exceptions.VerifyMismatchError:
            pass


async def test_machine_token_login_and_revocation(stack: Stack, anon: Api) -> None:
    made = stack.omactl("token", "create", "vma-1", "--appliance-id", "vma-abc")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("omat_")
    assert not stack.sql("SELECT 1 FROM api_tokens WHERE token_hash = ?", (token,))
    status, body = await anon.post("/auth/login", {"appliance_id": "vma-abc", "token": token, "version": "2.1"})
    assert status == 200 and body["success"], body
    session = body["session_token"]
    assert (await anon.get("/auth/me", token=session))[1]["kind"] == "token"
    assert (await anon.get("/auth/me", token=token))[0] == 200  # the token itself is a bearer too
    status, body = await anon.post("/auth/login", {"appliance_id": "other", "token": token, "version": "2.1"})
    assert status == 401
    revoked = stack.omactl("token", "revoke", "vma-1")
    assert revoked.returncode == 0, revoked.stderr
    assert (await anon.get("/auth/me", token=session))[0] == 401
    assert (await anon.get("/auth/me", token=token))[0] == 401


async def test_omactl_users(stack: Stack, anon: Api) -> None:
    assert stack.omactl("user", "add", "olga", "--password-stdin", stdin="s3cret-pass\n").returncode == 0
    dup = stack.omactl("user", "add", "olga", "--password-stdin", stdin="s3cret-pass\n")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    short = stack.omactl("user", "add", "pat", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "at least 8" in short.stderr
    first = await anon.login("olga", "s3cret-pass")
    assert (await anon.get("/auth/me"))[1]["role"] == "operator"
    assert stack.omactl("user", "passwd", "olga", "--password-stdin", stdin="n3w-secret-pass\n").returncode == 0
    assert (await anon.get("/auth/me", token=first))[0] == 401  # a new password ends old sessions
    await anon.login("olga", "n3w-secret-pass")
    audit = stack.omactl("audit", "--action", "user.password")
    assert "user:olga" in audit.stdout


async def test_failed_logins_are_rate_limited_per_address(stack: Stack, anon: Api) -> None:
    for _ in range(5):
        assert (await anon.post("/auth/login", {"username": "admin", "password": "wrong-wrong"}))[0] == 401
    async with anon.session.post(anon.base + "/api/v1/auth/login",
                                 json={"username": "admin", "password": stack.admin_password}) as r:
        assert r.status == 429
        assert int(r.headers["Retry-After"]) > 0
        assert (await r.json())["code"] == "rate_limited"


async def test_omactl_status(stack: Stack) -> None:
    out = stack.omactl("status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OMA API: healthy" in out.stdout and "nbd-pool: ok" in out.stdout


async def _login(base: str, password: str, local: str = "127.0.0.1") -> int:
    conn = aiohttp.TCPConnector(local_addr=(local, 0), force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.post(base + "/api/v1/auth/login", json={"username": "admin", "password": password}) as r:
            return r.status


async def test_concurrent_wrong_logins_are_each_counted_before_checking(stack: Stack) -> None:
    """30 guesses at once from one address: only the limit (5) reach the password check, the rest are 429."""
    statuses = await asyncio.gather(*(_login(stack.url, f"wrong-{i}-guess") for i in range(30)))
    assert sorted(statuses) == [401] * 5 + [429] * 25, statuses
    denied = stack.sql("SELECT COUNT(*) FROM audit_log WHERE action = 'auth.login' AND outcome = 'denied'")[0][0]
    assert denied == 5


async def test_a_correct_login_does_not_forgive_failures(stack: Stack) -> None:
    for _ in range(3):
        assert await _login(stack.url, "wrong-wrong") == 401
    assert await _login(stack.url, stack.admin_password) == 200
    for _ in range(2):
        assert await _login(stack.url, "wrong-wrong") == 401
    # Five failures stand in the window: even the right password now waits.
    assert await _login(stack.url, stack.admin_password) == 429
    # Another address is not affected.
    assert await _login(stack.url, stack.admin_password, local="127.0.0.2") == 200


RSS_BOUND_MIB = 256  # two argon2 checks at ~64 MiB each, and the interpreter's own churn


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_a_login_flood_does_not_grow_omad_without_bound(stack: Stack) -> None:
    """50 logins at once from 50 addresses: argon2 runs on two threads, the rest wait or are turned away."""
    pid = stack.daemons["omad"].pid
    before = psutil.Process(pid).memory_info().rss // 1024
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the high-water mark
    statuses = await asyncio.gather(*(_login(stack.url, stack.admin_password, local=f"127.0.1.{i + 1}")
                                      for i in range(50)))
    grown_mib = (_hwm_kib(pid) - before) / 1024
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 2, statuses
    assert grown_mib < RSS_BOUND_MIB, f"omad's peak RSS grew by {grown_mib:.0f} MiB"


async def test_the_bootstrap_password_file_goes_when_the_password_changes(stack: Stack, anon: Api) -> None:
    password_file = stack.state / "admin-password"
    assert password_file.exists()
    assert stack.omactl("user", "passwd", "olga-missing", "--password-stdin", stdin="n3w-secret-pass\n").returncode == 1
    assert password_file.exists()  # a failed change keeps it
    assert stack.omactl("user", "passwd", "admin", "--password-stdin", stdin="n3w-admin-pass\n").returncode == 0
    assert not password_file.exists()
    await anon.login("admin", "n3w-admin-pass")
