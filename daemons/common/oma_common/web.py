"""The HTTP edge every daemon shares: declared routes, input parsing, and the one JSON error shape.

Handlers are methods of small API classes built with their collaborators. A handler is declared with
``@route("POST", "/things", body=ThingIn, status=201)``, receives a ``Call`` (parsed body and query,
path parameters, the caller) and returns a dict, a list or a StreamResponse. Domain errors are mapped to
HTTP here and nowhere else.

Declaring what a route may answer (the OpenAPI document is generated from it, so it cannot drift):
- Each domain error class in ``oma_common.errors`` carries its HTTP ``status`` (NotFound 404, Conflict
  409, Unavailable 503, ...). A route lists the domain errors its handler may raise, directly or from
  the domain and clients below it: ``@route("GET", "/things/{id}", errors=(NotFound,))``. List the class
  that is raised (Exhausted, not 409); a subclass is covered by its base.
- What the edge itself answers is added from the declaration, never listed by hand: 400 when the route
  takes a body, a query or path parameters (bad input), 413 when it takes a body, 401 for every route
  that is not PUBLIC (or PEER), 403 for ADMIN routes and PEER routes (the socket's peer is refused).
- Add Unavailable (503) and TimedOut (504) wherever the handler calls an agent, the VMA or vCenter;
  RateLimited (429) where the route is rate-limited. What every route of a daemon may end in is given once to
  `collect(..., errors=...)` (omad: a full disk, 507, and a database locked past its timeout, 503).
- An error whose extras carry `retry_after` (seconds) is answered with a `Retry-After` header.
- Success statuses other than `status` (e.g. 206 for a Range download) go in `responses={206: "..."}`.
- A route that answers a status it did not declare logs "undeclared status" at WARNING; the schemathesis
  run in tests/omad/test_openapi_fuzz.py fails on it.
Bodies are required unless `body_required=False` (an absent body then parses as `{}`). Path parameters
are at most PATH_PARAM_MAX characters of valid Unicode; `params={"id": "[0-9]{1,18}"}` narrows one further
(ECMA-262, checked: 400).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from aiohttp import web

from . import errors, schema
from .logs import caller_address

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

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
    return err.status


def error_response(err: errors.OmaError, headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if "retry_after" in err.extra:  # a 429, or a 503 that passes (RFC 9110 section 10.2.3)
        headers["Retry-After"] = str(max(1, int(err.extra["retry_after"])))
    return json_response(error_body(err), status=status_of(err), headers=headers)


_HTTP_TO_DOMAIN: dict[int, type[errors.OmaError]] = {
    400: errors.Invalid, 401: errors.Unauthorized, 403: errors.Forbidden, 404: errors.NotFound,
    409: errors.Conflict, 413: errors.TooLarge, 429: errors.RateLimited,
}


def _note_undeclared(request: web.Request, status: int) -> None:
    spec = spec_of(request)
    if spec is not None and status >= 300 and status not in declared_statuses(spec):
        log.warning("undeclared status %d answered by %s %s (declare it on the route)", status, spec.method,
                    spec.path)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Every failure leaves as the one JSON error shape; internals stay in the log."""
    token = caller_address.set(request.remote or "")
    try:
        resp = await _answer(request, handler)
        _note_undeclared(request, resp.status)
        return resp
    finally:
        caller_address.reset(token)


async def _answer(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
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
        elif isinstance(e, web.HTTPMethodNotAllowed):
            # RFC 9110 section 15.5.6: a 405 lists the methods the resource does support.
            allowed = ", ".join(sorted(e.allowed_methods))
            err = errors.Invalid("method not allowed", f"{request.method} is not allowed on {request.path}; "
                                                      f"allowed: {allowed}")
            resp = error_response(err, {"Allow": allowed})
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


ErrorTypes = tuple[type[errors.OmaError], ...]


@dataclasses.dataclass
class RouteSpec:
    method: str
    path: str
    summary: str
    body: type | None = None  # a dataclass, or dict for any JSON object the handler checks itself
    query: type | None = None
    response: Any = None
    status: int = 200
    auth: Auth = Auth.USER
    tags: tuple[str, ...] = ()
    stream: str | None = None  # content type of a streamed (non-JSON) response
    errors: ErrorTypes = ()  # the domain errors the handler may raise (see the module docstring)
    body_required: bool = True
    responses: dict[int, str] = dataclasses.field(default_factory=dict)  # further success statuses
    description: str = ""
    params: dict[str, str] = dataclasses.field(default_factory=dict)  # path parameter → ECMA-262 pattern

    @property
    def path_params(self) -> list[str]:
        return [seg[1:-1].split(":", 1)[0] for seg in _segments(self.path)]


def _segments(path: str) -> list[str]:
    """The {name} or {name:regex} segments of an aiohttp path (a regex may hold braces of its own)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(path):
        if ch == "{":
            depth += 1
            if depth == 1:
                start = i
        elif ch == "}":
            depth -= 1
            if depth == 0:
                out.append(path[start:i + 1])
    return out


# aiohttp's HTTP parser answers a request line or header longer than 8190 bytes itself, in text/plain, before
# any middleware runs. Every request the document allows fits in this much (a 4096-character path in the
# query is 48 KiB percent-encoded); pass these to web.AppRunner.
REQUEST_LIMITS: dict[str, Any] = {"max_line_size": 128 * 1024, "max_field_size": 16 * 1024}

# Path parameters: at most this many characters, no NUL, valid Unicode (checked before the handler runs).
PATH_PARAM_MAX = 1024


def declared_statuses(spec: RouteSpec) -> dict[int, str]:
    """Every status the route may answer, with a description: its own, the edge's and its errors'."""
    out: dict[int, str] = {spec.status: "success"}
    out.update(spec.responses)
    if spec.body is not None or spec.query is not None or spec.path_params:
        out[400] = "invalid request (body, query or path parameters)"
    if spec.body is not None:
        out[413] = "request body too large"
    if spec.auth not in (Auth.PUBLIC, Auth.PEER):
        out[401] = "authentication required"
    if spec.auth is Auth.ADMIN:
        out[403] = "administrator only"
    if spec.auth is Auth.PEER:
        out[403] = "the socket's peer is not allowed"
    for cls in spec.errors:
        doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
        out[cls.status] = f"{out[cls.status]}; {doc}" if cls.status in out and cls.status >= 400 else doc
    return dict(sorted(out.items()))


def route(method: str, path: str, *, summary: str = "", body: type | None = None, query: type | None = None,
          response: Any = None, status: int = 200, auth: Auth = Auth.USER, tags: tuple[str, ...] = (),
          stream: str | None = None, errors: ErrorTypes = (), body_required: bool = True,
          responses: dict[int, str] | None = None, description: str = "",
          params: dict[str, str] | None = None) -> Callable[[F], F]:
    """Declare a handler method; stack several to serve aliases. `params` gives path parameters a pattern
    (checked before the handler runs: 400 when it does not match, and shown in the document)."""
    for pattern in (params or {}).values():
        schema.ecma_pattern(pattern)

    def deco(fn: F) -> F:
        specs = list(getattr(fn, "__oma_routes__", []))
        doc = (fn.__doc__ or "").strip().splitlines()
        specs.append(RouteSpec(method.upper(), path, summary or (doc[0] if doc else fn.__name__), body, query,
                               response, status, auth, tags, stream, tuple(errors), body_required,
                               dict(responses or {}), description, dict(params or {})))
        fn.__oma_routes__ = specs  # type: ignore[attr-defined]
        return fn

    return deco


@dataclasses.dataclass
class BoundRoute:
    spec: RouteSpec
    handler: Callable[[Call], Awaitable[Any]]


def collect(*apis: Any, errors: ErrorTypes = ()) -> list[BoundRoute]:
    """Every declared route of the given API objects, bound to them. `errors` are added to every route's own: what
    any request of the daemon may end in (omad: its database's full disk or lasting lock)."""
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
                    if errors:
                        spec = dataclasses.replace(spec, errors=(*spec.errors, *errors))
                    out.append(BoundRoute(spec, getattr(api, name)))
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: bytes | str) -> Any:
    """JSON as RFC 8259 has it: NaN and Infinity (which Python's json accepts) are refused."""
    return json.loads(raw, parse_constant=_no_constant)


async def read_json(request: web.Request, *, required: bool = False) -> Any:
    raw = await request.read()  # honours client_max_size: raises 413
    if not raw.strip():
        if required:
            raise errors.Invalid("missing body", "this operation needs a JSON body")
        return {}
    try:
        return loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.Invalid("malformed JSON", f"the request body is not valid JSON: {e}") from e


def _check_params(spec: RouteSpec, params: dict[str, str]) -> None:
    problems = [f"{name}: {what}" for name, value in params.items()
                for what in schema.text_problems(value, max_length=PATH_PARAM_MAX, pattern=spec.params.get(name))]
    if problems:
        raise errors.Invalid("invalid path parameter", "; ".join(problems), problems=problems)


def _endpoint(bound: BoundRoute) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    spec = bound.spec

    async def endpoint(request: web.Request) -> web.StreamResponse:
        params = dict(request.match_info)
        _check_params(spec, params)
        body: Any = None
        if spec.body is dict:
            body = await read_json(request, required=spec.body_required)
            if not isinstance(body, dict):
                raise errors.Invalid("invalid body", "the body must be a JSON object")
        elif spec.body is not None:
            body = schema.parse(spec.body, await read_json(request, required=spec.body_required))
        query = schema.parse_text(spec.query, request.query) if spec.query else None
        result = await bound.handler(Call(request, body, query, params))
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
