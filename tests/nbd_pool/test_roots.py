"""Which paths may be exported: resolution, links, the device-link exception, and the files a QCOW2 opens."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nbd_pool.roots import BLOCK, FILE, Roots
from nbd_pool.vouched import DeviceGuard
from oma_common.errors import Invalid, NotFound

from .helpers import vouch


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "repo" / "vm1").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "repo" / "vm1" / "base.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "other" / "secret.qcow2", "1M")
    return tmp_path


def test_files_inside_a_root_resolve(tree: Path) -> None:
    roots = Roots([str(tree / "repo")])
    r = roots.resolve(str(tree / "repo" / "vm1" / "base.qcow2"))
    assert (r.path, r.kind) == (tree / "repo" / "vm1" / "base.qcow2", FILE)
    (tree / "repo" / "alias.qcow2").symlink_to("vm1/base.qcow2")  # a link that stays inside is fine
    assert roots.resolve(str(tree / "repo" / "alias.qcow2")).path == tree / "repo" / "vm1" / "base.qcow2"
    # A root reached through a link works both ways.
    (tree / "link-to-repo").symlink_to(tree / "repo")
    assert Roots([str(tree / "link-to-repo")]).resolve(str(tree / "repo" / "vm1" / "base.qcow2")).kind == FILE


@pytest.mark.parametrize("path", ["../other/secret.qcow2", "vm1/../../other/secret.qcow2", "escape.qcow2", "vm1"])
def test_what_leads_out_or_is_no_image_is_refused(tree: Path, path: str) -> None:
    (tree / "repo" / "escape.qcow2").symlink_to(tree / "other" / "secret.qcow2")
    with pytest.raises(Invalid):
        Roots([str(tree / "repo")]).resolve(f"{tree}/repo/{path}")


def test_relative_missing_and_special_files(tree: Path) -> None:
    roots = Roots([str(tree / "repo"), "/dev"])
    with pytest.raises(Invalid, match="not an absolute path"):
        roots.resolve("repo/vm1/base.qcow2")
    with pytest.raises(NotFound):
        roots.resolve(str(tree / "repo" / "nope.qcow2"))
    with pytest.raises(Invalid, match="not a regular file or a block device"):
        roots.resolve("/dev/null")  # a character device


@pytest.mark.root
def test_a_device_link_is_followed_only_from_a_root_only_directory(tree: Path) -> None:
    backing = tree / "vol.raw"
    backing.write_bytes(bytes(1024 * 1024))
    device = subprocess.run(["losetup", "--show", "-f", backing], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        byid = tree / "by-id"
        byid.mkdir(mode=0o755)
        (byid / "virtio-1").symlink_to(device)
        vouch(tree / "va" / "vouched.json", (device, byid / "virtio-1"))
        roots = Roots([str(byid)], DeviceGuard(tree / "va" / "vouched.json"))
        r = roots.resolve(str(byid / "virtio-1"))
        assert (str(r.path), r.kind, r.requested) == (device, BLOCK, str(byid / "virtio-1"))
        with pytest.raises(Invalid):
            roots.resolve(str(byid / "virtio-1"), allow_block=False)  # attachments take files only
        os.chmod(byid, 0o775)  # a group could plant links here now
        with pytest.raises(Invalid, match="outside the export roots"):
            roots.resolve(str(byid / "virtio-1"))
        # A link to a device in a repository (which omad writes to) is never followed.
        os.chmod(byid, 0o755)
        os.chown(byid, 65534, -1)
        with pytest.raises(Invalid):
            roots.resolve(str(byid / "virtio-1"))
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
