"""restore-mounter's agent API on its unix socket (HTTP+JSON; every caller's uid checked, omad's by default).

omad calls this to serve `/api/v1/restore/*`; it never opens a file in a mount itself. Errors are the one
JSON error shape (`error`, `details`, `code`, `timestamp`, plus extra keys), mapped by oma_common.web.

Mounts
  POST   /mounts                 {image: "<absolute path>", mount_id?: "<id>"}
         → 201 Mount (200 with the existing Mount when the same mount_id and image are sent again).
         `mount_id` ([A-Za-z0-9][A-Za-z0-9_.-]{0,63}) is the caller's (omad's restore_mounts row id);
         generated ("mnt-…") when absent. The image is attached read-only (nbd-pool, or local-loop for raw
         images), every partition (or the whole disk) probed, and every recognised filesystem mounted
         read-only without journal replay, nosuid,nodev,noexec, under <mount_root>/<mount_id>/part<N>.
         Errors: 400 invalid_request (image path), 400 no_filesystem (nothing mountable; `filesystems`
         says why), 403 forbidden (image outside `image_roots`), 404 not_found (image missing),
         409 conflict (mount_id in use with another image), 409 exhausted {available_slots, max_mounts}
         (all slots used here, or nbd-pool's own `exhausted` passed through), 503 unavailable (attach failed).
  GET    /mounts                 → {mounts: [Mount], count}
  GET    /mounts/{mount_id}      → Mount. Reading a mount's status is not activity: it does not postpone expiry.
  DELETE /mounts/{mount_id}?force=false
         → {mount_id, status: "unmounted", message}. Filesystems unmounted (FUSE daemons gone), device
         detached, directory removed. 409 busy {active_operations} while a download or archive runs
         (force=true cancels them first); 409 busy also when a filesystem stays busy (status "error",
         retried by the sweep); 404 unknown id.

  Mount = {mount_id, image, mount_path, status ("mounting"|"mounted"|"unmounting"|"error"), device,
           backend ("kernel-nbd"|"fuse-loop"|"local-loop"), attachment_id, filesystem_type (first mounted),
           created_at, last_activity_at, expires_at (RFC 3339, UTC), idle_timeout_seconds, in_use,
           active_operations, error,
           filesystems: [{partition (0 = whole disk), device, type, label, size, mounted, driver,
                          path (browse path: "/" or "/part<N>"; null if not mounted), reason}]}
  With one mounted filesystem the browse root "/" is that filesystem; with several, "/" lists
  "part<N>" directories and paths start with one of them.

Files (each counts as activity; downloads and archives hold the mount while they stream)
  GET /mounts/{id}/files?path=/&recursive=false&depth=&offset=0&limit=1000
      → {mount_id, path, files: [Entry], total_count, offset, limit, recursive, depth, truncated}
      Sorted by name; recursive is depth-first, at most `depth` levels (≤ list_max_depth) and
      list_max_entries entries (then truncated=true). Symlinks are listed, never followed by a listing.
  GET /mounts/{id}/file-info?path=P → Entry (a final symlink described, not followed)
      Entry = {name, path, type ("file"|"directory"|"symlink"|"char_device"|"block_device"|"fifo"|
               "socket"|"unknown"), size, mode ("0644"), uid, gid, mtime (epoch s), modified_at,
               symlink_target, mime_type (files)}
  GET /mounts/{id}/download?path=P   [Range: bytes=…] [If-Range: <ETag>]
      → 200 or 206 with the bytes; Content-Length, Content-Type, Content-Disposition (RFC 6266),
        Accept-Ranges, ETag, Last-Modified, Content-Range (206). One range; several are answered in full.
        416 (JSON error + Content-Range: bytes */size) when the range lies outside the file.
  GET /mounts/{id}/download-directory?path=/&format=zip|tar.gz
      → 200 chunked stream, Content-Type application/zip or application/gzip, Content-Disposition
        "<dir>.zip"/"<dir>.tar.gz" (the mount id for "/"). Members are "<dir>/…"; symlinks stored as links;
        device nodes, FIFOs, sockets and unreadable entries are left out and listed in a last member
        OMA-RESTORE-SKIPPED.json. A failure after the first byte aborts the connection (the archive is
        then visibly incomplete), it never ends it cleanly.
  Path rules: "/" is the backup's root, never the host's; NUL bytes, ".." components, over-long paths → 400
  invalid_path; a path or symlink leading out of the filesystem → 403 path_escapes_mount; device nodes,
  FIFOs, sockets → 403 special_file; missing → 404; a directory where a file is needed → 400.

Monitoring
  GET /cleanup-status → {running, cleanup_interval, idle_timeout, active_mount_count, expired_mount_count
                         (expired, waiting for the next sweep), expired_total, sweeps, last_sweep_at, last_error}
  GET /resources      → {active_mounts, slots_in_use, max_mounts, available_slots, allocated_devices:
                         [{mount_id, device, backend, partitions}], device_utilization (percent), attach_backend}
  GET /health         → the common agent health, with active_mounts and max_mounts
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import Executor
from email.utils import formatdate
from typing import IO, Any, Literal, TypeVar, cast

from aiohttp import web

from oma_common import errors, schema
from oma_common.web import Auth, Call, error_body, json_response, route

from . import archive, files
from .expiry import Sweeper
from .mounts import MOUNT_ID, MountManager
from .records import MOUNTED
from .streams import ChunkPipe, Unsatisfiable, content_disposition, parse_range

log = logging.getLogger(__name__)

T = TypeVar("T")
READ_CHUNK = 1024 * 1024
SEND_BUFFER = 4 * 1024 * 1024
TAGS = ("restore",)


@dataclasses.dataclass
class MountIn:
    """Attach and mount an image."""

    image: str = schema.spec(min_length=1, max_length=4096, description="absolute path of the image")
    mount_id: str | None = schema.spec(None, pattern=MOUNT_ID.pattern,
                                       description="the caller's id for the mount; generated when absent")


@dataclasses.dataclass
class UnmountQuery:
    force: bool = schema.spec(False, description="cancel running downloads and archives first")


@dataclasses.dataclass
class ListQuery:
    path: str = schema.spec("/", max_length=8192, description="directory inside the backup")
    recursive: bool = schema.spec(False, description="descend into subdirectories")
    depth: int | None = schema.spec(None, min=1, max=1024, description="levels when recursive")
    offset: int = schema.spec(0, min=0, description="first entry of the page")
    limit: int = schema.spec(1000, min=1, max=10000, description="entries in the page")


@dataclasses.dataclass
class PathQuery:
    path: str = schema.spec(min_length=1, max_length=8192, description="path inside the backup")


@dataclasses.dataclass
class ArchiveQuery:
    path: str = schema.spec("/", max_length=8192, description="directory inside the backup")
    format: Literal["zip", "tar.gz"] = schema.spec("zip", description="archive format")


def _abort(request: web.Request) -> None:
    """End the connection without finishing the body: a truncated stream must never look complete."""
    if request.transport is not None:
        request.transport.abort()


class RestoreApi:
    def __init__(self, manager: MountManager, browser: files.Browser, sweeper: Sweeper, archives: Executor,
                 compress_level: int = 6) -> None:
        self.manager = manager
        self.browser = browser
        self.sweeper = sweeper
        self.archives = archives
        self.compress_level = compress_level

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run filesystem work in a thread; if we are cancelled, wait for the thread before going on (it
        uses descriptors inside the mount, which must be closed before the mount is released)."""
        fut = asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await fut
            raise

    # --- mounts ---

    @route("POST", "/mounts", body=MountIn, status=201, auth=Auth.PEER, tags=TAGS)
    async def create(self, call: Call) -> web.StreamResponse:
        """Attach an image read-only and mount its filesystems."""
        m, created = await self.manager.mount(call.body.image, call.body.mount_id)
        return json_response(self.manager.describe(m), status=201 if created else 200)

    @route("GET", "/mounts", auth=Auth.PEER, tags=TAGS)
    async def list_mounts(self, call: Call) -> dict[str, Any]:
        """Every restore mount."""
        mounts = [self.manager.describe(m) for m in self.manager.all()]
        return {"mounts": mounts, "count": len(mounts)}

    @route("GET", "/mounts/{mount_id}", auth=Auth.PEER, tags=TAGS)
    async def get_mount(self, call: Call) -> dict[str, Any]:
        """One mount's status (not activity)."""
        return self.manager.describe(self.manager.get(call.params["mount_id"]))

    @route("DELETE", "/mounts/{mount_id}", query=UnmountQuery, auth=Auth.PEER, tags=TAGS)
    async def delete_mount(self, call: Call) -> dict[str, Any]:
        """Unmount, detach and remove a mount."""
        mount_id = call.params["mount_id"]
        await self.manager.unmount(mount_id, force=call.query.force)
        return {"mount_id": mount_id, "status": "unmounted", "message": "backup unmounted successfully"}

    # --- files ---

    @route("GET", "/mounts/{mount_id}/files", query=ListQuery, auth=Auth.PEER, tags=TAGS)
    async def list_files(self, call: Call) -> dict[str, Any]:
        """List a directory of the backup (a page; optionally recursive)."""
        q = call.query
        async with self.manager.use(call.params["mount_id"]) as m:
            page = await self._blocking(self.browser.listing, m, q.path, recursive=q.recursive, depth=q.depth,
                                        offset=q.offset, limit=q.limit)
        return {"mount_id": m.mount_id, **page}

    @route("GET", "/mounts/{mount_id}/file-info", query=PathQuery, auth=Auth.PEER, tags=TAGS)
    async def file_info(self, call: Call) -> dict[str, Any]:
        """Metadata of one entry (a symlink is described, not followed)."""
        async with self.manager.use(call.params["mount_id"]) as m:
            return await self._blocking(self.browser.stat, m, call.query.path)

    @route("GET", "/mounts/{mount_id}/download", query=PathQuery, auth=Auth.PEER, tags=TAGS,
           stream="application/octet-stream")
    async def download(self, call: Call) -> web.StreamResponse:
        """Stream one regular file, honouring a single byte range."""
        request = call.request
        async with self.manager.use(call.params["mount_id"]) as m:
            fd, st, name = await self._blocking(self.browser.open, m, call.query.path)
            try:
                return await self._send_file(request, fd, st, name)
            finally:
                os.close(fd)

    async def _send_file(self, request: web.Request, fd: int, st: os.stat_result, name: str) -> web.StreamResponse:
        size = st.st_size
        etag = f'"{st.st_ino:x}-{size:x}-{st.st_mtime_ns:x}"'
        if_range = request.headers.get("If-Range")
        try:
            rng = parse_range(request.headers.get("Range"), size) if if_range in (None, etag) else None
        except Unsatisfiable:
            err = errors.Invalid("range not satisfiable", f"the file has {size} bytes")
            return json_response(error_body(err), status=416, headers={"Content-Range": f"bytes */{size}"})
        resp = web.StreamResponse(status=206 if rng else 200)
        resp.headers.update({
            "Accept-Ranges": "bytes", "ETag": etag, "Content-Disposition": content_disposition(name),
            "Content-Type": files.entry(name, "", st)["mime_type"],
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
        })
        start, length = (rng.start, rng.length) if rng else (0, size)
        if rng:
            resp.headers["Content-Range"] = rng.content_range(size)
        resp.content_length = length
        await resp.prepare(request)  # a StreamResponse sends its headers now: the body may follow by sendfile
        try:
            await self._copy(request, resp, fd, start, length, name)
            await resp.write_eof()
        except ConnectionError:
            log.info("download of %s stopped: the client went away", name)
        except Exception:
            log.exception("download of %s failed after its first byte; aborting the response", name)
            _abort(request)
        return resp

    async def _copy(self, request: web.Request, resp: web.StreamResponse, fd: int, start: int, length: int,
                    name: str) -> None:
        """sendfile(2) from the file to the socket (zero-copy), or read-and-write where it is unavailable."""
        if request.transport is None:
            raise ConnectionResetError("connection lost")
        # Bigger bites per wake-up: a deeper socket buffer, and the kernel's readahead doubled for the file.
        sock = request.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_SEQUENTIAL)
        with open(fd, "rb", buffering=0, closefd=False) as f:
            try:
                await asyncio.get_running_loop().sendfile(request.transport, f, start, length)
                return
            except NotImplementedError:
                pass
        pos, end = start, start + length
        while pos < end:
            data = await self._blocking(os.pread, fd, min(READ_CHUNK, end - pos), pos)
            if not data:
                raise OSError(f"{name} ended at {pos} of {end - start} bytes")
            await resp.write(data)
            pos += len(data)

    @route("GET", "/mounts/{mount_id}/download-directory", query=ArchiveQuery, auth=Auth.PEER, tags=TAGS,
           stream="application/zip")
    async def download_directory(self, call: Call) -> web.StreamResponse:
        """Stream a directory as zip or tar.gz."""
        request, q = call.request, call.query
        async with self.manager.use(call.params["mount_id"]) as m:
            name = await self._blocking(self.browser.check_dir, m, q.path)
            top = name if name != "/" else m.mount_id
            content_type, suffix = archive.FORMATS[q.format]
            loop = asyncio.get_running_loop()
            pipe = ChunkPipe(loop)

            def produce() -> list[dict[str, str]]:
                try:
                    with contextlib.closing(files.archive_items(m, q.path, top)) as items:
                        skipped = archive.write(q.format, cast(IO[bytes], pipe), items, self.compress_level)
                    pipe.finish()
                    return skipped
                except BaseException as e:
                    pipe.fail(e)
                    raise

            producer = loop.run_in_executor(self.archives, produce)
            resp = web.StreamResponse(headers={"Content-Type": content_type,
                                               "Content-Disposition": content_disposition(top + suffix)})
            resp.enable_chunked_encoding()
            try:
                await resp.prepare(request)
                async for chunk in pipe.chunks():
                    await resp.write(chunk)
                await resp.write_eof()
                skipped = await producer
                log.info("archive %s of %s: %d bytes, %d entries skipped", q.format, q.path, pipe.bytes_written,
                         len(skipped))
            except ConnectionError:
                log.info("archive of %s stopped: the client went away", q.path)
            except Exception as e:
                log.warning("archive of %s failed after its first byte (%s); aborting the response", q.path, e)
                _abort(request)
            finally:
                pipe.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait([producer])  # the thread holds descriptors inside the mount
                if producer.done() and not producer.cancelled():
                    producer.exception()  # retrieved: its failure is already logged above
            return resp

    # --- monitoring ---

    @route("GET", "/cleanup-status", auth=Auth.PEER, tags=TAGS)
    async def cleanup_status(self, call: Call) -> dict[str, Any]:
        """The idle-expiry sweep and what it has done."""
        mounts = self.manager.all()
        return {**self.sweeper.status(), "idle_timeout": self.manager.policy.idle_timeout,
                "active_mount_count": sum(m.record.status == MOUNTED for m in mounts),
                "expired_mount_count": len(self.manager.expired())}

    @route("GET", "/resources", auth=Auth.PEER, tags=TAGS)
    async def resources(self, call: Call) -> dict[str, Any]:
        """Mount slots and the devices in use."""
        return self.manager.resources()
