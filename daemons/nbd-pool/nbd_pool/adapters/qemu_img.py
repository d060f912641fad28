"""qemu-img info: the files an image opens (its backing chain and any external data file), read before exporting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from oma_common.command import CommandFailed, run

QEMU_IMG = "qemu-img"


class ImageError(Exception):
    """The image or one of its backing files cannot be read, or qemu-img's answer makes no sense."""


@dataclasses.dataclass(frozen=True)
class Layer:
    filename: str  # as qemu reports it: an absolute path for files, "json:{...}" or a URL for anything else
    format: str
    virtual_size: int
    backing_filename: str | None  # resolved ("full-backing-filename")
    data_file: str | None  # a qcow2 external data file, opened with the image


def _layer(d: dict[str, Any]) -> Layer:
    spec = d.get("format-specific") or {}
    data = spec.get("data") or {}
    return Layer(
        filename=str(d["filename"]),
        format=str(d.get("format", "")),
        virtual_size=int(d.get("virtual-size", 0)),
        backing_filename=d.get("full-backing-filename") or d.get("backing-filename"),
        data_file=data.get("data-file") if isinstance(data, dict) else None,
    )


def parse_chain(text: str) -> list[Layer]:
    try:
        doc = json.loads(text)
        items = doc if isinstance(doc, list) else [doc]
        return [_layer(d) for d in items]
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"unexpected qemu-img info output: {exc}") from exc


async def backing_chain(path: Path, fmt: str, *, program: str = QEMU_IMG, timeout: float = 30.0) -> list[Layer]:
    """Every layer qemu will open for `path` as `fmt`, top first.

    -U (force share): the image may be open read-write by a qemu-nbd already (an image being written keeps
    its lock); reading its header without the lock is what `qemu-img info -U` is for.
    """
    try:
        res = await run([program, "info", "--backing-chain", "--output=json", "-U", f"--format={fmt}", "--", str(path)],
                        timeout=timeout)
    except CommandFailed as exc:
        raise ImageError(exc.stderr.strip() or str(exc)) from exc
    return parse_chain(res.text)
