"""nbd-pool exports a block device only when volume-agent vouches for it, and never one this system uses:
a hand-made link to an unvouched loop device, a mounted device, a disk whose partition is mounted, a
partition, and a registry others could have written are all refused."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_pool.roots import BLOCK, Roots
from nbd_pool.vouched import DeviceGuard
from oma_common.errors import Invalid

from .helpers import MIB, vouch

pytestmark = [pytest.mark.root]


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def loops(short_tmp: Path) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for mount in sorted((line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                         if str(short_tmp) in line.split()[4]), reverse=True):
        subprocess.run(["umount", mount], check=False)
    for device in made:
        subprocess.run(["partx", "-d", device], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", device], check=False)


def loop(short_tmp: Path, made: list[str], name: str, size: int = 64 * MIB) -> str:
    f = short_tmp / f"{name}.raw"
    with open(f, "wb") as out:
        out.truncate(size)
    device = run("losetup", "--show", "-f", f)
    made.append(device)
    return device


def link(short_tmp: Path, name: str, device: str) -> Path:
    byid = short_tmp / "by-id"
    byid.mkdir(mode=0o755, exist_ok=True)
    (byid / name).symlink_to(device)
    return byid / name


def roots(short_tmp: Path) -> Roots:
    return Roots([str(short_tmp / "by-id")], DeviceGuard(short_tmp / "va" / "vouched.json"))


def test_a_vouched_device_is_accepted_and_a_hand_made_link_refused(short_tmp: Path, loops: list[str]) -> None:
    ours, other = loop(short_tmp, loops, "ours"), loop(short_tmp, loops, "other")
    good, bad = link(short_tmp, "virtio-ours", ours), link(short_tmp, "virtio-other", other)
    with pytest.raises(Invalid, match="not vouched for"):
        roots(short_tmp).resolve(str(good))  # no registry yet: nothing is vouched for
    vouch(short_tmp / "va" / "vouched.json", (ours, good))
    r = roots(short_tmp).resolve(str(good))
    assert (r.kind, str(r.path)) == (BLOCK, ours)
    with pytest.raises(Invalid, match="was not attached to this appliance by volume-agent"):
        roots(short_tmp).resolve(str(bad))
    with pytest.raises(Invalid, match="no registry"):
        Roots([str(short_tmp / "by-id")]).resolve(str(good))  # nbd-pool without a registry exports no device


def test_a_registry_others_could_write_is_ignored(short_tmp: Path, loops: list[str]) -> None:
    ours = loop(short_tmp, loops, "ours")
    good = link(short_tmp, "virtio-ours", ours)
    registry = short_tmp / "va" / "vouched.json"
    vouch(registry, (ours, good))
    os.chmod(registry, 0o666)
    with pytest.raises(Invalid, match="not vouched for"):
        roots(short_tmp).resolve(str(good))
    os.chmod(registry, 0o600)
    os.chown(registry.parent, 65534, -1)
    with pytest.raises(Invalid, match="not vouched for"):
        roots(short_tmp).resolve(str(good))


def test_a_mounted_device_is_refused_even_when_vouched(short_tmp: Path, loops: list[str]) -> None:
    device = loop(short_tmp, loops, "fs")
    run("mkfs.ext4", "-q", device)
    (short_tmp / "mnt").mkdir()
    run("mount", device, short_tmp / "mnt")
    good = link(short_tmp, "virtio-fs", device)
    vouch(short_tmp / "va" / "vouched.json", (device, good))
    with pytest.raises(Invalid, match=f"{device} on {short_tmp / 'mnt'} is mounted"):
        roots(short_tmp).resolve(str(good))
    run("umount", short_tmp / "mnt")
    assert roots(short_tmp).resolve(str(good)).kind == BLOCK


def test_a_disk_with_a_mounted_partition_and_a_partition_are_refused(short_tmp: Path, loops: list[str]) -> None:
    disk = loop(short_tmp, loops, "disk")
    subprocess.run(["sfdisk", "-q", disk], input="label: gpt\n,32M\n,\n", text=True, check=True, capture_output=True)
    run("partx", "-a", disk)
    part = f"{disk}p1"
    run("mkfs.ext4", "-q", part)
    (short_tmp / "mnt").mkdir()
    run("mount", part, short_tmp / "mnt")
    whole, one = link(short_tmp, "virtio-disk", disk), link(short_tmp, "virtio-part", part)
    vouch(short_tmp / "va" / "vouched.json", (disk, whole), (part, one))
    with pytest.raises(Invalid, match=f"{part} on {short_tmp / 'mnt'} is mounted"):
        roots(short_tmp).resolve(str(whole))
    with pytest.raises(Invalid, match=f"it is a partition of {disk}"):
        roots(short_tmp).resolve(str(one))
