"""Builds omad's aiohttp application: middlewares in order, every API mounted at /api/v1, docs."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from oma_common.web import RouteSpec, collect, error_middleware, mount

from ..auth.service import AuthService
from ..store.db import STORAGE_ERRORS
from ..vma.tunnel import TunnelPeers
from . import guard
from .openapi import OpenApi, SwaggerUi

PREFIX = "/api/v1"
#: What any route may answer besides its own errors: each may write the database (a login's session, an API
#: token's last use, the audit), which fails on a full disk (507) or behind another process's lock (503).
EVERY_ROUTE = STORAGE_ERRORS


def specs(apis: list[Any]) -> list[RouteSpec]:
    """The routes of `apis` as the document declares them (every one with EVERY_ROUTE), e.g. for the debug API."""
    return [r.spec for r in collect(*apis, errors=EVERY_ROUTE)]


def build(apis: list[Any], auth: AuthService, *, tunnel: TunnelPeers, cors_origins: list[str],
          max_body: int) -> web.Application:
    """`apis` are the handler objects, each built with its own collaborators; `tunnel` recognises the VMA's
    tunnel, the only peer whose machine calls need no token."""
    cors = guard.Cors(cors_origins)
    middlewares: list[Any] = [cors.preflight, error_middleware, guard.middleware(auth, tunnel)]
    app = web.Application(middlewares=middlewares,
                          client_max_size=max_body)
    app.on_response_prepare.append(cors.on_prepare)
    openapi = OpenApi()
    swagger = SwaggerUi()
    routes = collect(*apis, openapi, swagger, errors=EVERY_ROUTE)
    mount(app, routes, (PREFIX,))
    # The GUI and load balancers probe /health and open /swagger/ at the root as well.
    mount(app, [r for r in routes if r.spec.path in ("/health", "/swagger", "/swagger/")], ("",))
    swagger.add_assets(app, (PREFIX, ""))
    openapi.build(routes, PREFIX)
    return app
