"""restore-mounter's agent API on its unix socket (HTTP+JSON; every caller's uid checked, omad's by default).

omad calls this to serve `/api/v1/restore/*`; it never opens a file in a mount itself (it is handed descriptors). Errors are the one
JSON error shape (`error`, `details`, `code`, `timestamp`, plus extra keys), mapped by oma_common.web.

Mounts
  POST   /mounts                 {image: "<absolute path>", mount_id?: "<id>"}
         → 201 Mount (200 with the existing Mount when the same mount_id and image are sent again).
         `mount_id` ([A-Za-z0-9][A-Za-z0-9_.-]{0,63}) is the caller's (omad's restore_mounts row id);
         generated ("mnt-…") when absent. The image is attached read-only by nbd-pool, every partition
         (or the whole disk) probed, and every recognised filesystem mounted read-only without journal
         replay, nosuid,nodev,noexec, under <mount_root>/<mount_id>/part<N>.
         Errors: 400 invalid_request (image path), 400 no_filesystem (nothing mountable; `filesystems`
         says why), 403 forbidden (image outside `image_roots`), 404 not_found (image missing),
         409 conflict (mount_id in use with another image), 409 exhausted {available_slots, max_mounts}
         (all slots used here, or nbd-pool's own `exhausted` passed through), 503 unavailable (attach failed),
         503 shutting_down {mount_id} (restore-mounter was told to stop before the mount was made: nothing of
         it is left; mount again once it is back).
  GET    /mounts                 → {mounts: [Mount], count}
  GET    /mounts/{mount_id}      → Mount. Reading a mount's status is not activity: it does not postpone expiry.
  DELETE /mounts/{mount_id}?force=false
         → {mount_id, status: "unmounted", message}. Filesystems unmounted (FUSE daemons gone), device
         detached, directory removed. 409 busy {active_operations} while a download or archive runs
         (force=true cancels them first); 409 busy also when a filesystem stays busy (status "error",
         retried by the sweep); 404 unknown id.

  Mount = {mount_id, image, mount_path, status ("mounting"|"mounted"|"unmounting"|"error"|"broken"), device,
           backend ("kernel-nbd"|"fuse-loop"), attachment_id, filesystem_type (first mounted),
           created_at, last_activity_at, expires_at (RFC 3339, UTC), idle_timeout_seconds, in_use,
           active_operations, error,
           filesystems: [{partition (0 = whole disk), device, type, label, size, mounted, driver,
                          path (browse path: "/" or "/part<N>"; null if not mounted), reason}]}
  With one mounted filesystem the browse root "/" is that filesystem; with several, "/" lists
  "part<N>" directories and paths start with one of them.
  "broken": what serves the mount died (nbd-pool's attachment: its qemu-storage-daemon or qemu-nbd; or a FUSE
  filesystem daemon); `error` says which and how. Reading the mounts or one mount asks nbd-pool first, so the
  status is current. Every file operation on it answers 503 mount_broken {mount_id, cause}; DELETE removes all
  of it (filesystems, device, nbd-pool's attachment, directory), then POST /mounts mounts the image again.
  A broken mount expires when idle like any other.

Files (each counts as activity; a handed-over file and a running archive hold the mount)
  GET /mounts/{id}/files?path=/&limit=1000&cursor=&offset=0&recursive=false&depth=
      → {mount_id, path, files: [Entry], total_count, offset, limit, recursive, depth, truncated, next_cursor}
      A page of at most `limit` (1..10000) entries, read from the directory as it goes (never whole: a guest
      directory may hold millions): sorted by name within the page, pages in the directory's own order.
      `next_cursor` (opaque) continues after the page, null at the end; `total_count` counts the entries
      listed up to the page's end (the directory's size on the last page). A cursor that is malformed or
      belongs to another directory → 400 invalid_cursor. Recursive: depth-first by name, at most `depth`
      levels (≤ list_max_depth) and list_max_entries entries (then truncated=true), paged by offset/limit,
      no cursor. Symlinks are listed, never followed by a listing.
  GET /mounts/{id}/file-info?path=P → Entry (a final symlink described, not followed)
      Entry = {name, path, type ("file"|"directory"|"symlink"|"char_device"|"block_device"|"fifo"|
               "socket"|"unknown"), size, mode ("0644"), uid, gid, mtime (epoch s), modified_at,
               symlink_target, mime_type (files)}
  GET /mounts/{id}/open?path=P
      → 200 {name, size, mtime, etag, mime_type}, the file's read-only descriptor riding on the body's bytes
        (SCM_RIGHTS, oma_common.fdpass); the mount is held until the caller closes the connection. omad
        serves its downloads from that descriptor with sendfile: the bytes never pass through either daemon.
  GET /mounts/{id}/download-directory?path=/&format=zip|tar.gz
      → 200 chunked stream, Content-Type application/zip or application/gzip, Content-Disposition
        "<dir>.zip"/"<dir>.tar.gz" (the mount id for "/"). Members are "<dir>/…", each directory's in its
        own order (the tree is walked as it streams, never read whole); symlinks stored as links;
        device nodes, FIFOs, sockets and unreadable entries are left out and listed in a last member
        OMA-RESTORE-SKIPPED.json ({skipped: [{path, reason}] (the first 10000), not_listed: N beyond them}).
        A failure after the first byte aborts the connection (the archive is
        then visibly incomplete), it never ends it cleanly.
  A read that fails the way a dead device fails (EIO, ENOTCONN, ...) makes restore-mounter ask nbd-pool; a
  download, open or archive asks before its first byte. Either way a dead attachment answers 503 mount_broken,
  not 500 and not a truncated 200 (unless it dies while the bytes flow: then the connection is cut).
  Path rules: "/" is the backup's root, never the host's; NUL bytes, ".." components, over-long paths → 400
  invalid_path; a path or symlink leading out of the filesystem → 403 path_escapes_mount; device nodes,
  FIFOs, sockets → 403 special_file; missing → 404; a directory where a file is needed → 400.

Monitoring
  GET /cleanup-status → {running, cleanup_interval, idle_timeout, active_mount_count, expired_mount_count
                         (expired, waiting for the next sweep), expired_total, sweeps, last_sweep_at, last_error}
  GET /resources      → {active_mounts, slots_in_use, max_mounts, available_slots, allocated_devices:
                         [{mount_id, device, backend, partitions}], device_utilization (percent), attach_backend}
  GET /health         → the common agent health, with active_mounts, max_mounts and broken_mounts
                         [{mount_id, error}]; status "degraded" while any mount is broken (nbd-pool asked first)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import Executor
from typing import IO, Any, cast

from aiohttp import web
from oma_common import fdpass
from oma_common.blocking import run_blocking
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
from oma_common.errors import CALLS_OUT, Conflict, Exhausted, NotFound, Unavailable
from oma_common.web import Auth, Call, dumps, json_response, route

from . import archive, files
from .expiry import Sweeper
from .mounts import Mount as MountState
from .mounts import MountManager
from .records import MOUNTED
from .streams import ChunkPipe, send_archive

log = logging.getLogger(__name__)

TAGS = ("restore",)


class RestoreApi:
    def __init__(self, manager: MountManager, browser: files.Browser, sweeper: Sweeper, archives: Executor,
                 compress_level: int = 6) -> None:
        self.manager = manager
        self.browser = browser
        self.sweeper = sweeper
        self.archives = archives
        self.compress_level = compress_level

    # --- mounts ---

    @route("POST", "/mounts", errors=(NotFound, Conflict, Exhausted, *CALLS_OUT),
           body=MountIn, response=Mount, status=201, auth=Auth.PEER, tags=TAGS)
    async def create(self, call: Call) -> web.StreamResponse:
        """Attach an image read-only and mount its filesystems."""
        m, created = await self.manager.mount(call.body.image, call.body.mount_id)
        return json_response(self.manager.describe(m), status=201 if created else 200)

    @route("GET", "/mounts", response=MountList, auth=Auth.PEER, tags=TAGS)
    async def list_mounts(self, call: Call) -> dict[str, Any]:
        """Every restore mount (nbd-pool is asked first whether their attachments are alive)."""
        await self.manager.verify()
        mounts = [self.manager.describe(m) for m in self.manager.all()]
        return {"mounts": mounts, "count": len(mounts)}

    @route("GET", "/mounts/{mount_id}", errors=(NotFound, Conflict),
           response=Mount, auth=Auth.PEER, tags=TAGS)
    async def get_mount(self, call: Call) -> dict[str, Any]:
        """One mount's status (not activity; nbd-pool is asked first whether its attachment is alive)."""
        m = self.manager.get(call.params["mount_id"])
        await self.manager.verify([m])
        return self.manager.describe(m)

    @route("DELETE", "/mounts/{mount_id}", errors=(NotFound, Conflict),
           query=UnmountQuery, response=Unmounted, auth=Auth.PEER, tags=TAGS)
    async def delete_mount(self, call: Call) -> dict[str, Any]:
        """Unmount, detach and remove a mount."""
        mount_id = call.params["mount_id"]
        await self.manager.unmount(mount_id, force=call.query.force)
        return {"mount_id": mount_id, "status": "unmounted", "message": "backup unmounted successfully"}

    # --- files ---

    @route("GET", "/mounts/{mount_id}/files", errors=(NotFound, Conflict, Unavailable), query=ListQuery, response=Listing, auth=Auth.PEER, tags=TAGS)
    async def list_files(self, call: Call) -> dict[str, Any]:
        """List a directory of the backup (a page; optionally recursive)."""
        q = call.query
        async with self.manager.use(call.params["mount_id"]) as m:
            page = await run_blocking(self.browser.listing, m, q.path, recursive=q.recursive, depth=q.depth,
                                        offset=q.offset, limit=q.limit, cursor=q.cursor)
        return {"mount_id": m.mount_id, **page}

    @route("GET", "/mounts/{mount_id}/file-info", errors=(NotFound, Conflict, Unavailable), query=PathQuery, response=Entry, auth=Auth.PEER, tags=TAGS)
    async def file_info(self, call: Call) -> dict[str, Any]:
        """Metadata of one entry (a symlink is described, not followed)."""
        async with self.manager.use(call.params["mount_id"]) as m:
            return await run_blocking(self.browser.stat, m, call.query.path)

    async def _open(self, m: MountState, path: str) -> tuple[int, OpenedFile]:
        fd, st, name = await run_blocking(self.browser.open, m, path, undo=lambda opened: os.close(opened[0]))
        return fd, OpenedFile.of(name, st, files.mime_type(name))

    @route("GET", "/mounts/{mount_id}/open", errors=(NotFound, Conflict, Unavailable), query=PathQuery, response=OpenedFile, auth=Auth.PEER, tags=TAGS)
    async def open_file(self, call: Call) -> web.StreamResponse:
        """Hand over a read-only descriptor of one regular file (SCM_RIGHTS on the answer's bytes); the mount
        is held until the caller closes the connection."""
        async with self.manager.use(call.params["mount_id"], check=True) as m:
            fd, meta = await self._open(m, call.query.path)
            try:
                resp = await fdpass.reply_with_fd(call.request, dumps(meta).encode(), fd)
            finally:
                os.close(fd)  # the descriptor in flight is the kernel's own reference
            log.info("handed over %s (%d bytes) to %s", meta.name, meta.size, call.actor)
            await fdpass.hold_until_closed(call.request)
            return resp

    @route("GET", "/mounts/{mount_id}/download-directory", errors=(NotFound, Conflict, Exhausted, Unavailable), query=ArchiveQuery, auth=Auth.PEER, tags=TAGS,
           stream="application/zip")
    async def download_directory(self, call: Call) -> web.StreamResponse:
        """Stream a directory as zip or tar.gz."""
        q = call.query
        async with self.manager.use(call.params["mount_id"], check=True) as m:
            name = await run_blocking(self.browser.check_dir, m, q.path)
            top = name if name != "/" else m.mount_id
            content_type, suffix = archive.FORMATS[q.format]
            loop = asyncio.get_running_loop()
            pipe = ChunkPipe(loop)

            def produce() -> int:
                try:
                    with contextlib.closing(files.archive_items(m, q.path, top)) as items:
                        skipped = archive.write(q.format, cast(IO[bytes], pipe), items, self.compress_level)
                    pipe.finish()
                    return skipped
                except BaseException as e:
                    pipe.fail(e)
                    raise

            producer = loop.run_in_executor(self.archives, produce)
            return await send_archive(call.request, pipe, producer, top + suffix, content_type,
                                      f"{q.format} of {q.path}")

    # --- monitoring ---

    @route("GET", "/cleanup-status", response=CleanupStatus, auth=Auth.PEER, tags=TAGS)
    async def cleanup_status(self, call: Call) -> dict[str, Any]:
        """The idle-expiry sweep and what it has done."""
        mounts = self.manager.all()
        return {**self.sweeper.status(), "idle_timeout": self.manager.policy.idle_timeout,
                "active_mount_count": sum(m.record.status == MOUNTED for m in mounts),
                "expired_mount_count": len(self.manager.expired())}

    @route("GET", "/resources", response=Resources, auth=Auth.PEER, tags=TAGS)
    async def resources(self, call: Call) -> dict[str, Any]:
        """Mount slots and the devices in use."""
        return self.manager.resources()
