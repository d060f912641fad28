"""restore-mounter's socket API as typed calls: restore mounts, browsing, and the files themselves.

The shapes are restore-mounter's contract, declared once in oma_common.contracts.restore_mounter (its
handlers use the same classes; its OpenAPI document is at GET /openapi.json on its socket). A file to
download is not relayed: restore-mounter hands over its open read-only descriptor (`open_file`, SCM_RIGHTS,
oma_common.fdpass) and omad sends it with sendfile. Archives are still streamed by restore-mounter.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp

from oma_common import errors, fdpass, schema
from oma_common.contracts.restore_mounter import (
    ArchiveQuery,
    CleanupStatus,
    Entry,
    Listing,
    ListQuery,
    Mount,
    MountIn,
    MountList,
    OpenedFile,
    PathQuery,
    Resources,
    Unmounted,
    UnmountQuery,
)
from oma_common.rpc import AgentClient


def _m(mount_id: str) -> str:
    return f"/mounts/{quote(mount_id, safe='')}"


class OpenFile:
    """A file restore-mounter opened for us: its descriptor, what it is, and the mount held meanwhile."""

    def __init__(self, held: fdpass.HeldFile, meta: OpenedFile) -> None:
        self.fd = held.fd
        self.meta = meta
        self._held = held

    async def released(self) -> None:
        """Completes if restore-mounter takes the file back (a forced unmount) before we are done."""
        await self._held.released()


class RestoreMounter:
    def __init__(self, client: AgentClient, *, mount_timeout: float = 120.0, open_timeout: float = 30.0) -> None:
        self.client = client
        self.mount_timeout = mount_timeout
        self.open_timeout = open_timeout

    async def mount(self, image: str, mount_id: str) -> Mount:
        return await self.client.typed(Mount, "POST", "/mounts", body=MountIn(image, mount_id),
                                       timeout=self.mount_timeout)

    async def unmount(self, mount_id: str, *, force: bool = False) -> Unmounted:
        return await self.client.typed(Unmounted, "DELETE", _m(mount_id), params=UnmountQuery(force),
                                       timeout=self.mount_timeout)

    async def mounts(self) -> list[Mount]:
        return (await self.client.typed(MountList, "GET", "/mounts")).mounts

    async def state(self, mount_id: str) -> Mount:
        """One mount as restore-mounter sees it now (it asks nbd-pool first: `broken` is current)."""
        return await self.client.typed(Mount, "GET", _m(mount_id))

    async def files(self, mount_id: str, query: ListQuery) -> Listing:
        return await self.client.typed(Listing, "GET", _m(mount_id) + "/files", params=query)

    async def file_info(self, mount_id: str, path: str) -> Entry:
        return await self.client.typed(Entry, "GET", _m(mount_id) + "/file-info", params=PathQuery(path))

    async def resources(self) -> Resources:
        return await self.client.typed(Resources, "GET", "/resources")

    async def cleanup_status(self) -> CleanupStatus:
        return await self.client.typed(CleanupStatus, "GET", "/cleanup-status")

    @contextlib.asynccontextmanager
    async def open_file(self, mount_id: str, path: str) -> AsyncIterator[OpenFile]:
        """The file's read-only descriptor (closed on leaving); the mount stays held until then."""
        held = await fdpass.request_fd(self.client.socket_path, fdpass.target(_m(mount_id) + "/open", {"path": path}),
                                       agent=self.client.name,
                                       timeout=self.open_timeout)
        try:
            try:
                meta = schema.parse(OpenedFile, json.loads(held.body), what="restore-mounter's answer")
            except (ValueError, errors.Invalid) as e:
                raise errors.Unavailable("restore-mounter answered unexpectedly", str(e)) from e
            yield OpenFile(held, meta)
        finally:
            held.close()

    @contextlib.asynccontextmanager
    async def archive(self, mount_id: str, query: ArchiveQuery) -> AsyncIterator[aiohttp.ClientResponse]:
        """restore-mounter's zip or tar.gz stream of a directory, to be relayed as it arrives."""
        params = {"path": query.path, "format": query.format}
        async with self.client.open("GET", _m(mount_id) + "/download-directory", params=params, stream=True,
                                    timeout=300) as resp:
            yield resp
