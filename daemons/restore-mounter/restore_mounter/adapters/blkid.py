"""What is on a block device, from blkid(8)'s low-level probe (`-p`: read the device, never a cache)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from oma_common.command import CommandFailed, run

BLKID = "blkid"


@dataclasses.dataclass(frozen=True)
class Probe:
    type: str  # filesystem or container type ("ext4", "vfat", "ntfs", "LVM2_member", ...); "" if none
    usage: str  # "filesystem", "raid", "crypto", "other", ""
    label: str
    uuid: str
    pttype: str  # partition table type ("gpt", "dos") when the device holds a table instead


def parse_export(text: str) -> Probe:
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return Probe(values.get("TYPE", ""), values.get("USAGE", ""), values.get("LABEL", ""), values.get("UUID", ""),
                 values.get("PTTYPE", ""))


async def probe(device: str, *, resource_id: str = "") -> Probe:
    """Probe `device`; exit code 2 means blkid recognised nothing, which is an answer, not a failure."""
    res = await run([BLKID, "-p", "-o", "export", "--", device], timeout=60, check=False, resource_id=resource_id)
    if res.returncode == 2:
        return Probe("", "", "", "", "")
    if res.returncode != 0:
        raise CommandFailed(res.argv, res.returncode, res.error_text)
    return parse_export(res.text)


def device_size(device: str) -> int:
    """Bytes of a block device from sysfs (512-byte units there, whatever the logical sector size)."""
    name = Path(os.path.realpath(device)).name
    try:
        return int(Path(f"/sys/class/block/{name}/size").read_text()) * 512
    except (OSError, ValueError):
        return 0
