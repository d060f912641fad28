"""Logins for people and machines, sessions, tokens through omactl, and failed-login limiting."""

from __future__ import annotations

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
