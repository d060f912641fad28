"""The OpenAPI document, built from every route declared in omad/api/ (no daemon needed): bounded inputs,
ECMA-262 patterns, declared security and the statuses each route's declaration implies."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from typing import Any

import pytest

import omad.api
from oma_common import errors
from oma_common.schema import ecma_pattern
from oma_common.web import Auth, BoundRoute, collect
from omad.api.app import EVERY_ROUTE
from omad.api.openapi import document

PREFIX = "/api/v1"


def declared_routes() -> list[BoundRoute]:
    """Every route of every API class in omad/api/, as omad mounts them (instances built without collaborators)."""
    apis = []
    for info in pkgutil.iter_modules(omad.api.__path__):
        module = importlib.import_module(f"omad.api.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and any(hasattr(f, "__oma_routes__") for f in vars(cls).values()):
                apis.append(object.__new__(cls))
    return collect(*apis, errors=EVERY_ROUTE)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document(declared_routes(), PREFIX)


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def request_schemas(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema a client sends (bodies and parameters), references followed, each with where it is."""
    seen: set[str] = set()

    def walk(where: str, schema: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        if not isinstance(schema, dict):
            return
        ref = schema.get("$ref")
        if ref:
            name = ref.rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                yield from walk(name, doc["components"]["schemas"][name])
            return
        yield where, schema
        for key, sub in schema.get("properties", {}).items():
            yield from walk(f"{where}.{key}", sub)
        for key in ("items", "additionalProperties"):
            yield from walk(f"{where}[]", schema.get(key))
        for key in ("oneOf", "anyOf", "allOf"):
            for sub in schema.get(key, []):
                yield from walk(where, sub)

    for path, method, op in operations(doc):
        for p in op.get("parameters", []):
            yield from walk(f"{method} {path} {p['name']}", p["schema"])
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        yield from walk(f"{method} {path} body", body)


def test_every_input_is_bounded(doc: dict[str, Any]) -> None:
    unbounded = []
    for where, schema in request_schemas(doc):
        kind = schema.get("type")
        if kind == "string" and "enum" not in schema and "maxLength" not in schema:
            unbounded.append(f"{where}: string without maxLength")
        if kind == "integer" and ("minimum" not in schema or "maximum" not in schema):
            unbounded.append(f"{where}: integer without minimum and maximum")
    assert not unbounded, "\n".join(unbounded)


def test_patterns_are_ecma_262_and_anchored(doc: dict[str, Any]) -> None:
    for where, schema in request_schemas(doc):
        if "pattern" in schema:
            assert ecma_pattern(schema["pattern"]), where
            assert schema["pattern"].startswith("^") and schema["pattern"].endswith("$"), where
    repository_type = doc["components"]["schemas"]["RepositoryIn"]["properties"]["type"]
    assert re.fullmatch(repository_type["pattern"], "NFS") and not re.fullmatch(repository_type["pattern"], "nfsx")


def test_security_is_declared_per_route(doc: dict[str, Any]) -> None:
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    public = {(m, p) for p, m, op in operations(doc) if op["security"] == []}
    assert ("post", f"{PREFIX}/auth/login") in public and ("get", f"{PREFIX}/health") in public
    assert ("get", f"{PREFIX}/openapi.json") in public
    for path, method, op in operations(doc):
        assert "security" in op, (method, path)
        if op["security"]:
            assert "401" in op["responses"], (method, path)
    changeid = doc["paths"][f"{PREFIX}/backups/changeid"]["get"]
    assert changeid["security"] == [{"bearer": []}, {}]  # the VMA's tunnel: no token from loopback


def test_statuses_come_from_the_declaration(doc: dict[str, Any]) -> None:
    for bound in declared_routes():
        spec = bound.spec
        op = doc["paths"][PREFIX + re.sub(r"\{([^}:]+)(?::[^}]*)?\}", r"{\1}", spec.path)][spec.method.lower()]
        for cls in spec.errors:
            assert str(cls.status) in op["responses"], (spec.method, spec.path, cls)
        if spec.path_params or spec.body or spec.query:
            assert "400" in op["responses"], (spec.method, spec.path)
        if spec.auth is Auth.ADMIN:
            assert "403" in op["responses"], (spec.method, spec.path)
        for status, response in op["responses"].items():
            if int(status) >= 400:
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    credential = doc["paths"][f"{PREFIX}/vmware-credentials/{{credential_id}}"]["get"]["parameters"][0]["schema"]
    assert credential["pattern"] == "^(?:[0-9]{1,18})$" and credential["maxLength"] == 1024
    group = doc["paths"][f"{PREFIX}/machine-groups/{{group_id}}"]["put"]
    assert set(group["responses"]) == {"200", "400", "401", "403", "404", "409", "413", "503", "507"}
    assert group["requestBody"]["required"] is True
    assert errors.NotFound.status == 404 and errors.Exhausted.status == 409 and errors.Unavailable.status == 503


def test_list_shapes_follow_the_specification(doc: dict[str, Any]) -> None:
    for path in (f"{PREFIX}/policies", f"{PREFIX}/backups/{{backup_id}}/copies"):
        op = doc["paths"][path]["get"]
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "array", path
        assert "array" in op["description"]


def test_directory_listings_declare_their_paging_bounds(doc: dict[str, Any]) -> None:
    """omad's /restore/{id}/files and restore-mounter's /mounts/{id}/files: a page of at most 10000 (1000 by
    default) and a bounded opaque cursor, the same declaration (the agent's contract) in both documents."""
    from oma_common.openapi import document as agent_document
    from restore_mounter.api import RestoreApi

    agent = agent_document(collect(object.__new__(RestoreApi)), title="restore-mounter", description="")
    for document_, path in ((doc, f"{PREFIX}/restore/{{mount_id}}/files"), (agent, "/mounts/{mount_id}/files")):
        params = {p["name"]: p["schema"] for p in document_["paths"][path]["get"]["parameters"]}
        assert (params["limit"]["minimum"], params["limit"]["maximum"], params["limit"]["default"]) == (1, 10000, 1000)
        assert params["cursor"]["maxLength"] == 64 and params["cursor"]["pattern"]


def test_restore_mounts_declare_every_status_a_mount_can_have(doc: dict[str, Any]) -> None:
    """The GUI reads a mount's status from GET /restore/mounts, GET /restore/{id} and POST /restore/mount: each
    declares the one shape, whose status lists every value omad's record may hold, `broken` among them."""
    from omad.store.restore_mounts import MountStatus

    def shape(op: dict[str, Any], status: str) -> str:
        ref: str = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        return ref.rsplit("/", 1)[1]

    schemas = doc["components"]["schemas"]
    listed = schemas[shape(doc["paths"][f"{PREFIX}/restore/mounts"]["get"], "200")]["properties"]["mounts"]["items"]
    one = doc["paths"][f"{PREFIX}/restore/{{mount_id}}"]
    assert {listed["$ref"].rsplit("/", 1)[1], shape(one["get"], "200"),
            shape(doc["paths"][f"{PREFIX}/restore/mount"]["post"], "201")} == {"RestoreMount"}
    status = schemas["RestoreMount"]["properties"]["status"]
    assert status["enum"] == [s.value for s in MountStatus] and "broken" in status["enum"]
    assert {"error", "remount", "ended_at"} <= set(schemas["RestoreMount"]["required"])
    assert "404" in one["get"]["responses"] and "delete" in one
