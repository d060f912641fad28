"""The OpenAPI 3 document, generated from the declared routes and their schemas; the bundled Swagger UI."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from oma_common import __version__
from oma_common.schema import SchemaRegistry
from oma_common.web import Auth, BoundRoute, Call, route

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "details", "code", "timestamp"],
    "properties": {"error": {"type": "string"}, "details": {"type": "string"}, "code": {"type": "string"},
                   "timestamp": {"type": "string", "format": "date-time"}},
}


def document(routes: list[BoundRoute], prefix: str) -> dict[str, Any]:
    reg = SchemaRegistry()
    paths: dict[str, dict[str, Any]] = {}
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
        else:
            op["responses"]["401"] = {"description": "authentication required", **err}
            if spec.auth is Auth.MACHINE:
                op["description"] = "Also accepted without a token through the VMA's SSH tunnel (a loopback peer owned by the tunnel user)."
            if spec.auth is Auth.ADMIN:
                op["responses"]["403"] = {"description": "administrator only", **err}
        paths.setdefault(path, {})[spec.method.lower()] = op
    reg.components["Error"] = ERROR_SCHEMA
    return {
        "openapi": "3.0.3",
        "info": {"title": "OMA API", "version": __version__,
                 "description": "The OMA appliance's API (target side of VMware → CloudStack protection)."},
        "servers": [{"url": "/"}],
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": reg.components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


class OpenApi:
    """Serves the document built once from every route omad mounted."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {}

    def build(self, routes: list[BoundRoute], prefix: str) -> None:
        self.doc = document(routes, prefix)

    @route("GET", "/openapi.json", auth=Auth.PUBLIC, tags=("docs",))
    async def openapi(self, call: Call) -> dict[str, Any]:
        """This API's OpenAPI 3 document."""
        return self.doc


class SwaggerUi:
    """Swagger UI from the files installed with the package (no CDN)."""

    def __init__(self) -> None:
        self.directory = Path(str(resources.files("omad") / "static" / "swagger"))

    @route("GET", "/swagger", auth=Auth.PUBLIC, tags=("docs",), stream="text/html")
    async def redirect(self, call: Call) -> web.StreamResponse:
        """Redirect to the Swagger UI."""
        raise web.HTTPFound(call.request.path + "/")

    @route("GET", "/swagger/", auth=Auth.PUBLIC, tags=("docs",), stream="text/html")
    async def index(self, call: Call) -> web.StreamResponse:
        """The Swagger UI page (its assets are served beside it)."""
        return web.FileResponse(self.directory / "index.html")

    def add_assets(self, app: web.Application, prefixes: tuple[str, ...]) -> None:
        for prefix in prefixes:
            app.router.add_static(prefix + "/swagger/", self.directory)
