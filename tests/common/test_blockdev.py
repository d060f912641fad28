"""The shared loop-device and sysfs partition helpers, on losetup's JSON and a fake sysfs."""

from __future__ import annotations

from pathlib import Path

from oma_common import blockdev


def test_losetup_json_old_and_new_flags_and_no_devices() -> None:
    text = ('{"loopdevices": [{"name": "/dev/loop0", "back-file": "/r/a.raw (deleted)", "ro": true, '
            '"autoclear": "0"}, {"name": "/dev/loop1", "back-file": null, "ro": "1", "autoclear": false}]}')
    a, b = blockdev.parse_losetup_json(text)
    assert a == blockdev.LoopDevice("/dev/loop0", "/r/a.raw (deleted)", True, False)
    assert a.backed_under(Path("/r")) and not b.backed_under(Path("/r")) and b.read_only and b.name == "loop1"
    assert blockdev.parse_losetup_json("") == []


def test_backing_file_and_partitions_from_sysfs(tmp_path: Path) -> None:
    loop = tmp_path / "loop3"
    (loop / "loop").mkdir(parents=True)
    (loop / "loop" / "backing_file").write_text("/r/a.raw\n")
    (loop / "queue").mkdir()
    (loop / "size").write_text("2048\n")
    for n, start in ((2, 4096), (1, 2048)):
        part = loop / f"loop3p{n}"
        part.mkdir()
        (part / "partition").write_text(f"{n}\n")
        (part / "start").write_text(f"{start}\n")
        (part / "size").write_text("1024\n")
    assert blockdev.backing_file("/dev/loop3", tmp_path) == "/r/a.raw"
    assert blockdev.backing_file("/dev/loop4", tmp_path) is None
    assert blockdev.kernel_partitions("/dev/loop3", tmp_path) == [
        blockdev.KernelPartition(1, "/dev/loop3p1", 2048 * 512, 1024 * 512),
        blockdev.KernelPartition(2, "/dev/loop3p2", 4096 * 512, 1024 * 512)]
    assert blockdev.kernel_partitions("/dev/loop4", tmp_path) == []
