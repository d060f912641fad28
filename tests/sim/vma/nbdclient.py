"""The real NBD programs the simulated VMA copies whole disks and ranges with (nbdcopy, `qemu-img convert`);
changed extents go through its own NBD client (nbdwire.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
from typing import Callable, Optional, Sequence
from urllib.parse import quote, unquote, urlsplit

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
NBDCOPY = "nbdcopy"
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
    text = (bytes(out) + err).decode(errors="replace")
    if rc != 0:
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
