"""Bad input never reaches a 500: malformed JSON, wrong types, missing fields, oversized bodies, unknown
routes and methods all answer the one JSON error shape; CORS preflights are answered for the GUI.

Requests that are refused change nothing, so those tests share one stack (`shared_stack`); the ones that
create something, and the walk over every route, have their own."""

from __future__ import annotations

import json

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
async def test_bad_bodies_are_400_json(shared_anon: Api, payload: str, fragment: str) -> None:
    status, body = await shared_anon.request("POST", "/auth/login", data=payload.encode("latin-1"),
                                             headers={"Content-Type": "application/json"})
    assert status == 400, body
    assert_error_shape(body, "invalid_request")
    assert fragment in body["details"]


async def test_missing_fields_are_named(shared_anon: Api) -> None:
    status, body = await shared_anon.post("/auth/login", {"username": "admin"})
    assert status == 400
    assert "send {username, password}" in body["details"]


async def test_oversized_body_is_413_json(shared_anon: Api) -> None:
    big = b'{"username": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    status, body = await shared_anon.request("POST", "/auth/login", data=big,
                                             headers={"Content-Type": "application/json"})
    assert status == 413
    assert_error_shape(body, "payload_too_large")


async def test_unknown_route_and_wrong_method_are_json(shared_admin: Api) -> None:
    admin = shared_admin
    status, body = await admin.get("/no/such/thing")
    assert status == 404
    assert_error_shape(body, "not_found")
    async with admin.session.delete(admin.base + "/api/v1/auth/login") as r:
        assert r.status == 405
        assert r.headers["Allow"] == "POST"  # RFC 9110: a 405 lists what the resource serves
        assert_error_shape(await r.json(), "invalid_request")
    async with admin.session.delete(admin.base + "/api/v1/restore/mounts", headers=admin._headers(None)) as r:
        assert (r.status, r.headers["Allow"]) == (405, "GET")  # not an unmount of a mount named "mounts"


async def test_a_body_is_required_where_the_operation_needs_one(admin: Api) -> None:
    status, group = await admin.post("/machine-groups", {"name": "g1"})
    assert status == 201, group
    for path in (f"/machine-groups/{group['id']}", "/vm-contexts/ctx-nope/group"):
        status, body = await admin.request("PUT", path)
        assert status == 400, (path, body)
        assert "needs a JSON body" in body["details"]
    assert (await admin.put(f"/machine-groups/{group['id']}", {"description": "two\nlines"}))[0] == 200


@pytest.mark.parametrize("query", [{"offset": "9" * 30}, {"offset": str(2 ** 63)}, {"limit": "1_0"}, {"offset": "-1"}])
async def test_integer_parameters_are_bounded(shared_admin: Api, query: dict[str, str]) -> None:
    status, body = await shared_admin.get("/backups", params=query)
    assert status == 400, body
    assert_error_shape(body, "invalid_request")


@pytest.mark.parametrize("payload", ['{"name": NaN}', '{"name": "g", "max_concurrent_vms": Infinity}',
                                     '{"name": "esc\\u001b[2J"}', '{"name": "cr\\rhidden"}',
                                     '{"name": "lone \\ud800"}', '{"name": "g", "description": "bell\\u0007"}'])
async def test_names_and_numbers_are_sane(shared_admin: Api, payload: str) -> None:
    status, body = await shared_admin.request("POST", "/machine-groups", data=payload.encode(),
                                              headers={"Content-Type": "application/json"})
    assert status == 400, body
    assert_error_shape(body, "invalid_request")


async def test_the_audit_records_the_callers_address_and_omactl_prints_it_safely(stack: Stack, admin: Api) -> None:
    assert (await admin.post("/machine-groups", {"name": "audited"}))[0] == 201
    stack.sql("UPDATE audit_log SET resource = ? WHERE action = 'machine_group.create'", ("evil\x1b[2J\rname",))
    rows = stack.sql("SELECT source FROM audit_log WHERE action = 'machine_group.create'")
    assert rows == [("127.0.0.1",)]
    table = stack.omactl("audit", "--action", "machine_group.create")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:4] == ["AT", "ACTOR", "ACTION", "RESOURCE"] and "127.0.0.1" in row
    assert "\x1b" not in table.stdout and "\r" not in table.stdout and "evil\\x1b[2J\\rname" in row
    as_json = stack.omactl("audit", "--action", "machine_group.create", "--json")
    assert json.loads(as_json.stdout.splitlines()[0])["resource"] == "evil\x1b[2J\rname"


async def test_cors_preflight_and_headers(shared_anon: Api) -> None:
    anon = shared_anon
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
