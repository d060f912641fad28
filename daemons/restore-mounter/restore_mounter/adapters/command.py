"""One-shot commands (argv lists, never a shell) with a deadline; failures carry the program's stderr.

Same shape as `oma_common.process.run` (branch nbdadapters), so this module can give way to it once it
lands. One addition: `detaching=True` for programs that fork a daemon that keeps running after they return
(ntfs-3g, fusefat). Their output goes to temporary files instead of pipes, because a pipe held open by the
daemon would never reach EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import subprocess
import tempfile
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)


class CommandFailed(Exception):
    """A command exited with a non-zero code, could not be executed, or timed out."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, reason: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
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


async def run(argv: Sequence[str], *, timeout: float = 60.0, check: bool = True, detaching: bool = False,
              resource_id: str = "") -> CommandResult:
    """Run `argv` to completion; raise CommandFailed on a failure (with check) or at the deadline."""
    args = tuple(str(a) for a in argv)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if detaching:
            out_f = stack.enter_context(tempfile.TemporaryFile())
            err_f = stack.enter_context(tempfile.TemporaryFile())
            out, err = out_f.fileno(), err_f.fileno()
        else:
            out = err = subprocess.PIPE
        try:
            proc = await asyncio.create_subprocess_exec(*args, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        except OSError as e:
            raise CommandFailed(args, None, "", f"cannot be executed: {e}") from e
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise CommandFailed(args, None, "", f"timed out after {timeout:g} s") from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if detaching:
            out_f.seek(0)
            err_f.seek(0)
            stdout, stderr = out_f.read(), err_f.read()
    assert proc.returncode is not None
    result = CommandResult(args, proc.returncode, stdout or b"", stderr or b"", time.monotonic() - started)
    log.debug("%s%s -> %d in %.3f s", f"{resource_id}: " if resource_id else "", " ".join(args),
              result.returncode, result.seconds)
    if check and result.returncode != 0:
        raise CommandFailed(args, result.returncode, result.error_text or result.text)
    return result
