"""The OpenAPI 3 document, generated from the declared routes and their schemas; the bundled Swagger UI."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from oma_common import openapi
from oma_common.web import Auth, BoundRoute, Call, route

DESCRIPTION = "The OMA appliance's API (target side of VMware → CloudStack protection)."


def document(routes: list[BoundRoute], prefix: str) -> dict[str, Any]:
    return openapi.document(routes, prefix, title="OMA API", description=DESCRIPTION)


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
