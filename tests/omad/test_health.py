"""/health reports the database and each agent, and says `degraded` when an agent is down."""

from __future__ import annotations

from ..rig import Api, Stack


async def test_healthy_then_degraded_then_healthy(stack: Stack, anon: Api) -> None:
    for path in ("/health", "/api/v1/health"):
        status, body = await anon.get(path if path == "/health" else stack.url + path)
        assert status == 200
        assert body["service"] == "OMA API" and body["status"] == "healthy" and body["database"] == "connected"
        assert {"nbd-pool", "restore-mounter", "volume-agent", "database"} <= set(body["components"])
        assert body["components"]["nbd-pool"]["status"] == "ok"
    stack.stop("restore-mounter")
    status, body = await anon.get("/health")
    assert status == 200 and body["status"] == "degraded"
    assert body["components"]["restore-mounter"]["status"] == "unavailable"
    assert body["components"]["nbd-pool"]["status"] == "ok"
    stack.start("restore-mounter")
    assert (await anon.get("/health"))[1]["status"] == "healthy"


async def test_public_health_has_no_pid_path_or_error_detail(stack: Stack, anon: Api, admin: Api) -> None:
    stack.stop("restore-mounter")
    status, public = await anon.get("/health")
    assert status == 200 and public["status"] == "degraded"
    for name, component in public["components"].items():
        assert set(component) == {"status"}, (name, component)
    text = str(public)
    assert str(stack.state) not in text and "pid" not in text and "error" not in text.replace("'error'", "")
    # With a token the details are there.
    status, full = await admin.get("/health")
    assert status == 200 and full["components"]["restore-mounter"]["status"] == "unavailable"
    assert full["components"]["restore-mounter"].get("details") or full["components"]["restore-mounter"].get("error")
    assert any(len(c) > 1 for c in full["components"].values())
    # A bad token on a public route is simply anonymous.
    status, body = await anon.get("/health", token="omas_not-a-session")
    assert status == 200 and all(set(c) == {"status"} for c in body["components"].values())
    stack.start("restore-mounter")
