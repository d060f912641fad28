"""OpenAPI 3 documents generated from declared routes and their schemas (omad's API and each agent's socket).

Every status an operation answers comes from its declaration (`oma_common.web.declared_statuses`).
"""

from __future__ import annotations

import re
from typing import Any

from . import __version__
from .schema import SchemaRegistry, anchored
from .web import PATH_PARAM_MAX, Auth, BoundRoute, Call, RouteSpec, declared_statuses, route

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every error: `error` (short), `details` (long), a stable `code`; some add fields (e.g. "
                   "`problems`, one line per invalid input; `retry_after`).",
    "required": ["error", "details", "code", "timestamp"],
    "properties": {"error": {"type": "string"}, "details": {"type": "string"}, "code": {"type": "string"},
                   "timestamp": {"type": "string", "format": "date-time"}},
}
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    Auth.PUBLIC: [],
    Auth.MACHINE: [*BEARER, {}],  # {}: no token at all, accepted through the VMA's tunnel only
    Auth.USER: BEARER,
    Auth.ADMIN: BEARER,
    Auth.PEER: [],  # no credentials: the unix socket's peer uid is checked (SO_PEERCRED)
}


def _operation(reg: SchemaRegistry, spec: RouteSpec, operation_id: str) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": spec.summary, "operationId": operation_id,
                          "tags": list(spec.tags) or [spec.path.strip("/").split("/")[0]]}
    notes = [spec.description] if spec.description else []
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", "minLength": 1, "maxLength": PATH_PARAM_MAX,
                    **({"pattern": anchored(spec.params[name])} if name in spec.params else {})}}
        for name in spec.path_params]
    if spec.query is not None:
        obj = reg._object(spec.query)
        for name, schema in obj["properties"].items():
            param = {"name": name, "in": "query", "required": name in obj.get("required", []), "schema": schema}
            if schema.get("type") == "array":
                param.update(style="form", explode=False)  # a=1,2,3, as the query parser reads lists
            params.append(param)
    if params:
        op["parameters"] = params
    if spec.body is not None:
        body_schema = reg.ref(spec.body) if spec.body is not dict else {"type": "object"}
        op["requestBody"] = {"required": spec.body_required,
                             "content": {"application/json": {"schema": body_schema}}}
        if not spec.body_required:
            notes.append("The body may be left out; every field then takes its default.")
    responses: dict[str, Any] = {}
    for status, description in declared_statuses(spec).items():
        if status >= 400:
            content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        elif spec.stream:
            content = {spec.stream: {"schema": {"type": "string", "format": "binary"}}}
        elif status in (204, 302, 304):
            content = {}
        else:
            schema = reg.of(spec.response) if spec.response is not None else {"type": "object"}
            content = {"application/json": {"schema": schema}}
        responses[str(status)] = {"description": description, **({"content": content} if content else {})}
    op["responses"] = responses
    op["security"] = SECURITY.get(spec.auth, BEARER)
    if spec.auth is Auth.MACHINE:
        notes.append("Also accepted without a token through the VMA's SSH tunnel (a loopback peer owned by the "
                     "tunnel user).")
    if spec.auth is Auth.PEER:
        notes.append("The uid of the unix socket's peer is checked (SO_PEERCRED).")
    if notes:
        op["description"] = " ".join(notes)
    return op


def document(routes: list[BoundRoute], prefix: str = "", *, title: str, description: str) -> dict[str, Any]:
    """The document of `routes` served under `prefix`; the bearer scheme is declared where a route uses it."""
    reg = SchemaRegistry()
    paths: dict[str, dict[str, Any]] = {}
    for n, bound in enumerate(routes):
        spec = bound.spec
        path = prefix + _PARAM.sub(r"{\1}", spec.path)
        op_id = f"{spec.method.lower()}_{bound.handler.__name__}_{n}"
        paths.setdefault(path, {})[spec.method.lower()] = _operation(reg, spec, op_id)
    reg.components["Error"] = ERROR_SCHEMA
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": title, "version": __version__,
                 "description": f"{description} Every operation lists every status it answers; a method a path "
                                "does not serve is a 405 with `Allow`."},
        "servers": [{"url": "/"}],
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": reg.components},
    }
    if any(b.spec.auth not in (Auth.PUBLIC, Auth.PEER) for b in routes):
        doc["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "a session token from POST /auth/login, or an API token (omactl token create)"}}
        doc["security"] = BEARER
    return doc


class AgentDocs:
    """GET /openapi.json on an agent's socket: the document of every route the agent serves."""

    def __init__(self, daemon: str, description: str) -> None:
        self.daemon = daemon
        self.description = description
        self.doc: dict[str, Any] = {}

    def build(self, routes: list[BoundRoute]) -> None:
        self.doc = document(routes, title=f"{self.daemon} agent API", description=self.description)

    @route("GET", "/openapi.json", auth=Auth.PEER, tags=("docs",))
    async def openapi(self, call: Call) -> dict[str, Any]:
        """This agent's OpenAPI 3 document."""
        return self.doc
