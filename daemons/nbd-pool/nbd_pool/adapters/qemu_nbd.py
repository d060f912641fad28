"""qemu-nbd as a persistent NBD export on a TCP port: argv, supervised start, handshake readiness, clients.

Flag choice, measured on the 2-core Debian 12 build VM (ext4 on a virtio disk, qemu-nbd 7.2): one client
writes 1 GiB (512 MiB random, then 512 MiB of zeros written as data) into an empty image through the
export, final flush included; medians in seconds, configurations shuffled between rounds:

    qcow2 target, 7 runs each                  qemu-img convert -n   nbdcopy
    (qemu-nbd defaults: writeback, threads)           1.85            1.45
    --cache=none --aio=native                         1.60            1.67
    --cache=none --aio=native   + unmap               1.55            1.95
    --cache=none --aio=io_uring                       1.41            1.32
    --cache=none --aio=io_uring + unmap               1.33            1.03   <- defaults below

    raw file target, 5 runs each
    (qemu-nbd defaults: writeback, threads)           2.05            1.31
    --cache=writeback --aio=io_uring                  2.17            1.75
    --cache=writeback           + unmap               1.92            1.77
    --cache=none --aio=native                         1.55            2.19
    --cache=none --aio=io_uring                       1.58            1.04
    --cache=none --aio=io_uring + unmap               1.48            1.24

"+ unmap" is --discard=unmap --detect-zeroes=unmap. Single runs scatter by up to ±50 % (the virtual disk),
so only the ordering is meaningful: cache=none wins steadily (no double caching, no flush storm at the
end), io_uring beats native with nbdcopy and matches it with qemu-img, and the unmap pair costs nothing
while keeping zeros that a client writes as data from allocating space in a backup. For scale: a local
`qemu-img convert -O qcow2` of the same file takes 0.34-0.62 s whatever its -t cache mode, so one NBD
stream reaches about 0.4-0.5x of it on 2 cores, as HOST-NOTES.md says.
cache=none needs O_DIRECT: a file on tmpfs cannot be exported with it (qemu-nbd fails at start), and
aio=io_uring needs a kernel that allows io_uring (kernel.io_uring_disabled=0); the daemon may fall back to
ExportOptions(aio="threads") where it does not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from oma_common.process import AdoptedChild, ProcessIdentity, SupervisedChild

from . import listen_fd, tcp_diag
from .nbd_probe import ExportInfo, encode_name, probe_export

log = logging.getLogger("nbd_pool.qemu_nbd")

FORMATS = ("qcow2", "raw")
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
AIO_MODES = ("threads", "native", "io_uring")
DISCARD_MODES = ("ignore", "unmap")
DETECT_ZEROES_MODES = ("off", "on", "unmap")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """The qemu-nbd flags the daemon may choose; None leaves qemu-nbd's own default."""

    fmt: str = "qcow2"  # never probed: a raw image could claim to be qcow2 with a backing file of our choosing
    read_only: bool = False
    shared: int = 10  # clients at once; the VMA opens several connections per disk
    cache: str | None = "none"  # measured best, see the module docstring
    aio: str | None = "io_uring"  # measured best with nbdcopy, equal with qemu-img
    discard: str | None = "unmap"  # lets clients' trims and detected zeros free space
    detect_zeroes: str | None = "unmap"  # zero data written as data becomes an unmap (needs discard=unmap)

    def __post_init__(self) -> None:
        checks = (
            (self.fmt, FORMATS, "format"),
            (self.cache, CACHE_MODES, "cache"),
            (self.aio, AIO_MODES, "aio"),
            (self.discard, DISCARD_MODES, "discard"),
            (self.detect_zeroes, DETECT_ZEROES_MODES, "detect-zeroes"),
        )
        for value, allowed, what in checks:
            if value is not None and value not in allowed:
                raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
        if not 1 <= self.shared <= 1024:
            raise ValueError(f"shared must be 1..1024, not {self.shared}")
        # qemu refuses these combinations at start-up; say so before spawning anything.
        if self.aio == "native" and self.cache not in ("none", "directsync"):
            raise ValueError("aio=native needs cache=none or directsync (O_DIRECT)")
        if self.detect_zeroes == "unmap" and self.discard != "unmap":
            raise ValueError("detect-zeroes=unmap needs discard=unmap")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportOptions:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def build_argv(path: Path, name: str, options: ExportOptions, *, program: str = "qemu-nbd", source: str = "",
               bind: tuple[str, int] | None = None) -> list[str]:
    """The qemu-nbd command line of a persistent export; no --fork: the daemon supervises it.

    `source` is the image as qemu options (`json:{...}` over inherited descriptors, images.OpenedImage): then
    qemu opens no name of its own; the format is in those options. Without it, `path` is opened by name.
    Without `bind` (host, port), qemu-nbd is given its listener by socket activation (listen_fd.py); with
    it, qemu-nbd binds itself (exports started before nbd-pool bound their listeners, adopted as they are).
    """
    if not path.is_absolute():
        # A relative name could start with '-' or look like a "protocol:" filename to qemu.
        raise ValueError(f"export path must be absolute: {path}")
    if source and not source.startswith("json:"):
        raise ValueError("an export's source must be json: options")
    encode_name(name)
    if bind is not None and not 0 < bind[1] < 65536:
        raise ValueError(f"port {bind[1]} out of range")
    argv = [
        program,
        "--persistent",  # without it qemu-nbd exits when its first client disconnects
        *([] if source else [f"--format={options.fmt}"]),
        f"--export-name={name}",
        *([f"--bind={bind[0]}", f"--port={bind[1]}"] if bind is not None else []),
        f"--shared={options.shared}",
    ]
    if options.read_only:
        argv.append("--read-only")
    if options.cache is not None:
        argv.append(f"--cache={options.cache}")
    if options.aio is not None:
        argv.append(f"--aio={options.aio}")
    # --discard before --detect-zeroes: qemu-nbd checks detect-zeroes=unmap against the discard mode
    # already parsed (HOST-NOTES.md).
    if options.discard is not None:
        argv.append(f"--discard={options.discard}")
    if options.detect_zeroes is not None:
        argv.append(f"--detect-zeroes={options.detect_zeroes}")
    argv += ["--", source or str(path)]
    return argv


def direct_io_supported(path: Path) -> bool:
    """Whether `path` can be opened with O_DIRECT, which cache=none needs (tmpfs cannot). Blocking open(2)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def io_uring_allowed(sysctl: Path = Path("/proc/sys/kernel/io_uring_disabled")) -> bool:
    """kernel.io_uring_disabled (6.6+): 0 allows io_uring for everyone; older kernels lack the file and allow it."""
    try:
        return sysctl.read_text().strip() == "0"
    except (FileNotFoundError, PermissionError):
        return True


def fallback_options(options: ExportOptions, *, direct_io: bool, io_uring: bool) -> ExportOptions:
    """The measured defaults where the host allows them, the nearest working flags where it does not."""
    changes: dict[str, Any] = {}
    if not direct_io and options.cache in ("none", "directsync"):
        changes["cache"] = "writeback"
        if options.aio == "native":
            changes["aio"] = "threads"
    if not io_uring and options.aio == "io_uring":
        changes["aio"] = "threads"
    return dataclasses.replace(options, **changes) if changes else options


def probe_host(bind: str) -> str:
    """Where to connect to reach a server bound to `bind` (the wildcard addresses mean loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)


@dataclasses.dataclass(frozen=True)
class NbdClient:
    host: str
    port: int


@dataclasses.dataclass(frozen=True)
class ExportRecord:
    """What the daemon persists about a running export to adopt it after a restart."""

    resource_id: str
    name: str
    path: str
    host: str
    port: int
    options: ExportOptions
    process: ProcessIdentity
    source: str = ""  # the json: options qemu-nbd was given ("": it opened `path` by name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["options"] = self.options.to_dict()
        d["process"] = self.process.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportRecord:
        return cls(
            resource_id=str(data["resource_id"]),
            name=str(data["name"]),
            path=str(data["path"]),
            host=str(data["host"]),
            port=int(data["port"]),
            options=ExportOptions.from_dict(data["options"]),
            process=ProcessIdentity.from_dict(data["process"]),
            source=str(data.get("source", "")),
        )


def connected_clients(pid: int, port: int) -> list[NbdClient]:
    """Established TCP connections of `pid` on its listening `port` (blocking: /proc and netlink)."""
    return clients_of([(pid, port)])[0]


def clients_of(targets: list[tuple[int, int]]) -> list[list[NbdClient]]:
    """connected_clients of each (pid, port), asked of the kernel once for all of them (tcp_diag.py: psutil,
    which read and parsed /proc/net/tcp and tcp6 for each, took 30 ms an export)."""
    return [[NbdClient(s.remote_host, s.remote_port) for s in socks] for socks in tcp_diag.established(targets)]


class QemuNbdExport:
    """One qemu-nbd serving one image or device on one port, started here or adopted from a previous run."""

    def __init__(
        self,
        path: Path,
        name: str,
        host: str,
        port: int,
        options: ExportOptions = ExportOptions(),
        *,
        resource_id: str | None = None,
        program: str = "qemu-nbd",
        logger: logging.Logger | None = None,
        source: str = "",
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.path = path
        self.name = name
        self.host = host
        self.port = port
        self.options = options
        self.source = source
        self.pass_fds = pass_fds
        self.resource_id = resource_id or f"export {name}@{port}"
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        # The listener is bound here and handed over (listen_fd.py); `argv` is what qemu-nbd runs as.
        self.argv = build_argv(path, name, options, program=program, source=source)
        self._log = logger or log
        self._child: Union[SupervisedChild, AdoptedChild, None] = None
        self.info: ExportInfo | None = None

    @classmethod
    def adopt(cls, record: ExportRecord, *, logger: logging.Logger | None = None) -> QemuNbdExport:
        """Take over a running export from its record; raises PidMismatch if the pid is not that qemu-nbd."""
        export = cls(
            Path(record.path),
            record.name,
            record.host,
            record.port,
            record.options,
            resource_id=record.resource_id,
            program=record.process.argv[0],
            logger=logger,
            source=record.source,
        )
        if tuple(export.argv) != record.process.argv:
            # Started by an nbd-pool that let qemu-nbd bind the port itself.
            export.argv = build_argv(Path(record.path), record.name, record.options, program=record.process.argv[0],
                                     source=record.source, bind=(record.host, record.port))
            if tuple(export.argv) != record.process.argv:
                raise ValueError(f"{record.resource_id}: record argv does not match its fields")
        export._child = AdoptedChild.adopt_identity(record.process, resource_id=record.resource_id, logger=logger)
        return export

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    @property
    def record(self) -> ExportRecord:
        if self._child is None:
            raise RuntimeError(f"{self.resource_id}: not started")
        # A SupervisedChild knows the launcher's argv; the process has exec'd into qemu-nbd's since it answered.
        ident = dataclasses.replace(self._child.identity, argv=tuple(self.argv))
        return ExportRecord(self.resource_id, self.name, str(self.path), self.host, self.port, self.options, ident,
                            self.source)

    def stderr_tail(self, lines: int = 10) -> str:
        return self._child.stderr_tail(lines) if isinstance(self._child, SupervisedChild) else ""

    async def probe(self, timeout: float = 2.0) -> ExportInfo:
        return await probe_export(probe_host(self.host), self.port, self.name, timeout=timeout)

    async def start(self, timeout: float = 10.0) -> ExportInfo:
        """Bind the port, start qemu-nbd on it and return once the export answers an NBD handshake.

        Raises listen_fd.PortInUse (nothing started) when another process holds the port, ChildFailed or
        ChildNotReady when qemu-nbd does not come up (then nothing is left running and the port is free).
        """
        if self._child is not None:
            raise RuntimeError(f"{self.resource_id}: already started")
        listener = listen_fd.listen(self.host, self.port)
        try:
            fd = listener.fileno()
            child = SupervisedChild(listen_fd.launcher_argv(fd, self.argv), resource_id=self.resource_id,
                                    logger=self._log, pass_fds=(*self.pass_fds, fd))
            self._child = child

            async def ready() -> ExportInfo:
                return await self.probe(timeout=min(2.0, timeout))

            self.info = await child.start(ready, timeout=timeout, interval=0.02)
        finally:
            listener.close()  # qemu-nbd holds its own copy; ours would keep the port bound after it exits
        assert self.info is not None
        self._log.info(
            "%s: serving %s (%s, %d bytes%s) on %s:%d",
            self.resource_id, self.path, self.options.fmt, self.info.size or 0,
            ", read-only" if self.info.read_only else "", self.host, self.port,
        )  # fmt: skip
        return self.info

    async def stop(self, timeout: float = 10.0, kill_timeout: float = 5.0) -> None:
        """Terminate → wait → kill. qemu-nbd flushes the image on SIGTERM, so allow it time."""
        if self._child is not None:
            await self._child.stop(timeout=timeout, kill_timeout=kill_timeout)

    async def wait(self) -> None:
        if self._child is not None:
            await self._child.wait()

    async def clients(self) -> list[NbdClient]:
        """Clients connected now (the probe's short connections included while they last)."""
        pid = self.pid
        if pid is None or not self.running:
            return []
        return await asyncio.get_running_loop().run_in_executor(None, connected_clients, pid, self.port)

    def release(self) -> ExportRecord:
        """Leave qemu-nbd running and stop supervising it (daemon shutdown); returns the record to persist."""
        record = self.record
        if isinstance(self._child, SupervisedChild):
            self._child.release()
        elif self._child is not None:
            self._child.close()
        self._child = None
        return record
