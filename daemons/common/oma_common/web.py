"""The HTTP edge every daemon shares: declared routes, input parsing, and the one JSON error shape.

Handlers are methods of small API classes built with their collaborators. A handler is declared with
``@route("POST", "/things", body=ThingIn, status=201)``, receives a ``Call`` (parsed body and query,
path parameters, the caller) and returns a dict, a list or a StreamResponse. Domain errors are mapped to
HTTP here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from . import errors, schema

log = logging.getLogger(__name__)

STATUS: dict[type[errors.OmaError], int] = {
    errors.Invalid: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Exhausted: 409,
    errors.TooLarge: 413,
    errors.RateLimited: 429,
    errors.Internal: 500,
    errors.Unavailable: 503,
    errors.TimedOut: 504,
}


class Auth(str, enum.Enum):
    """Who may call a route. Everything is USER unless declared otherwise."""

    PUBLIC = "public"  # no credentials at all (health, login, docs, enrollment)
    MACHINE = "machine"  # the VMA's tunnel: no token from the tunnel user's loopback socket, or any valid token
    USER = "user"  # a valid session or API token
    ADMIN = "admin"  # a valid session or token of an administrator
    PEER = "peer"  # agents: the unix-socket peer's uid is checked for every request


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return schema.to_dict(o)
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, enum.Enum):
        return o.value
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def dumps(data: Any) -> str:
    return json.dumps(data, default=_json_default)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=dumps)


def error_body(err: errors.OmaError) -> dict[str, Any]:
    body = {"error": err.message, "details": err.details, "code": err.code, "timestamp": now_rfc3339()}
    for key, value in err.extra.items():
        body.setdefault(key, value)
    return body


def status_of(err: errors.OmaError) -> int:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 500


def error_response(err: errors.OmaError) -> web.Response:
    headers = {}
    if isinstance(err, errors.RateLimited) and "retry_after" in err.extra:
        headers["Retry-After"] = str(int(err.extra["retry_after"]))
    return json_response(error_body(err), status=status_of(err), headers=headers)


_HTTP_TO_DOMAIN: dict[int, type[errors.OmaError]] = {
    400: errors.Invalid, 401: errors.Unauthorized, 403: errors.Forbidden, 404: errors.NotFound,
    409: errors.Conflict, 413: errors.TooLarge, 429: errors.RateLimited,
}


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Every failure leaves as the one JSON error shape; internals stay in the log."""
    try:
        return await handler(request)
    except errors.OmaError as e:
        if status_of(e) >= 500:
            log.warning("%s %s: %s (%s)", request.method, request.path, e.message, e.details)
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 413:
            err: errors.OmaError = errors.TooLarge("request body too large", e.text or "")
        elif e.status == 405:
            err = errors.Invalid("method not allowed", f"{request.method} is not allowed on {request.path}")
            resp = error_response(err)
            resp.set_status(405)
            return resp
        else:
            cls = _HTTP_TO_DOMAIN.get(e.status, errors.OmaError)
            err = cls(e.reason, f"{request.method} {request.path}: {e.reason}")
        resp = error_response(err)
        resp.set_status(e.status)
        return resp
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(errors.Internal("internal error", "an unexpected error occurred; see the daemon log"))


@dataclasses.dataclass
class Call:
    """What a handler gets: parsed inputs and who is calling."""

    request: web.Request
    body: Any
    query: Any
    params: dict[str, str]

    @property
    def principal(self) -> Any:
        return self.request.get("principal")

    @property
    def actor(self) -> str:
        p = self.principal
        return getattr(p, "name", None) or self.request.get("peer_name") or "anonymous"


@dataclasses.dataclass
class RouteSpec:
    method: str
    path: str
    summary: str
    body: type | None = None
    query: type | None = None
    response: Any = None
    status: int = 200
    auth: Auth = Auth.USER
    tags: tuple[str, ...] = ()
    stream: str | None = None  # content type of a streamed (non-JSON) response


def route(method: str, path: str, *, summary: str = "", body: type | None = None, query: type | None = None,
          response: Any = None, status: int = 200, auth: Auth = Auth.USER, tags: tuple[str, ...] = (),
          stream: str | None = None) -> Callable[[Any], Any]:
    """Declare a handler method; stack several to serve aliases."""

    def deco(fn: Any) -> Any:
        specs = list(getattr(fn, "__oma_routes__", []))
        doc = (fn.__doc__ or "").strip().splitlines()
        specs.append(RouteSpec(method.upper(), path, summary or (doc[0] if doc else fn.__name__), body, query,
                               response, status, auth, tags, stream))
        fn.__oma_routes__ = specs
        return fn

    return deco


@dataclasses.dataclass
class BoundRoute:
    spec: RouteSpec
    handler: Callable[[Call], Awaitable[Any]]


def collect(*apis: Any) -> list[BoundRoute]:
    """Every declared route of the given API objects, bound to them."""
    out: list[BoundRoute] = []
    for api in apis:
        # Declaration order, bases first: aiohttp 3.8 matches routes in registration order, so a literal path
        # (`/things/default`) declared before a parameter (`/things/{id}`) must also be registered first.
        seen: set[str] = set()
        for cls in reversed(type(api).__mro__):
            for name, fn in vars(cls).items():
                if name in seen or not hasattr(fn, "__oma_routes__"):
                    continue
                seen.add(name)
                for spec in fn.__oma_routes__:
                    out.append(BoundRoute(spec, getattr(api, name)))
    return out


async def read_json(request: web.Request) -> Any:
    raw = await request.read()  # honours client_max_size: raises 413
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.Invalid("malformed JSON", f"the request body is not valid JSON: {e}") from e


def _endpoint(bound: BoundRoute) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    spec = bound.spec

    async def endpoint(request: web.Request) -> web.StreamResponse:
        body = schema.parse(spec.body, await read_json(request)) if spec.body else None
        query = schema.parse_text(spec.query, request.query) if spec.query else None
        result = await bound.handler(Call(request, body, query, dict(request.match_info)))
        if isinstance(result, web.StreamResponse):
            return result
        return json_response(result, status=spec.status)

    endpoint.__oma_spec__ = spec  # type: ignore[attr-defined]
    return endpoint


def mount(app: web.Application, routes: list[BoundRoute], prefixes: tuple[str, ...] = ("",)) -> None:
    """Register routes under each prefix (e.g. "/api/v1")."""
    for prefix in prefixes:
        for bound in routes:
            app.router.add_route(bound.spec.method, prefix + bound.spec.path, _endpoint(bound))


def spec_of(request: web.Request) -> RouteSpec | None:
    """The declaration of the route a request matched, if any."""
    handler = getattr(request.match_info.route, "handler", None)
    return getattr(handler, "__oma_spec__", None)
