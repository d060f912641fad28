"""One-shot commands: an argv list run to completion with a timeout, never through a shell."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO

from .process import ProcessError

log = logging.getLogger("oma.process")


class CommandFailed(ProcessError):
    """A one-shot command exited with a non-zero code, could not be executed, or timed out."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, reason: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()  # what the program said (run: its stdout when stderr was empty)
        what = reason or f"exited with code {returncode}"
        super().__init__(f"{' '.join(self.argv)}: {what}" + (f": {self.stderr}" if self.stderr else ""))


@dataclasses.dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def error_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()


def _rewound(f: IO[bytes] | None) -> bytes:
    if f is None:
        return b""
    f.seek(0)
    return f.read()


async def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 60.0,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    logger: logging.Logger | None = None,
    resource_id: str = "",
    detaching: bool = False,
    pass_fds: Sequence[int] = (),
) -> CommandResult:
    """Run a short command to completion (argv list, no shell); raise CommandFailed on failure or timeout.

    asyncio's subprocess transport is the right tool here: if we are cancelled, the child is killed.
    `detaching=True` is for programs that fork a daemon that keeps running after they return (ntfs-3g,
    fusefat): their output goes to temporary files instead of pipes, because a pipe held open by the daemon
    would never reach EOF. `pass_fds` are descriptors the program inherits (named as /proc/self/fd/N).
    """
    lg = logger or log
    args = tuple(os.fspath(a) for a in argv)
    started = time.monotonic()
    with contextlib.ExitStack() as files:
        out_f = files.enter_context(tempfile.TemporaryFile()) if detaching else None
        err_f = files.enter_context(tempfile.TemporaryFile()) if detaching else None
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=out_f or subprocess.PIPE,
                stderr=err_f or subprocess.PIPE,
                env=dict(env) if env is not None else None,
                pass_fds=tuple(pass_fds),
            )
        except OSError as exc:
            raise CommandFailed(args, None, "", f"cannot be executed: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            _, err = await proc.communicate()
            err = err or _rewound(err_f)
            raise CommandFailed(args, None, err.decode("utf-8", "replace"), f"timed out after {timeout:g}s") from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if detaching:
            out, err = _rewound(out_f), _rewound(err_f)
    seconds = time.monotonic() - started
    assert proc.returncode is not None
    prefix = f"{resource_id}: " if resource_id else ""
    lg.debug("%s%s -> %d in %.3fs", prefix, " ".join(args), proc.returncode, seconds)
    if check and proc.returncode != 0:
        # A program that wrote nothing on stderr may have said why on stdout.
        raise CommandFailed(args, proc.returncode, (err.strip() or out).decode("utf-8", "replace"))
    return CommandResult(args, proc.returncode, out, err, seconds)
