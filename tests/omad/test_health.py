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
