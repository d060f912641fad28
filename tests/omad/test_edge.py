"""Bad input never reaches a 500: malformed JSON, wrong types, missing fields, oversized bodies, unknown
routes and methods all answer the one JSON error shape; CORS preflights are answered for the GUI."""

from __future__ import annotations

import pytest

from ..rig import Api, Stack


def assert_error_shape(body: dict, code: str) -> None:
    assert set(body) >= {"error", "details", "code", "timestamp"}
    assert body["code"] == code
    assert "Traceback" not in body["details"]


@pytest.mark.parametrize("payload, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"username": 5, "password": []}', "username: must be a string"),
    ('"just a string"', "must be a JSON object"),
    ("\xff\xfe", "not valid JSON"),
])
async def test_bad_bodies_are_400_json(anon: Api, payload: str, fragment: str) -> None:
    status, body = await anon.request("POST", "/auth/login", data=payload.encode("latin-1"),
                                      headers={"Content-Type": "application/json"})
    assert status == 400, body
    assert_error_shape(body, "invalid_request")
    assert fragment in body["details"]


async def test_missing_fields_are_named(anon: Api) -> None:
    status, body = await anon.post("/auth/login", {"username": "admin"})
    assert status == 400
    assert "send {username, password}" in body["details"]


async def test_oversized_body_is_413_json(stack: Stack, anon: Api) -> None:
    status, body = await anon.request("POST", "/auth/login", data=b'{"username": "' + b"a" * (2 * 1024 * 1024) + b'"}',
                                      headers={"Content-Type": "application/json"})
    assert status == 413
    assert_error_shape(body, "payload_too_large")


async def test_unknown_route_and_wrong_method_are_json(admin: Api) -> None:
    status, body = await admin.get("/no/such/thing")
    assert status == 404
    assert_error_shape(body, "not_found")
    status, body = await admin.request("DELETE", "/auth/login")
    assert status == 405
    assert_error_shape(body, "invalid_request")


async def test_cors_preflight_and_headers(anon: Api) -> None:
    headers = {"Origin": "http://gui.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "Authorization, Content-Type"}
    async with anon.session.options(anon.base + "/api/v1/auth/login", headers=headers) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    async with anon.session.get(anon.base + "/api/v1/auth/me", headers={"Origin": "http://gui.example"}) as r:
        assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "*"


async def test_openapi_declares_what_is_served(anon: Api) -> None:
    status, doc = await anon.get("/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    login = doc["paths"]["/api/v1/auth/login"]["post"]
    assert login["security"] == []
    assert login["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/LoginIn"}
    assert doc["paths"]["/api/v1/auth/me"]["get"]["responses"]["401"]
    for path, ops in doc["paths"].items():
        for method in ops:
            status, _ = await anon.request(method.upper(), path.replace("{", "").replace("}", ""))
            assert status != 501, path
