"""The shared mountinfo parser: escapes, the visible mount, mounts under a root, FUSE kinds."""

from __future__ import annotations

from pathlib import Path

from oma_common import mountinfo

TEXT = (
    "36 35 98:0 / /srv/r/a\\040b rw,nosuid - nfs4 nas:/export rw,vers=4.1\n"
    "37 35 0:5 / /proc rw shared:1 - proc proc rw\n"
    "40 36 7:1 / /srv/r ro,nodev - ext4 /dev/loop1p1 ro\n"
    "41 40 0:50 / /srv/r/x ro - fuseblk /dev/loop2p1 ro\n"
    "42 40 0:51 / /srv/r/x/y rw - fuse.fusefat /dev/loop3 rw\n"
    "43 40 0:52 / /srv/r/x rw - fuse qsd rw\n"
    "not a mountinfo line\n"
)


def test_parse_unescapes_and_keeps_every_field(tmp_path: Path) -> None:
    a, proc, *_ = mountinfo.parse(TEXT)
    assert a == mountinfo.MountEntry(Path("/srv/r/a b"), "nfs4", "nas:/export", "rw,nosuid", "98:0", 36)
    assert proc.mount_point == Path("/proc") and proc.fstype == "proc"  # optional fields skipped
    assert len(mountinfo.parse(TEXT)) == 6


def test_find_is_mounted_and_under(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(TEXT)
    top = mountinfo.find(Path("/srv/r/x"), table)
    assert top is not None and top.fstype == "fuse" and not top.read_only  # the last listed is visible
    assert mountinfo.find(Path("/nowhere"), table) is None
    assert mountinfo.is_mounted(Path("/srv/r"), table) and not mountinfo.is_mounted(Path("/srv"), table)
    below = [str(m.mount_point) for m in mountinfo.under(Path("/srv/r"), table)]
    assert below[0] == "/srv/r/x/y" and "/srv/r" not in below
    assert "/srv/r" in [str(m.mount_point) for m in mountinfo.under(Path("/srv/r"), table, include_root=True)]


def test_fuse_kinds_and_read_only() -> None:
    kinds = {m.fstype: m for m in mountinfo.parse(TEXT)}
    assert all(kinds[k].is_fuse for k in ("fuse", "fuseblk", "fuse.fusefat"))
    assert not kinds["ext4"].is_fuse and kinds["ext4"].read_only
