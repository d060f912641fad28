"""HTTP+JSON over unix sockets: the agents' server (peer checked with SO_PEERCRED) and omad's client."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from . import errors, schema
from .web import REQUEST_LIMITS, error_response

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
T = TypeVar("T")


class AlreadyRunning(Exception):
    """Another live process answers on the socket we were asked to bind."""


def resolve_uids(users: list[str | int]) -> set[int]:
    """User names or numbers to uids; names unknown on this host are skipped with a warning."""
    out: set[int] = set()
    for u in users:
        if isinstance(u, int) or str(u).isdigit():
            out.add(int(u))
            continue
        try:
            out.add(pwd.getpwnam(str(u)).pw_uid)
        except KeyError:
            log.warning("allowed user %r does not exist on this host; ignored", u)
    return out


def resolve_gid(group: str) -> int | None:
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("socket group %r does not exist on this host; the socket keeps our group", group)
        return None


def peer_credentials(request: web.Request) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of the unix socket."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        raise errors.Forbidden("peer unknown", "the connection's peer credentials cannot be read")
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def peer_check_middleware(allowed_uids: set[int]) -> Any:
    """Refuse every request whose peer uid is not allowed; remember the peer for the log."""

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        try:
            pid, uid, _ = peer_credentials(request)
        except errors.OmaError as e:
            return error_response(e)
        if uid not in allowed_uids:
            log.warning("refused %s %s from pid %d uid %d", request.method, request.path, pid, uid)
            return error_response(errors.Forbidden("peer not permitted",
                                                   f"uid {uid} may not use this socket"))
        request["peer_name"] = f"pid {pid} uid {uid}"
        return await handler(request)

    return check


async def _socket_is_live(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    writer.close()
    return True


class UnixServer:
    """Serve an aiohttp app on a unix socket created with `mode`, refusing to steal a live socket."""

    def __init__(self, app: web.Application, path: Path, *, mode: int = 0o660, group: str = "") -> None:
        self.app = app
        self.path = path
        self.mode = mode
        self.group = group
        self._runner: web.AppRunner | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if await _socket_is_live(self.path):
                raise AlreadyRunning(f"another instance is serving {self.path}")
            log.warning("removing stale socket %s left by a previous run", self.path)
            self.path.unlink()
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None, **REQUEST_LIMITS)
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(self.path))
        old = os.umask(0o777 & ~self.mode)  # the socket never exists with wider permissions
        try:
            await site.start()
        finally:
            os.umask(old)
        gid = resolve_gid(self.group)
        if gid is not None:
            os.chown(self.path, -1, gid)
        os.chmod(self.path, self.mode)
        self._inode = self.path.stat().st_ino
        log.info("listening on %s", self.path)

    async def stop(self) -> None:
        """Stop accepting, let running requests finish, remove our socket (not a successor's)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()


STREAM_BUFSIZE = 1024 * 1024  # per streamed response; aiohttp buffers up to twice this before pausing


class AgentClient:
    """omad's client for one agent; failures become domain errors (Unavailable, TimedOut, or the agent's own)."""

    def __init__(self, name: str, socket_path: Path, timeout: float = 30.0) -> None:
        self.name = name
        self.socket_path = socket_path
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket_path)))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        async with self.open(method, path, json=json, params=params, timeout=timeout) as resp:
            return await resp.json(content_type=None)

    async def typed(self, answer: type[T], method: str, path: str, *, body: Any = None,
                    params: Any = None, timeout: float | None = None) -> T:
        """A call whose request body and query are contract dataclasses (oma_common.contracts) and whose
        answer is parsed into `answer`; an answer that does not fit is the agent failing (Unavailable)."""
        query = None
        if params is not None:
            query = {k: str(v).lower() if isinstance(v, bool) else str(v)
                     for k, v in schema.to_dict(params).items() if v is not None}
        data = await self.call(method, path, json=schema.to_dict(body) if body is not None else None, params=query,
                               timeout=timeout)
        try:
            return schema.parse(answer, data, what=f"{self.name}'s answer")
        except errors.Invalid as e:
            raise errors.Unavailable(f"{self.name} answered unexpectedly", e.details) from e

    @contextlib.asynccontextmanager
    async def open(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                   timeout: float | None = None, stream: bool = False) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response whose status is 2xx (errors raised), e.g. to relay a stream.

        With `stream`, `timeout` bounds each read instead of the whole exchange: an archive may take hours,
        and the response is read in larger gulps (aiohttp's default buffer of 64 KiB pauses the socket every
        64-128 KiB, which made omad's relay a fraction of restore-mounter's own rate).
        """
        limit = timeout or self.timeout
        t = aiohttp.ClientTimeout(total=None, sock_read=limit) if stream else aiohttp.ClientTimeout(total=limit)
        try:
            async with self._client().request(method, f"http://{self.name}{path}", json=json, params=params,
                                              timeout=t, read_bufsize=STREAM_BUFSIZE if stream else None) as resp:
                if resp.status >= 400:
                    try:
                        body = await resp.json(content_type=None)
                    except (ValueError, aiohttp.ContentTypeError):
                        body = {"error": f"{self.name} answered {resp.status}", "details": await resp.text()}
                    raise errors.from_body(body if isinstance(body, dict) else {}, resp.status)
                yield resp
        except asyncio.TimeoutError as e:
            raise errors.TimedOut(f"{self.name} timed out", f"{self.name} did not answer {method} {path} "
                                                           f"within {limit} s") from e
        except aiohttp.ClientConnectionError as e:
            raise errors.Unavailable(f"{self.name} unavailable",
                                     f"cannot reach {self.name} at {self.socket_path}: {e}") from e
