"""/restore: mount a backup's disk read-only, browse it, download files and directories, unmount.

A file is sent from the descriptor restore-mounter hands over (sendfile: its bytes never enter omad); a
directory's archive is relayed from restore-mounter's stream.

A mount whose attachment died (its qemu-storage-daemon or qemu-nbd killed) shows status "broken" with `error`
(the cause) and `remount` (DELETE it, then POST /restore/mount again), from omad's own record once it learnt it;
its file operations answer 503 `mount_broken` with the same, never 500 or a truncated download when that can be
known before the first byte."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import aiohttp
from aiohttp import web

from oma_common import filestream
from oma_common.contracts.restore_mounter import ArchiveQuery as AgentArchiveQuery
from oma_common.contracts.restore_mounter import (  # the user's browsing is restore-mounter's, passed on
    CleanupStatus,
    Entry,
    Listing,
    ListQuery,
    PathQuery,
    Resources,
    UnmountQuery,
)
from oma_common.errors import CALLS_OUT, Conflict, Exhausted, Forbidden, NotFound
from oma_common.schema import name_spec, spec
from oma_common.web import Call, route

from ..restore.service import RestoreMount, RestoreMountList, RestoreService

log = logging.getLogger(__name__)
TAGS = ("restore",)
# Any segment but the fixed names beside it: DELETE /restore/mounts is not an unmount of a mount "mounts"
# (and a 405 for it lists only the methods /restore/mounts serves).
_MOUNT = "{mount_id:(?!mount$|mounts$|resources$|cleanup-status$)[^/]+}"
RELAYED = ("Content-Type", "Content-Length", "Content-Disposition")


@dataclasses.dataclass
class MountIn:
    backup_id: str = name_spec(min_length=1, max_length=256)
    disk_index: int = spec(0, min=0, max=63, description="which disk of the backup (0 = the first)")


@dataclasses.dataclass
class ArchiveQuery:
    path: str = spec(min_length=1, max_length=4096, description="directory inside the backup")
    format: Literal["zip", "tar.gz"] = "zip"


class RestoreApi:
    def __init__(self, restore: RestoreService) -> None:
        self.restore = restore

    @route("POST", "/restore/mount", errors=(NotFound, Conflict, Exhausted, *CALLS_OUT),
           body=MountIn, response=RestoreMount, status=201, tags=TAGS)
    async def mount(self, call: Call) -> RestoreMount:
        """Mount one disk of a completed backup read-only (every filesystem on it)."""
        return await self.restore.mount(call.body.backup_id, call.body.disk_index, call.actor)

    @route("GET", "/restore/mounts", errors=CALLS_OUT, response=RestoreMountList, tags=TAGS)
    async def mounts(self, call: Call) -> RestoreMountList:
        """Restore mounts not ended; status "broken" (with `error` and `remount`) when what serves one has died."""
        return await self.restore.mounts()

    @route("GET", "/restore/resources", errors=CALLS_OUT, response=Resources, tags=TAGS)
    async def resources(self, call: Call) -> Resources:
        """Mount slots and devices in use."""
        return await self.restore.resources()

    @route("GET", "/restore/cleanup-status", errors=CALLS_OUT, response=CleanupStatus, tags=TAGS)
    async def cleanup_status(self, call: Call) -> CleanupStatus:
        """The idle-expiry sweeper's state."""
        return await self.restore.cleanup_status()

    @route("GET", f"/restore/{_MOUNT}", errors=(NotFound, *CALLS_OUT), response=RestoreMount, tags=TAGS)
    async def mount_state(self, call: Call) -> RestoreMount:
        """One restore mount, also one that has ended (unmounted, expired, failed)."""
        return await self.restore.mount_state(call.params["mount_id"])

    @route("DELETE", f"/restore/{_MOUNT}", errors=(NotFound, Conflict, *CALLS_OUT), query=UnmountQuery, tags=TAGS)
    async def unmount(self, call: Call) -> dict[str, Any]:
        """Unmount and release the device (of a broken mount too: all that is left of it goes)."""
        return await self.restore.unmount(call.params["mount_id"], call.actor, call.query.force)

    @route("GET", f"/restore/{_MOUNT}/files", errors=(NotFound, Forbidden, *CALLS_OUT), query=ListQuery,
           response=Listing, tags=TAGS)
    async def files(self, call: Call) -> Listing:
        """List a directory (optionally recursive, paginated)."""
        return await self.restore.files(call.params["mount_id"], call.query)

    @route("GET", f"/restore/{_MOUNT}/file-info", errors=(NotFound, Forbidden, *CALLS_OUT), query=PathQuery,
           response=Entry, tags=TAGS)
    async def file_info(self, call: Call) -> Entry:
        """Metadata of one entry (a symlink is described, not followed)."""
        return await self.restore.file_info(call.params["mount_id"], call.query.path)

    @route("GET", f"/restore/{_MOUNT}/download", errors=(NotFound, Forbidden, *CALLS_OUT),
           query=PathQuery, tags=TAGS, stream="application/octet-stream",
           responses={206: "the requested byte range (Range)", 416: "the byte range is not satisfiable"})
    async def download(self, call: Call) -> web.StreamResponse:
        """Download one file (HTTP Range supported)."""
        async with self.restore.open_file(call.params["mount_id"], call.query.path) as f:
            return await filestream.send_file(call.request, f.fd, f.meta, stop=f.released)

    @route("GET", f"/restore/{_MOUNT}/download-directory", errors=(NotFound, Forbidden, *CALLS_OUT),
           query=ArchiveQuery, tags=TAGS,
           stream="application/zip")
    async def download_directory(self, call: Call) -> web.StreamResponse:
        """Download a directory as a zip or tar.gz stream."""
        query = AgentArchiveQuery(call.query.path, call.query.format)
        async with self.restore.archive(call.params["mount_id"], query) as upstream:
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
                # archive never looks complete.
                log.warning("restore archive of %s broke off: %s", call.params["mount_id"], e)
                if call.request.transport is not None:
                    call.request.transport.close()
            return resp
