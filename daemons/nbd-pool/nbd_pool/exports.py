"""qemu-nbd exports on leased ports: checked, started as supervised children, listed, stopped, and adopted.

One export per port and per name. Every operation on a port runs under that port's lock, so a release
waits for a start on the same port to finish and then stops what it started; the record of a running
export is saved as soon as it answers its first NBD handshake. When the daemon stops, the exports are
released, not stopped: a backup keeps writing while nbd-pool restarts, and the next instance adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from oma_common.errors import Conflict, Invalid, NotFound, TimedOut, Unavailable
from oma_common.process import AdoptedChild, ChildFailed, ChildNotReady, ChildUnkillable, PidMismatch, ProcessError
from oma_common.beneath import fd_path
from oma_common.blocking import run_blocking
from oma_common.statefile import Damaged, StateFile
from oma_common.timefmt import rfc3339

from .adapters.listen_fd import PortInUse
from .adapters.qemu_nbd import (
    ExportOptions,
    ExportRecord,
    QemuNbdExport,
    clients_of,
    direct_io_supported,
    fallback_options,
    io_uring_allowed,
)
from .images import ImageRoots, OpenedImage
from .pool import Lease, Pool, check_export_name, check_job_id
from .roots import BLOCK, Roots

log = logging.getLogger("nbd_pool.exports")

MIN_SHARED = 5  # the VMA's client opens 2 connections per export and reconnects (CONTRACTS.md)


def records_file(path: Path, damaged: Damaged) -> StateFile:
    """exports.json, saved without the directory fsync after the rename.

    The document only matters while the qemu-nbd processes it lists run, and a power cut (or kernel crash)
    ends every one of them. What it can leave instead of the latest document: the previous one, whole (the
    rename undone), or none (the first save undone). At start-up every record of either is a process that is
    gone (adopt_recorded checks pid, start time and cmdline, and counts it "gone"), and no export is left
    unrecorded since none survived; a crash of nbd-pool alone does not undo a rename. The file itself is still
    fsynced before the rename: a torn document would stop the daemon (Damaged.REFUSE).
    """
    return StateFile(path, "exports", damaged=damaged, sync_directory=False)


@dataclasses.dataclass(frozen=True)
class ExportEntry:
    """What is persisted about one export."""

    record: ExportRecord  # name, resolved path, address, options and the qemu-nbd's identity
    job_id: str
    requested_path: str
    started_at: float  # epoch seconds

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record.to_dict(), "job_id": self.job_id, "requested_path": self.requested_path,
                "started_at": self.started_at}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportEntry:
        return cls(ExportRecord.from_dict(d["record"]), str(d["job_id"]), str(d["requested_path"]),
                   float(d["started_at"]))


@dataclasses.dataclass
class _Live:
    entry: ExportEntry
    export: QemuNbdExport
    last_active: float  # when a client was last seen connected (or the export started)
    clients: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.entry.record.name

    @property
    def port(self) -> int:
        return self.entry.record.port


@dataclasses.dataclass(frozen=True)
class StartRequest:
    export_name: str
    port: int
    path: str
    fmt: str | None = None  # None: raw for a block device, qcow2 for a file
    read_only: bool = False
    shared: int = 10
    job_id: str | None = None


def _clients_of(targets: list[tuple[int, int]]) -> list[list[str]]:
    # Blocking (/proc/<pid>/fd, sock_diag): one executor call, and one question to the kernel, for every export.
    return [[f"{c.host}:{c.port}" for c in peers] for peers in clients_of(targets)]


class Exports:
    def __init__(self, pool: Pool, roots: Roots, store: StateFile, *, bind_address: str, options: ExportOptions,
                 ready_timeout: float = 10.0, stop_timeout: float = 10.0, program: str = "qemu-nbd",
                 clock: Callable[[], float] = time.time, images: ImageRoots | None = None) -> None:
        self.pool = pool
        self.roots = roots
        self.images = images or ImageRoots([str(r) for r in roots.configured])
        self.store = store
        self.bind_address = bind_address
        self.options = options
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.program = program
        self.clock = clock
        self._io_uring = io_uring_allowed()
        self._live: dict[str, _Live] = {}
        self._reserved: set[str] = set()  # names of exports being started
        self._port_locks: dict[int, asyncio.Lock] = {}
        self._recorded: list[ExportEntry] = []  # loaded, not yet adopted

    # --- reading -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    def on_port(self, port: int) -> _Live | None:
        return next((live for live in self._live.values() if live.port == port), None)

    def of_job(self, job_id: str) -> list[_Live]:
        return [live for live in self._live.values() if live.entry.job_id == job_id]

    def pids(self) -> set[int]:
        return {live.export.pid for live in self._live.values() if live.export.pid is not None}

    def idle_seconds(self, port: int) -> float | None:
        """Seconds since a client was last seen on the port's export; None when nothing is exported there."""
        live = self.on_port(port)
        return None if live is None else max(0.0, self.clock() - live.last_active)

    def _describe(self, live: _Live) -> dict[str, Any]:
        rec = live.entry.record
        start = rec.process.start_time or live.entry.started_at
        return {
            "pid": rec.process.pid,
            "port": rec.port,
            "export_name": rec.name,
            "path": live.entry.requested_path,
            "qcow2_path": live.entry.requested_path,  # the spec's name for it
            "resolved_path": rec.path,
            "format": rec.options.fmt,
            "read_only": rec.options.read_only,
            "job_id": live.entry.job_id,
            "bind_address": rec.host,
            "started_at": rfc3339(live.entry.started_at, timespec="seconds"),
            "uptime_seconds": round(max(0.0, self.clock() - start), 1),
            "connection_count": len(live.clients),
            "clients": list(live.clients),
            "shared_limit": rec.options.shared,
            "status": "running" if live.export.running else "exited",
        }

    async def listing(self) -> list[dict[str, Any]]:
        await self.refresh()
        return [self._describe(live) for live in sorted(self._live.values(), key=lambda x: x.port)]

    # --- locking -----------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self, ports: Iterable[int]) -> AsyncIterator[None]:
        """Hold the locks of `ports` (taken in order, so two callers never deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for port in sorted(set(ports)):
                await stack.enter_async_context(self._port_locks.setdefault(port, asyncio.Lock()))
            yield

    # --- start -------------------------------------------------------------------------------------------

    async def start(self, req: StartRequest) -> dict[str, Any]:
        """Export `req.path` on `req.port`; returns once the export has answered an NBD handshake."""
        check_export_name(req.export_name)
        if req.job_id is not None:
            check_job_id(req.job_id)
        if req.shared < MIN_SHARED:
            raise Invalid("too few connections", f"shared_connections must be at least {MIN_SHARED}")
        self.pool.check_in_range(req.port)
        self._leased_to(req.port, req.job_id)
        image = await run_blocking(self._open, req, undo=OpenedImage.close)
        try:
            return await self._start(req, image)
        finally:
            image.close()  # qemu-nbd holds its own copies of the descriptors now

    def _open(self, req: StartRequest) -> OpenedImage:
        """The image (and its backing chain) or the vouched device, opened by descriptor (images.py).
        Blocking: run in a thread."""
        resolved = self.roots.resolve(req.path)  # classifies, and vouches for block devices
        if resolved.kind == BLOCK:
            image = self.images.open_block(resolved.path, writable=not req.read_only)
            if os.fstat(image.fds[0]).st_rdev != os.stat(resolved.path).st_rdev:
                image.close()
                raise Conflict("device changed", f"{req.path} changed while it was opened; try again")
            return image
        return self.images.open_file(req.path, req.fmt or "qcow2", writable=not req.read_only)

    async def _start(self, req: StartRequest, image: OpenedImage) -> dict[str, Any]:
        fmt = image.layers[0].fmt
        # Waited for even when cancelled: the thread opens /proc/self/fd/N, a number free again once closed.
        direct = await run_blocking(direct_io_supported, Path(fd_path(image.fds[0])))
        options = fallback_options(
            dataclasses.replace(self.options, fmt=fmt, read_only=req.read_only, shared=req.shared),
            direct_io=direct, io_uring=self._io_uring)
        rid = f"export {req.export_name}@{req.port}"
        async with self.locked([req.port]):
            lease = self._leased_to(req.port, req.job_id)  # again: it may have been released while we waited
            self._check_free(req, image.path)
            export = QemuNbdExport(image.path, req.export_name, self.bind_address, req.port, options,
                                   resource_id=rid, program=self.program, logger=log, source=image.image_opts(),
                                   pass_fds=image.fds)
            self._reserved.add(req.export_name)
            try:
                info = await export.start(timeout=self.ready_timeout)
            except PortInUse as exc:
                # Someone else's listener: this lease can never be served. Free it so the job allocates another.
                await self.pool.release(ports=[req.port])
                raise Conflict("port held by another process",
                               f"port {req.port} is bound by a process that is not an nbd-pool export ({exc}); "
                               f"its lease is released, allocate another port") from exc
            except OSError as exc:
                raise Unavailable("cannot listen", f"{self.bind_address}:{req.port}: {exc.strerror or exc}") from exc
            except ChildNotReady as exc:
                raise TimedOut("export did not come up", str(exc)) from exc
            except ChildFailed as exc:
                cls = Conflict if "lock" in exc.stderr_tail.lower() else Invalid
                raise cls("qemu-nbd refused the export", str(exc)) from exc
            finally:
                self._reserved.discard(req.export_name)
            entry = ExportEntry(export.record, lease.job_id, req.path, self.clock())
            live = _Live(entry, export, self.clock())
            self._live[req.export_name] = live
            try:
                await self._save()
            except BaseException:
                # Not recorded means not ours after a crash: do not leave it running unrecorded.
                del self._live[req.export_name]
                await export.stop(timeout=self.stop_timeout)
                raise
            await self.pool.name_export(req.port, req.export_name)
        if options != dataclasses.replace(self.options, fmt=fmt, read_only=req.read_only, shared=req.shared):
            log.info("%s: cache=%s aio=%s (the configured flags do not work for %s on this host)", rid,
                     options.cache, options.aio, image.path)
        out = self._describe(live)
        out["size"] = info.size
        return out

    def _leased_to(self, port: int, job_id: str | None) -> Lease:
        lease = self.pool.lease(port)
        if lease is None:
            raise Invalid("port not allocated", f"port {port} is not leased to any job; allocate it first")
        if job_id is not None and lease.job_id != job_id:
            raise Invalid("port leased to another job", f"port {port} is leased to job {lease.job_id}, not {job_id}")
        return lease

    def _check_free(self, req: StartRequest, path: Path) -> None:
        if req.export_name in self._live or req.export_name in self._reserved:
            raise Conflict("export name in use", f"an export named {req.export_name} is already running")
        other = self.on_port(req.port)
        if other is not None:
            raise Conflict("port busy", f"port {req.port} already serves export {other.name} (pid {other.export.pid})")
        for live in self._live.values():
            if Path(live.entry.record.path) == path and not (req.read_only and live.entry.record.options.read_only):
                raise Conflict("image already exported",
                               f"{req.path} is exported as {live.name} on port {live.port}; an image is exported "
                               f"writable once, or read-only any number of times")

    # --- stop --------------------------------------------------------------------------------------------

    def _find(self, pid: int | None, name: str | None) -> _Live:
        if name is not None:
            live = self._live.get(name)
            if live is None or (pid is not None and live.export.pid != pid):
                raise NotFound("export not found", f"no running export named {name}"
                               + (f" with pid {pid}" if pid is not None else ""))
            return live
        live = next((x for x in self._live.values() if x.export.pid == pid), None)
        if live is None:
            raise NotFound("export not found", f"no export of nbd-pool runs as pid {pid}")
        return live

    async def stop(self, *, pid: int | None = None, name: str | None = None) -> int:
        """Stop one export (terminate → wait → kill); its port stays leased. Returns the pid it had."""
        if pid is None and name is None:
            raise Invalid("say which export", "send pid or export_name")
        live = self._find(pid, name)
        async with self.locked([live.port]):
            if self._live.get(live.name) is not live:
                raise NotFound("export not found", f"export {live.name} was stopped meanwhile")
            stopped = await self.stop_locked(live.port)
        assert stopped is not None
        return stopped

    async def stop_locked(self, port: int) -> int | None:
        """Stop the export on `port`; the caller holds the port's lock. Returns its pid, None if none ran."""
        live = self.on_port(port)
        if live is None:
            return None
        pid = live.entry.record.process.pid
        try:
            await live.export.stop(timeout=self.stop_timeout)
        except (ChildUnkillable, ProcessError) as exc:
            raise Unavailable("export did not stop", str(exc)) from exc
        self._live.pop(live.name, None)
        await self._save()
        log.info("export %s@%d (job %s): stopped pid %d", live.name, port, live.entry.job_id, pid)
        return pid

    # --- supervision -------------------------------------------------------------------------------------

    async def refresh(self) -> list[ExportEntry]:
        """Drop exports whose qemu-nbd has exited (their leases stay), note who is connected to the rest.

        Returns the entries dropped. Ports being started or stopped right now are left to that operation.
        """
        gone = []
        for live in list(self._live.values()):
            lock = self._port_locks.get(live.port)
            if lock is not None and lock.locked():
                continue
            if not live.export.running:
                tail = live.export.stderr_tail()
                log.warning("export %s@%d (job %s): qemu-nbd pid %d exited on its own%s; record dropped, port "
                            "stays leased", live.name, live.port, live.entry.job_id, live.entry.record.process.pid,
                            f": {tail}" if tail else "")
                self._live.pop(live.name, None)
                gone.append(live.entry)
        if gone:
            await self._save()
        lives = list(self._live.values())
        targets = [(live.entry.record.process.pid, live.port) for live in lives]
        clients = await asyncio.get_running_loop().run_in_executor(None, _clients_of, targets)
        now = self.clock()
        for live, peers in zip(lives, clients):
            live.clients = peers
            if peers:
                live.last_active = now
        return gone

    # --- persistence, adoption, release ------------------------------------------------------------------

    def load(self) -> None:
        self._recorded = [ExportEntry.from_dict(d) for d in self.store.load()]
        log.info("%d export records loaded", len(self._recorded))

    async def _save(self) -> None:
        await self.store.save(lambda: [live.entry.to_dict() for live in sorted(self._live.values(), key=lambda x: x.port)])

    async def adopt_recorded(self) -> dict[str, int]:
        """Start-up: adopt each recorded qemu-nbd that still runs and whose port is still leased to its job;
        stop those that run without a lease (after checking /proc/<pid>/cmdline); forget the ones gone."""
        counts = {"adopted": 0, "stopped": 0, "gone": 0}
        for entry in self._recorded:
            rec = entry.record
            rid = rec.resource_id
            lease = self.pool.lease(rec.port)
            if lease is None or lease.job_id != entry.job_id or rec.name in self._live:
                try:
                    child = AdoptedChild.adopt_identity(rec.process, resource_id=rid, logger=log)
                except PidMismatch:
                    counts["gone"] += 1
                    continue
                log.warning("%s: port %d is no longer leased to job %s; stopping pid %d", rid, rec.port,
                            entry.job_id, rec.process.pid)
                try:
                    await child.stop(timeout=self.stop_timeout)
                finally:
                    child.close()
                counts["stopped"] += 1
                continue
            try:
                export = QemuNbdExport.adopt(rec, logger=log)
            except (PidMismatch, ValueError) as exc:
                log.warning("%s: not adopted (%s); the port stays leased to job %s", rid, exc, entry.job_id)
                counts["gone"] += 1
                continue
            self._live[rec.name] = _Live(entry, export, self.clock())
            counts["adopted"] += 1
        self._recorded = []
        await self._save()
        return counts

    async def release_all(self) -> int:
        """Daemon shutdown: stop supervising every export, leave it running, keep its record."""
        await self._save()
        for live in self._live.values():
            live.export.release()
        n = len(self._live)
        self._live.clear()
        return n
