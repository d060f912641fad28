"""The real NBD clients the simulated VMA writes with: `qemu-img convert` for ranges, `qemu-io` for extents."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
import tempfile
from typing import Awaitable, Callable, Optional, Sequence
from urllib.parse import quote, unquote, urlsplit

from .cbt import Extent

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
NBDCOPY = "nbdcopy"
# One qemu-io process writes at most this much (its pattern files live on disk meanwhile) ...
BATCH_BYTES = 64 * 1024 * 1024
# ... and runs at most this many commands (argv stays far below the kernel's limit).
BATCH_COMMANDS = 256
# qemu-img -p prints "    (12.50/100%)\r", nbdcopy --progress=1 prints "12/100\n".
_PROGRESS = re.compile(rb"([0-9]+(?:\.[0-9]+)?)/100")


class TransferError(Exception):
    """An NBD client failed; the message carries its exit status and output."""


@dataclasses.dataclass(frozen=True)
class NbdTarget:
    host: str
    port: int
    export: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{quote(self.export, safe='')}"

    def image_opts(self, offset: Optional[int] = None, size: Optional[int] = None) -> str:
        """A qemu `--image-opts` string for this export as a raw image, optionally a window of it."""
        opts = ["driver=raw"]
        if offset is not None:
            opts += [f"offset={offset}", f"size={size}"]
        opts += [
            "file.driver=nbd",
            "file.server.type=inet",
            f"file.server.host={_esc(self.host)}",
            f"file.server.port={self.port}",
            f"file.export={_esc(self.export)}",
        ]
        return ",".join(opts)


def parse_nbd_url(url: str) -> NbdTarget:
    """`nbd://host:port/export` (the only form the OMA hands out) → NbdTarget."""
    parts = urlsplit(url.strip())
    if parts.scheme != "nbd" or not parts.hostname:
        raise ValueError(f"unsupported NBD target {url!r} (want nbd://host:port/export)")
    try:
        port = parts.port or 10809
    except ValueError as e:
        raise ValueError(f"bad port in NBD target {url!r}") from e
    return NbdTarget(parts.hostname, port, unquote(parts.path[1:]))


def _esc(value: str) -> str:
    # QemuOpts values escape a comma by doubling it.
    return value.replace(",", ",,")


def _file_opts(path: str, offset: Optional[int] = None, size: Optional[int] = None) -> str:
    opts = ["driver=raw"]
    if offset is not None:
        opts += [f"offset={offset}", f"size={size}"]
    opts += ["file.driver=file", f"file.filename={_esc(path)}"]
    return ",".join(opts)


async def _run(argv: Sequence[str], *, cwd: Optional[str] = None,
               on_stdout: Optional[Callable[[bytes], None]] = None) -> None:
    """Run a child to completion; kill it if we are cancelled; raise TransferError on failure."""
    log.debug("run %s", " ".join(argv))
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stderr_task = asyncio.ensure_future(proc.stderr.read())
        out = bytearray()
        while True:
            chunk = await proc.stdout.read(4096)
            if not chunk:
                break
            out += chunk
            if on_stdout is not None:
                on_stdout(bytes(out[-128:]))
        err = await stderr_task
        rc = await proc.wait()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    # qemu-io exits 0 even when some commands failed on older builds: look at its output as well.
    text = (bytes(out) + err).decode(errors="replace")
    if rc != 0 or "failed:" in text:
        raise TransferError(f"{os.path.basename(argv[0])} exited {rc}: {text.strip()[-600:]}")


def _progress_parser(progress: Optional[Callable[[float], None]]) -> Callable[[bytes], None]:
    def on_stdout(out: bytes) -> None:
        found = _PROGRESS.findall(out)
        if found and progress is not None:
            progress(float(found[-1]) / 100.0)
    return on_stdout


async def copy_whole(source: str, target: NbdTarget, *, progress: Optional[Callable[[float], None]] = None) -> None:
    """Copy a whole raw image into the export: holes become write-zeroes, data is written.
    nbdcopy where installed (the fastest here), else `qemu-img convert -n -W`."""
    if shutil.which(NBDCOPY):
        # Two connections per export, like the real VMA client (CONTRACTS.md: --shared >= 5).
        argv = [NBDCOPY, "--connections=2", "--progress=1", source, target.url]
    else:
        argv = [QEMU_IMG, "convert", "-n", "-p", "-W", "-m", "16",
                "--image-opts", _file_opts(source), "--target-image-opts", target.image_opts()]
    await _run(argv, on_stdout=_progress_parser(progress))


async def convert_range(source: str, target: NbdTarget, offset: int, length: int) -> None:
    """Copy [offset, offset+length) of a raw source to the same range of the export
    (raw-format `offset`/`size` windows on both sides of `qemu-img convert -n`)."""
    argv = [QEMU_IMG, "convert", "-n",
            "--image-opts", _file_opts(source, offset, length),
            "--target-image-opts", target.image_opts(offset, length)]
    await _run(argv)


async def write_extents(
    source: str,
    target: NbdTarget,
    extents: Sequence[Extent],
    *,
    scratch_dir: str,
    on_batch: Optional[Callable[[int], Awaitable[None]]] = None,
) -> None:
    """Write each extent of `source` into the export with qemu-io: data through `write -s FILE`
    (qemu-io fills the buffer from the start of FILE, so each extent gets its own file), zeroes
    through `write -z`. Batched; `on_batch(data_bytes)` runs after each batch with the data
    (not zero) bytes it wrote."""
    batch: list[Extent] = []
    batch_bytes = 0
    for ext in extents:
        weight = 0 if ext.zero else ext.length
        if batch and (batch_bytes + weight > BATCH_BYTES or len(batch) >= BATCH_COMMANDS):
            await _write_batch(source, target, batch, scratch_dir)
            if on_batch is not None:
                await on_batch(batch_bytes)
            batch, batch_bytes = [], 0
        batch.append(ext)
        batch_bytes += weight
    if batch:
        await _write_batch(source, target, batch, scratch_dir)
        if on_batch is not None:
            await on_batch(batch_bytes)


async def _write_batch(source: str, target: NbdTarget, batch: Sequence[Extent], scratch_dir: str) -> None:
    with tempfile.TemporaryDirectory(prefix="extents-", dir=scratch_dir) as tmp:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _cut_pattern_files, source, batch, tmp)
        argv = [QEMU_IO, "--image-opts", target.image_opts()]
        for i, ext in enumerate(batch):
            if ext.zero:
                argv += ["-c", f"write -q -z {ext.offset} {ext.length}"]
            else:
                # Relative names (cwd=tmp): qemu-io splits its command line on spaces.
                argv += ["-c", f"write -q -s x{i} {ext.offset} {ext.length}"]
        await _run(argv, cwd=tmp)


def _cut_pattern_files(source: str, batch: Sequence[Extent], tmp: str) -> None:
    with open(source, "rb", buffering=0) as f:
        for i, ext in enumerate(batch):
            if ext.zero:
                continue
            data = os.pread(f.fileno(), ext.length, ext.offset)
            if len(data) != ext.length:
                raise TransferError(f"short read of {source} at {ext.offset}")
            with open(os.path.join(tmp, f"x{i}"), "wb") as out:
                out.write(data)
