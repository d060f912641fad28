"""Fixtures for the nbd-pool adapter tests: root check, free ports, small images built without mounting."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ...rig import free_range

LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MIB = 1024 * 1024


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


@pytest.fixture
def free_port() -> int:
    """The first of 4 consecutive ports nobody listens on, from this test process's own block (tests use the
    next ones too). Not the kernel's pick: that is an ephemeral port, and the one after it may be taken by any
    outgoing connection meanwhile (a readiness probe's took it once)."""
    return free_range(4).start


def sh(*argv: str | Path, input: bytes | None = None) -> str:
    """Run a setup command in a test (not product code: blocking is fine here)."""
    res = subprocess.run([str(a) for a in argv], input=input, capture_output=True, check=False)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed: {res.stderr.decode(errors='replace')}")
    return res.stdout.decode(errors="replace")


def make_ext4(path: Path, size: int, files: dict[str, str], tmp: Path) -> None:
    src = tmp / f"{path.name}.d"
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    with open(path, "wb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-d", src, path)


def build_gpt_disk(tmp: Path, *, size_mib: int = 64) -> tuple[Path, list[tuple[int, int]]]:
    """A sparse raw disk with a GPT and two ext4 partitions (files p1.txt / p2.txt); returns the file and
    the partitions' (start, size) in bytes. Built with sfdisk + mkfs.ext4 -d + dd, no mounting."""
    need("sfdisk", "mkfs.ext4")
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size_mib * MIB)
    parts = [(1 * MIB, 20 * MIB), (22 * MIB, 20 * MIB)]
    script = "label: gpt\n" + "".join(
        f'start={s // 512}, size={n // 512}, type={LINUX_FS}, name="part{i + 1}"\n' for i, (s, n) in enumerate(parts)
    )
    sh("sfdisk", "-q", disk, input=script.encode())
    for i, (start, size) in enumerate(parts, 1):
        fs = tmp / f"p{i}.ext4"
        make_ext4(fs, size, {f"p{i}.txt": f"hello from partition {i}\n"}, tmp)
        sh("dd", f"if={fs}", f"of={disk}", "bs=1M", f"seek={start // MIB}", "conv=notrunc,sparse", "status=none")
        fs.unlink()
    return disk, parts


def to_qcow2(raw: Path, out: Path) -> Path:
    need("qemu-img")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out)
    return out


# The helpers reach the tests as fixtures: test modules here have no package, so importing conftest by
# name would depend on pytest's import mode.


class Helpers:
    sh = staticmethod(sh)
    need = staticmethod(need)
    make_ext4 = staticmethod(make_ext4)
    build_gpt_disk = staticmethod(build_gpt_disk)
    to_qcow2 = staticmethod(to_qcow2)
    MIB = MIB
    LINUX_FS = LINUX_FS


@pytest.fixture
def helpers() -> type[Helpers]:
    return Helpers
