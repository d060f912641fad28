"""The OpenAPI 3 document, generated from the declared routes and their schemas; the bundled Swagger UI."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from oma_common import __version__
from oma_common.schema import SchemaRegistry
from oma_common.web import PATH_PARAM_MAX, Auth, BoundRoute, Call, RouteSpec, declared_statuses, route

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every error: `error` (short), `details` (long), a stable `code`; some add fields (e.g. "
                   "`problems`, one line per invalid input; `retry_after`).",
    "required": ["error", "details", "code", "timestamp"],
    "properties": {"error": {"type": "string"}, "details": {"type": "string"}, "code": {"type": "string"},
                   "timestamp": {"type": "string", "format": "date-time"}},
}
BEARER = [{"bearer": []}]
SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    Auth.PUBLIC: [],
    Auth.MACHINE: [*BEARER, {}],  # {}: no token at all, accepted from a loopback peer only
    Auth.USER: BEARER,
    Auth.ADMIN: BEARER,
}


def _operation(reg: SchemaRegistry, spec: RouteSpec, operation_id: str) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": spec.summary, "operationId": operation_id,
                          "tags": list(spec.tags) or [spec.path.strip("/").split("/")[0]]}
    notes = [spec.description] if spec.description else []
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", "minLength": 1, "maxLength": PATH_PARAM_MAX}}
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
        notes.append("Also accepted without a token from a loopback peer (the VMA's tunnel).")
    if notes:
        op["description"] = " ".join(notes)
    return op


def document(routes: list[BoundRoute], prefix: str) -> dict[str, Any]:
    reg = SchemaRegistry()
    paths: dict[str, dict[str, Any]] = {}
    for n, bound in enumerate(routes):
        spec = bound.spec
        path = prefix + _PARAM.sub(r"{\1}", spec.path)
        op_id = f"{spec.method.lower()}_{bound.handler.__name__}_{n}"
        paths.setdefault(path, {})[spec.method.lower()] = _operation(reg, spec, op_id)
    reg.components["Error"] = ERROR_SCHEMA
    return {
        "openapi": "3.0.3",
        "info": {"title": "OMA API", "version": __version__,
                 "description": "The OMA appliance's API (target side of VMware → CloudStack protection). "
                                "Every operation lists every status it answers; a method a path does not "
                                "serve is a 405 with `Allow`."},
        "servers": [{"url": "/"}],
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": reg.components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "a session token from POST /auth/login, "
                                                                     "or an API token (omactl token create)"}}},
        "security": BEARER,
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

    @route("GET", "/swagger", auth=Auth.PUBLIC, tags=("docs",), status=302)
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
