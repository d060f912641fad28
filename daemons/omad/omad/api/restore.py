"""/restore: mount a backup's disk read-only, browse it, download files and directories, unmount."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import aiohttp
from aiohttp import web

from oma_common.errors import CALLS_OUT, Conflict, Exhausted, Forbidden, NotFound
from oma_common.schema import name_spec, spec
from oma_common.web import Call, route

from ..restore.service import RestoreService

log = logging.getLogger(__name__)
TAGS = ("restore",)
# Any segment but the fixed names beside it: DELETE /restore/mounts is not an unmount of a mount "mounts"
# (and a 405 for it lists only the methods /restore/mounts serves).
_MOUNT = "{mount_id:(?!mount$|mounts$|resources$|cleanup-status$)[^/]+}"
RELAYED = ("Content-Type", "Content-Length", "Content-Disposition", "Content-Range", "Accept-Ranges", "ETag",
           "Last-Modified")


@dataclasses.dataclass
class MountIn:
    backup_id: str = name_spec(min_length=1, max_length=256)
    disk_index: int = spec(0, min=0, max=63, description="which disk of the backup (0 = the first)")


@dataclasses.dataclass
class UnmountQuery:
    force: bool = spec(False, description="cancel running downloads and archives first")


@dataclasses.dataclass
class FilesQuery:
    path: str = spec("/", max_length=4096, description="directory inside the backup")
    recursive: bool = False
    depth: int | None = spec(None, min=1, max=1024)
    offset: int = spec(0, min=0, max=1_000_000_000)
    limit: int = spec(1000, min=1, max=10000)


@dataclasses.dataclass
class PathQuery:
    path: str = spec(min_length=1, max_length=4096, description="path inside the backup")


@dataclasses.dataclass
class ArchiveQuery:
    path: str = spec(min_length=1, max_length=4096, description="directory inside the backup")
    format: Literal["zip", "tar.gz"] = "zip"


class RestoreApi:
    def __init__(self, restore: RestoreService) -> None:
        self.restore = restore

    @route("POST", "/restore/mount", errors=(NotFound, Conflict, Exhausted, *CALLS_OUT),
           body=MountIn, status=201, tags=TAGS)
    async def mount(self, call: Call) -> dict[str, Any]:
        """Mount one disk of a completed backup read-only (every filesystem on it)."""
        return await self.restore.mount(call.body.backup_id, call.body.disk_index, call.actor)

    @route("GET", "/restore/mounts", errors=CALLS_OUT, tags=TAGS)
    async def mounts(self, call: Call) -> dict[str, Any]:
        """Active restore mounts."""
        return await self.restore.mounts()

    @route("GET", "/restore/resources", errors=CALLS_OUT, tags=TAGS)
    async def resources(self, call: Call) -> dict[str, Any]:
        """Mount slots and devices in use."""
        return await self.restore.resources()

    @route("GET", "/restore/cleanup-status", errors=CALLS_OUT, tags=TAGS)
    async def cleanup_status(self, call: Call) -> dict[str, Any]:
        """The idle-expiry sweeper's state."""
        return await self.restore.cleanup_status()

    @route("DELETE", f"/restore/{_MOUNT}", errors=(NotFound, Conflict, *CALLS_OUT), query=UnmountQuery, tags=TAGS)
    async def unmount(self, call: Call) -> dict[str, Any]:
        """Unmount and release the device."""
        return await self.restore.unmount(call.params["mount_id"], call.actor, call.query.force)

    @route("GET", f"/restore/{_MOUNT}/files", errors=(NotFound, Forbidden, *CALLS_OUT), query=FilesQuery, tags=TAGS)
    async def files(self, call: Call) -> dict[str, Any]:
        """List a directory (optionally recursive, paginated)."""
        q: FilesQuery = call.query
        return await self.restore.files(call.params["mount_id"], path=q.path, recursive=q.recursive, depth=q.depth,
                                        offset=q.offset, limit=q.limit)

    @route("GET", f"/restore/{_MOUNT}/file-info", errors=(NotFound, Forbidden, *CALLS_OUT), query=PathQuery, tags=TAGS)
    async def file_info(self, call: Call) -> dict[str, Any]:
        """Metadata of one entry (a symlink is described, not followed)."""
        return await self.restore.file_info(call.params["mount_id"], call.query.path)

    @route("GET", f"/restore/{_MOUNT}/download", errors=(NotFound, Forbidden, *CALLS_OUT),
           query=PathQuery, tags=TAGS, stream="application/octet-stream",
           responses={206: "the requested byte range (Range)", 416: "the byte range is not satisfiable"})
    async def download(self, call: Call) -> web.StreamResponse:
        """Download one file (HTTP Range supported)."""
        return await self._relay(call, "download", {"path": call.query.path})

    @route("GET", f"/restore/{_MOUNT}/download-directory", errors=(NotFound, Forbidden, *CALLS_OUT),
           query=ArchiveQuery, tags=TAGS,
           stream="application/zip")
    async def download_directory(self, call: Call) -> web.StreamResponse:
        """Download a directory as a zip or tar.gz stream."""
        return await self._relay(call, "download-directory", {"path": call.query.path, "format": call.query.format})

    async def _relay(self, call: Call, what: str, params: dict[str, str]) -> web.StreamResponse:
        """Copy restore-mounter's response to the user as it arrives; omad never opens the file itself."""
        wanted = {h: call.request.headers[h] for h in ("Range", "If-Range") if h in call.request.headers}
        async with self.restore.stream(call.params["mount_id"], what, params, wanted) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            for h in RELAYED:
                if h in upstream.headers:
                    resp.headers[h] = upstream.headers[h]
            await resp.prepare(call.request)
            try:
                async for chunk in upstream.content.iter_chunked(1024 * 1024):
                    await resp.write(chunk)
                await resp.write_eof()
            except (aiohttp.ClientError, ConnectionError) as e:
                # Headers are gone: the only honest signal left is to cut the connection, so a truncated
                # file or archive never looks complete.
                log.warning("restore stream %s of %s broke off: %s", what, call.params["mount_id"], e)
                if call.request.transport is not None:
                    call.request.transport.close()
            return resp
