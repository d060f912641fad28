"""Images opened for qemu by descriptor: every layer beneath its root, no symlink followed, no name left to qemu.

omad owns the repository directories and names the images, so nothing it names is handed to qemu as a
path: nbd-pool opens the image with openat2(2) beneath the export root it lies in (RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV), checks what it opened with fstat(2), reads the QCOW2 header itself
from that descriptor, opens the backing file it names the same way (relative to the image, beneath the
same root), and so on down the chain. qemu is then given the chain explicitly — `file.filename` is
/proc/self/fd/N of a descriptor it inherits, `backing` is set at every level and null at the base — so it
follows no name from any image header. An image with an external data file is refused. A root itself may
lie in a directory omad owns (/var/lib/oma/repositories): its identity is taken at start-up and checked at
every open (a swapped root is refused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oma_common import beneath
from oma_common.errors import Invalid, NotFound

log = logging.getLogger("nbd_pool.images")

QCOW2_MAGIC = b"QFI\xfb"
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
INCOMPAT_DATA_FILE = 1 << 2
MAX_CHAIN = 1024  # far more than any retention keeps; a loop is caught before
MAX_BACKING_NAME = 1023  # qcow2's own limit


@dataclasses.dataclass(frozen=True)
class Header:
    backing: str | None
    backing_format: str | None
    data_file: bool


def read_qcow2_header(fd: int) -> Header | None:
    """The parts of a QCOW2 header that name other files, read from the descriptor; None if not QCOW2."""
    head = os.pread(fd, 104, 0)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        return None
    version, backing_offset, backing_size = struct.unpack(">IQI", head[4:20])
    if version not in (2, 3):
        raise Invalid("image refused", f"QCOW2 version {version} is not one nbd-pool reads")
    incompatible = 0
    header_length = 72
    if version == 3:
        if len(head) < 104:
            raise Invalid("image refused", "truncated QCOW2 v3 header")
        incompatible = struct.unpack(">Q", head[72:80])[0]
        header_length = struct.unpack(">I", head[100:104])[0]
    backing = None
    if backing_offset:
        if not 0 < backing_size <= MAX_BACKING_NAME:
            raise Invalid("image refused", f"backing file name of {backing_size} bytes")
        if backing_offset + backing_size > os.fstat(fd).st_size:  # (an offset past 2^63 would not even be read)
            raise Invalid("image refused", f"the backing file name lies past the end of the image "
                                           f"(offset {backing_offset})")
        raw = os.pread(fd, backing_size, backing_offset)
        try:
            backing = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Invalid("image refused", "the backing file name is not UTF-8") from e
    backing_format = None
    data_file = bool(incompatible & INCOMPAT_DATA_FILE)
    # Header extensions follow the header, each (type, length) then data padded to 8 bytes.
    offset = header_length
    for _ in range(64):
        ext = os.pread(fd, 8, offset)
        if len(ext) < 8:
            break
        kind, length = struct.unpack(">II", ext)
        if kind == EXT_END:
            break
        if kind == EXT_BACKING_FORMAT:
            backing_format = os.pread(fd, min(length, 16), offset + 8).decode("ascii", "replace")
        elif kind == EXT_DATA_FILE:
            data_file = True
        offset += 8 + (length + 7) // 8 * 8
    return Header(backing, backing_format, data_file)


@dataclasses.dataclass
class Layer:
    rel: str  # beneath the root
    fd: int
    fmt: str  # "qcow2" or "raw"


@dataclasses.dataclass
class OpenedImage:
    """An image and its backing chain, each layer an open descriptor; close() when qemu has inherited them."""

    requested: str
    root: Path
    layers: list[Layer]
    block: bool = False

    @property
    def path(self) -> Path:
        return self.root / self.layers[0].rel

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(layer.fd for layer in self.layers)

    def blockdev(self, each: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
        """qemu's options for the whole chain: each layer's file is /proc/self/fd/N, backing explicit.
        `each` is set on every node (e.g. read-only, force-share), `top` on the top one."""
        node: dict[str, Any] | None = None
        for layer in reversed(self.layers):
            driver = "host_device" if self.block else "file"
            current: dict[str, Any] = {"driver": layer.fmt,
                                       "file": {"driver": driver, "filename": beneath.fd_path(layer.fd), **(each or {})},
                                       **(each or {})}
            if layer.fmt == "qcow2":
                current["backing"] = node  # None (JSON null) at the base: qemu opens no name of its own
            node = current
        assert node is not None
        node.update(top)
        return node

    def image_opts(self, **top: Any) -> str:
        """The chain as one `json:{...}` image name for --image-opts / -b of qemu's tools."""
        return "json:" + json.dumps(self.blockdev(**top), separators=(",", ":"))

    def describe(self) -> str:
        return " <- ".join(str(self.root / layer.rel) for layer in self.layers)

    def close(self) -> None:
        for layer in self.layers:
            with contextlib.suppress(OSError):
                os.close(layer.fd)
        self.layers = []

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageRoots:
    """The export roots and their identities, and the one way to open what omad names inside them."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = [Path(os.path.normpath(r)) for r in roots]
        self._identity: dict[Path, tuple[int, int]] = {}
        for r in self.roots:
            try:
                self._remember(r)
            except beneath.RootUntrusted:
                log.warning("export root %s is reached through a symbolic link that root did not make; nothing is "
                            "opened through it until it is a directory again", r)

    def _remember(self, root: Path) -> tuple[int, int] | None:
        """The root's identity, taken the first time it is found (None while it is missing); RootUntrusted
        when a link omad could have planted leads to it (beneath.open_root)."""
        if root not in self._identity:
            try:
                self._identity[root] = beneath.identity(root)
            except beneath.RootUntrusted:
                raise
            except OSError:
                return None
        return self._identity[root]

    def _split(self, requested: str) -> tuple[Path, str]:
        if not requested.startswith("/") or os.path.normpath(requested) != requested or "\0" in requested:
            raise Invalid("invalid path", f"{requested!r} is not a normalised absolute path")
        p = Path(requested)
        for root in sorted(self.roots, key=lambda r: len(r.parts), reverse=True):
            if root in p.parents:
                return root, str(p.relative_to(root))
        raise Invalid("path outside the export roots",
                      f"{requested} is not inside an export root ({', '.join(map(str, self.roots)) or 'none'})")

    def _open(self, root: Path, rel: str, flags: int) -> int:
        try:
            known = self._remember(root)
            if known is None:
                raise NotFound("export root missing", f"{root} does not exist")
            return beneath.open_beneath(root, rel, flags, root_identity=known)
        except beneath.RootReplaced as e:
            raise Invalid("export root replaced", f"{root} is not the directory it was when nbd-pool "
                                                  "started; nothing is opened through it") from e
        except beneath.RootUntrusted as e:
            raise Invalid("export root refused", f"{root} is reached through a symbolic link that root did not "
                                                 "make; nothing is opened through it") from e
        except OSError as e:
            shown = f"{root}/{rel}"
            if e.errno == errno.ENOENT:
                raise NotFound("path not found", f"{shown} does not exist") from e
            if e.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                raise Invalid("path refused", f"{shown} goes through a symbolic link or another mount") from e
            raise Invalid("cannot open the image", f"{shown}: {e.strerror}") from e

    def open_file(self, requested: str, fmt: str, *, writable: bool) -> OpenedImage:
        """Open a file image and its whole backing chain (QCOW2), each layer checked; Invalid otherwise."""
        root, rel = self._split(requested)
        image = OpenedImage(requested, root, [])
        try:
            seen: set[tuple[int, int]] = set()
            flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
            layer_fmt = fmt
            while True:
                fd = self._open(root, rel, flags)
                image.layers.append(Layer(rel, fd, layer_fmt))
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise Invalid("not an image", f"{root / rel} is not a regular file")
                if (st.st_dev, st.st_ino) in seen or len(image.layers) > MAX_CHAIN:
                    raise Invalid("image refused", f"{requested}: its backing chain loops or is too long")
                seen.add((st.st_dev, st.st_ino))
                if layer_fmt != "qcow2":
                    break
                header = read_qcow2_header(fd)
                if header is None:
                    raise Invalid("not an image", f"{root / rel} is not a QCOW2 image")
                if header.data_file:
                    raise Invalid("image refused", f"{root / rel} has an external data file; images with data "
                                                   "files are not opened")
                if header.backing is None:
                    break
                rel = self._backing_rel(root, rel, header.backing, requested)
                layer_fmt = header.backing_format or "qcow2"
                if layer_fmt not in ("qcow2", "raw"):
                    raise Invalid("image refused", f"backing file {root / rel} has format {layer_fmt!r}")
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        except BaseException:
            image.close()
            raise
        return image

    @staticmethod
    def _backing_rel(root: Path, rel: str, name: str, requested: str) -> str:
        """The backing file a header names, as a path beneath the same root (qemu resolves a relative name
        against the image's directory); a name that leads elsewhere is refused."""
        if "\0" in name or name.startswith(("json:", "nbd:", "nbd+", "http", "ssh:", "iscsi:")) or ":" in name.split("/")[0]:
            raise Invalid("backing file refused", f"{requested}: backing file {name!r} is not a plain file name")
        joined = name if name.startswith("/") else os.path.join(str(root / os.path.dirname(rel)), name)
        full = Path(os.path.normpath(joined))
        if not full.is_relative_to(root) or full == root:
            raise Invalid("backing file outside the export roots",
                          f"{requested} depends on {name}, which is not inside {root}")
        return str(full.relative_to(root))

    def open_block(self, device: Path, *, writable: bool) -> OpenedImage:
        """Open a block device (already vouched for by the caller) and check it is one."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        fd = os.open(device, flags | os.O_CLOEXEC)
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            os.close(fd)
            raise Invalid("not a block device", f"{device} is not a block device")
        return OpenedImage(str(device), device.parent, [Layer(device.name, fd, "raw")], block=True)
