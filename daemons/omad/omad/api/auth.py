"""POST /auth/login for people ({username, password}) and machines ({appliance_id, token, version}); logout."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from oma_common.errors import Invalid, RateLimited, Unauthorized
from oma_common.schema import name_spec, spec
from oma_common.web import Auth, Call, json_response, now_rfc3339, route

from ..auth.service import AuthService
from .guard import bearer


@dataclasses.dataclass
class LoginIn:
    """Either a username and password, or an appliance id and its API token."""

    username: str | None = name_spec(None, max_length=64)
    password: str | None = spec(None, max_length=1024)
    appliance_id: str | None = name_spec(None, max_length=256)
    token: str | None = spec(None, max_length=1024)
    version: str | None = name_spec(None, max_length=64)


@dataclasses.dataclass
class LoginOut:
    success: bool
    session_token: str
    expires_at: str
    role: str


class AuthApi:
    def __init__(self, auth: AuthService) -> None:
        self.auth = auth

    @route("POST", "/auth/login", errors=(Unauthorized, RateLimited),
           body=LoginIn, response=LoginOut, auth=Auth.PUBLIC, tags=("auth",))
    async def login(self, call: Call) -> Any:
        """Open a session; 401 `{success: false, error_message}` when the credentials are refused."""
        b: LoginIn = call.body
        source = call.request.remote or "unknown"
        try:
            if b.username is not None and b.password is not None:
                session = await self.auth.login_password(b.username, b.password, source)
            elif b.token is not None:
                session = await self.auth.login_token(b.appliance_id or "", b.token, b.version or "", source)
            else:
                raise Invalid("invalid body", "send {username, password} or {appliance_id, token, version}")
        except Unauthorized as e:
            # The clients in the field read success/error_message; the common error fields ride along.
            return json_response({"success": False, "error_message": e.message, "error": e.message,
                                  "details": e.details, "code": e.code, "timestamp": now_rfc3339()},
                                 status=401)
        return {"success": True, "session_token": session.session_token, "expires_at": session.expires_at,
                "role": session.principal.role}

    @route("POST", "/auth/logout", tags=("auth",))
    async def logout(self, call: Call) -> dict[str, Any]:
        """End the calling session."""
        await self.auth.logout(bearer(call.request), call.actor)
        return {"success": True}

    @route("GET", "/auth/me", tags=("auth",))
    async def me(self, call: Call) -> dict[str, Any]:
        """Who the bearer token belongs to."""
        p = call.principal
        return {"name": p.name, "role": p.role, "kind": p.kind}


__all__ = ["AuthApi", "web"]
