"""Who may call what: bearer authentication, the admin rule, and the loopback rule for the VMA's tunnel."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from oma_common.errors import Forbidden, Unauthorized
from oma_common.web import Auth, spec_of

from ..auth.service import LOOPBACK_MACHINE, AuthService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def is_loopback(request: web.Request) -> bool:
    """True when the TCP peer is on this host's loopback (the VMA's SSH tunnel lands there)."""
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def policy_of(request: web.Request) -> Auth | None:
    """The declared policy of the matched route; None for unmatched paths (they become 404/405)."""
    spec = spec_of(request)
    if spec is not None:
        return spec.auth
    info = request.match_info
    if info.http_exception is not None:
        return None
    if isinstance(info.route.resource, web.StaticResource):
        return Auth.PUBLIC  # the bundled Swagger UI
    return Auth.USER  # anything registered without a declaration is closed, never open


def middleware(auth: AuthService) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        policy = policy_of(request)
        if policy is None:
            return await handler(request)
        if policy is Auth.PUBLIC:
            # A public route may say more to a caller who sends a valid token (e.g. /health's details);
            # a missing or bad token is not an error here.
            token = bearer(request)
            if token:
                request["principal"] = await auth.authenticate(token)
            return await handler(request)
        token = bearer(request)
        principal = await auth.authenticate(token) if token else None
        if principal is None and policy is Auth.MACHINE and not token and is_loopback(request):
            principal = LOOPBACK_MACHINE
        if principal is None:
            raise Unauthorized("authentication required",
                               "send a valid session or API token as 'Authorization: Bearer <token>'"
                               if not token else "the bearer token is unknown, expired or revoked")
        if policy is Auth.ADMIN and not principal.is_admin:
            raise Forbidden("administrator only", f"{principal.name} is not an administrator")
        request["principal"] = principal
        return await handler(request)

    return guard


class Cors:
    """Answer preflights and label every response (streamed ones too) for the GUI's origin.

    Bearer tokens, never cookies, so no credentials mode is needed.
    """

    def __init__(self, origins: list[str]) -> None:
        self.origins = origins
        self.allow_any = "*" in origins

    def headers_for(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if not origin or not (self.allow_any or origin in self.origins):
            return {}
        return {"Access-Control-Allow-Origin": "*" if self.allow_any else origin,
                "Access-Control-Expose-Headers": "Content-Disposition, Content-Range, Accept-Ranges, Retry-After",
                "Vary": "Origin"}

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            extra = self.headers_for(request)
            if not extra:
                return web.Response(status=403)
            extra.update({"Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, PATCH, OPTIONS",
                          "Access-Control-Allow-Headers": "Authorization, Content-Type, Range",
                          "Access-Control-Max-Age": "600"})
            return web.Response(status=204, headers=extra)
        return await handler(request)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(self.headers_for(request))
