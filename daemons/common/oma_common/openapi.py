"""OpenAPI 3 documents generated from declared routes and their schemas (omad's API and each agent's socket)."""

from __future__ import annotations

import re
from typing import Any

from . import __version__
from .schema import SchemaRegistry
from .web import Auth, BoundRoute, Call, route

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "details", "code", "timestamp"],
    "properties": {"error": {"type": "string"}, "details": {"type": "string"}, "code": {"type": "string"},
                   "timestamp": {"type": "string", "format": "date-time"}},
}


def document(routes: list[BoundRoute], prefix: str = "", *, title: str, description: str) -> dict[str, Any]:
    reg = SchemaRegistry()
    paths: dict[str, dict[str, Any]] = {}
    bearer = False
    for bound in routes:
        spec = bound.spec
        path = prefix + _PARAM.sub(r"{\1}", spec.path)
        op: dict[str, Any] = {"summary": spec.summary, "operationId": f"{spec.method.lower()}_{bound.handler.__name__}"
                              f"_{len(paths)}", "tags": list(spec.tags) or [spec.path.strip('/').split('/')[0]]}
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _PARAM.findall(spec.path)]
        if spec.query is not None:
            obj = reg._object(spec.query)
            for name, schema in obj["properties"].items():
                params.append({"name": name, "in": "query", "required": name in obj.get("required", []),
                               "schema": schema})
        if params:
            op["parameters"] = params
        if spec.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": reg.ref(spec.body)}}}
        if spec.stream:
            ok: dict[str, Any] = {"description": "streamed", "content": {spec.stream: {}}}
        else:
            resp_schema = reg.of(spec.response) if spec.response is not None else {"type": "object"}
            ok = {"description": "success", "content": {"application/json": {"schema": resp_schema}}}
        err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        op["responses"] = {str(spec.status): ok, "400": {"description": "invalid request", **err}}
        if spec.auth is Auth.PUBLIC:
            op["security"] = []
        elif spec.auth is Auth.PEER:
            op["security"] = []
            op["description"] = "The uid of the unix socket's peer is checked (SO_PEERCRED)."
            op["responses"]["403"] = {"description": "peer not permitted", **err}
        else:
            bearer = True
            op["responses"]["401"] = {"description": "authentication required", **err}
            if spec.auth is Auth.MACHINE:
                op["description"] = "Also accepted without a token from a loopback peer (the VMA's tunnel)."
            if spec.auth is Auth.ADMIN:
                op["responses"]["403"] = {"description": "administrator only", **err}
        paths.setdefault(path, {})[spec.method.lower()] = op
    reg.components["Error"] = ERROR_SCHEMA
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": title, "version": __version__, "description": description},
        "servers": [{"url": "/"}],
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": reg.components},
    }
    if bearer:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
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
