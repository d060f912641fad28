"""qemu-img as omad uses it: create backup images, read their size and chain, check and compare them.

Every call is an argv list run with `oma_common.command.run` (never a shell). Images are always opened with
an explicit format: a format is never probed, because a raw image could then pose as a qcow2 naming any
backing file it likes (qemu-img(1), "Notes"). An image that qemu-nbd is serving read-write is locked; `info`
and `check` open it with -U (force-share, read-only), which reads metadata that may be changing under it:
the figures are a snapshot, not a promise (qemu-img(1), "-U").
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from oma_common.errors import Invalid, NotFound, Unavailable
from oma_common.command import CommandFailed, CommandResult, run

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What `qemu-img info` says about one image (not its chain)."""

    path: str
    format: str
    virtual_size: int
    actual_size: int  # bytes this file takes on its filesystem
    backing_file: str | None  # as written in the image (relative to its directory, for ours)
    backing_format: str | None
    dirty: bool  # the image was not closed cleanly (qcow2 "dirty" flag, with lazy refcounts)
    corrupt: bool  # qemu marked the image corrupt and will open it read-only only


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """`qemu-img check`: corruptions make an image unusable; leaked clusters only waste space."""

    corruptions: int
    leaks: int
    check_errors: int

    @property
    def ok(self) -> bool:
        return self.corruptions == 0 and self.check_errors == 0


class QemuImg:
    def __init__(self, *, timeout: float = 120.0, program: str = "qemu-img") -> None:
        self.timeout = timeout
        self.program = program

    async def create(self, path: Path, size: int, *, backing_file: str | None = None) -> None:
        """A new qcow2 of `size` bytes; with `backing_file` (relative to `path`'s directory) an overlay.

        The backing file is opened to check it exists and is a qcow2; `size` may exceed its size (a disk
        that grew). The file must not exist yet: an existing one is never overwritten.
        """
        if not path.is_absolute():
            raise ValueError(f"image path must be absolute: {path}")
        if size <= 0 or size % 512:
            raise Invalid("bad disk size", f"a disk image needs a positive multiple of 512 bytes, not {size}")
        if path.exists():
            raise Invalid("image exists", f"{path} already exists; refusing to overwrite it")
        argv: list[str] = [self.program, "create", "-q", "-f", "qcow2"]
        if backing_file is not None:
            if Path(backing_file).is_absolute() or backing_file.startswith("-"):
                raise ValueError(f"backing file must be a relative path: {backing_file}")
            argv += ["-b", backing_file, "-F", "qcow2"]
        argv += ["--", str(path), str(size)]
        await self._run(argv, what=f"create {path}")

    async def info(self, path: Path, *, force_share: bool = True) -> ImageInfo:
        """The image's own figures; `force_share` reads an image a qemu-nbd holds open read-write."""
        data = await self._json(self._info_argv(path, force_share, chain=False), path)
        return _image_info(data)

    async def chain(self, path: Path, *, force_share: bool = True) -> list[ImageInfo]:
        """The image and every backing file below it, top first."""
        data = await self._json(self._info_argv(path, force_share, chain=True), path)
        if not isinstance(data, list):
            raise Unavailable("qemu-img answered unexpectedly", f"info --backing-chain of {path} is not a list")
        return [_image_info(item) for item in data]

    async def check(self, path: Path, *, force_share: bool = False) -> CheckResult:
        """Check the image's metadata (exit 2: corruptions, 3: leaks only; both still print the report)."""
        argv = [self.program, "check", "-f", "qcow2", "--output=json"]
        if force_share:
            argv.append("-U")
        argv += ["--", str(path)]
        self._exists(path)
        result = await self._run(argv, what=f"check {path}", ok_codes=(0, 2, 3))
        try:
            data = json.loads(result.text)
        except ValueError as e:
            raise Unavailable("qemu-img check failed", f"{path}: unreadable report: {result.text[:200]!r}") from e
        return CheckResult(int(data.get("corruptions", 0)), int(data.get("leaks", 0)),
                           int(data.get("check-errors", 0)))

    async def compare(self, a: Path, b: Path, *, fmt_a: str = "qcow2", fmt_b: str = "raw",
                      force_share: bool = True) -> bool:
        """Whether the two images show the same guest content (a chain is read through its backing files)."""
        argv = [self.program, "compare", "-q", "-f", fmt_a, "-F", fmt_b]
        if force_share:
            argv.append("-U")
        argv += ["--", str(a), str(b)]
        result = await self._run(argv, what=f"compare {a} {b}", ok_codes=(0, 1))
        return result.returncode == 0

    async def rebase_unsafe(self, path: Path, backing_file: str | None) -> None:
        """Rewrite only the backing file name in the image's header (no data is read or written): for a copy
        whose backing file is the same content under another name (qemu-img(1), "rebase -u")."""
        if backing_file is not None and (Path(backing_file).is_absolute() or backing_file.startswith("-")):
            raise ValueError(f"backing file must be a relative path: {backing_file}")
        self._exists(path)
        argv = [self.program, "rebase", "-u", "-f", "qcow2", "-b", backing_file or ""]
        if backing_file:
            argv += ["-F", "qcow2"]
        await self._run(argv + ["--", str(path)], what=f"rebase {path}")

    async def convert(self, src: Path, dst: Path, *, fmt: str = "raw") -> None:
        """Read a whole chain from its top into one new image of `fmt` (a flat export or a check copy)."""
        if dst.exists():
            raise Invalid("image exists", f"{dst} already exists; refusing to overwrite it")
        self._exists(src)
        await self._run([self.program, "convert", "-U", "-f", "qcow2", "-O", fmt, "--", str(src), str(dst)],
                        what=f"convert {src}")

    # -- plumbing ------------------------------------------------------------------------------------

    def _info_argv(self, path: Path, force_share: bool, *, chain: bool) -> list[str]:
        argv = [self.program, "info", "-f", "qcow2", "--output=json"]
        if chain:
            argv.append("--backing-chain")
        if force_share:
            argv.append("-U")
        return argv + ["--", str(path)]

    @staticmethod
    def _exists(path: Path) -> None:
        if not path.exists():
            raise NotFound("image not found", f"{path} does not exist")

    async def _json(self, argv: list[str], path: Path) -> Any:
        self._exists(path)
        result = await self._run(argv, what=f"info {path}")
        try:
            return json.loads(result.text)
        except ValueError as e:
            raise Unavailable("qemu-img answered unexpectedly", f"info of {path} is not JSON") from e

    async def _run(self, argv: list[str], *, what: str, ok_codes: tuple[int, ...] = (0,)) -> CommandResult:
        try:
            result = await run(argv, timeout=self.timeout, check=False, logger=log)
        except CommandFailed as e:  # could not be executed, or timed out
            raise Unavailable("qemu-img failed", f"qemu-img {what}: {e}") from e
        if result.returncode not in ok_codes:
            stderr = result.stderr.decode("utf-8", "replace").strip()
            raise Unavailable("qemu-img failed", f"qemu-img {what} exited with {result.returncode}: "
                                                 f"{stderr or '(no message)'}")
        return result


def _image_info(data: Any) -> ImageInfo:
    if not isinstance(data, dict):
        raise Unavailable("qemu-img answered unexpectedly", "an image's info is not an object")
    specific = (data.get("format-specific") or {}).get("data") or {}
    return ImageInfo(
        path=str(data.get("filename", "")),
        format=str(data.get("format", "")),
        virtual_size=int(data.get("virtual-size", 0)),
        actual_size=int(data.get("actual-size", 0)),
        backing_file=data.get("backing-filename"),
        backing_format=data.get("backing-filename-format"),
        dirty=bool(data.get("dirty-flag", False)),
        corrupt=bool(specific.get("corrupt", False)),
    )
