"""A bare qemu-nbd export for tests of NBD clients (the VMA simulator's): started on a free loopback port,
waited for until it listens, stopped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def qemu_nbd(image: Path, *, fmt: str = "raw", name: str = "disk", flags: tuple[str, ...] = ()
                   ) -> AsyncIterator[int]:
    """`qemu-nbd --persistent --shared=10` of `image` as export `name` on a free port (yielded), as nbd-pool runs
    it plus `flags`; an early exit fails with qemu-nbd's own message."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "qemu-nbd", "--persistent", f"--format={fmt}", f"--export-name={name}", "--bind=127.0.0.1", f"--port={port}",
        "--shared=10", *flags, "--", str(image), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.returncode is not None:
                assert proc.stderr is not None
                raise AssertionError(f"qemu-nbd exited: {(await proc.stderr.read()).decode()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "qemu-nbd did not listen in time"
                await asyncio.sleep(0.02)
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
