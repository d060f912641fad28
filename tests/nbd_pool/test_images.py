"""Images opened by descriptor, as a compromised omad would attack them: it owns the repositories, so it can
rewrite a header or swap a directory at any moment; qemu must only ever get files beneath the root."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from pathlib import Path

import pytest

from nbd_pool.images import ImageRoots, read_qcow2_header
from oma_common.errors import Invalid, NotFound


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def write(image: Path, pattern: int, offset: int = 0, length: str = "64k", fmt: str = "qcow2") -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", str(image)],
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repositories"
    (root / "ctx").mkdir(parents=True)
    return root


def chain(root: Path) -> list[Path]:
    base, mid, top = (root / "ctx" / f"b{i}-disk-2000.qcow2" for i in range(3))
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    write(base, 0x11)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(mid))
    write(mid, 0x22, 65536)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top))
    return [base, mid, top]


def qemu_io_reads(opts: str, fds: tuple[int, ...], *commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-r"]  # a json: name carries the whole chain
    for c in commands:
        argv += ["-c", c]
    return subprocess.run([*argv, opts], pass_fds=fds, capture_output=True, text=True)


def test_a_chain_is_opened_layer_by_layer_and_qemu_follows_no_name(repo: Path) -> None:
    base, mid, top = chain(repo)
    roots = ImageRoots([str(repo)])
    with roots.open_file(str(top), "qcow2", writable=False) as image:
        assert [layer.rel for layer in image.layers] == [f"ctx/{p.name}" for p in (top, mid, base)]
        # Now omad swaps the base for another file: qemu still reads the one that was checked.
        os.rename(base, base.with_suffix(".old"))
        qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
        write(base, 0x99)
        p = qemu_io_reads(image.image_opts(), image.fds, "read -P 0x11 0 64k", "read -P 0x22 64k 64k")
        assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("backing", ["/etc/shadow", "../../../../etc/shadow", "/dev/null", "json:{}",
                                     "nbd://127.0.0.1:10809"])
def test_a_header_naming_a_file_outside_is_refused(repo: Path, backing: str) -> None:
    top = repo / "ctx" / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(top), "4M")
    # Rewrite the header's backing name as omad could, without qemu-img checking it.
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", backing, "-F", "raw", str(top))
    assert read_qcow2_header(os.open(top, os.O_RDONLY)).backing == backing
    with pytest.raises((Invalid, NotFound)):
        ImageRoots([str(repo)]).open_file(str(top), "qcow2", writable=False)


def test_a_block_device_as_backing_is_refused(repo: Path) -> None:
    top = repo / "ctx" / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(top), "4M")
    os.mknod(repo / "ctx" / "disk", 0o600 | 0o060000, os.makedev(7, 0))  # a block node planted in the repo
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "disk", "-F", "raw", str(top))
    with pytest.raises(Invalid, match="not a regular file"):
        ImageRoots([str(repo)]).open_file(str(top), "qcow2", writable=False)


def test_an_external_data_file_is_refused(repo: Path) -> None:
    top = repo / "ctx" / "data.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={repo / 'ctx' / 'data.raw'}", str(top), "4M")
    assert read_qcow2_header(os.open(top, os.O_RDONLY)).data_file
    with pytest.raises(Invalid, match="data file"):
        ImageRoots([str(repo)]).open_file(str(top), "qcow2", writable=False)


def test_symlinks_and_a_replaced_root_are_refused(repo: Path, tmp_path: Path) -> None:
    base, _mid, top = chain(repo)
    roots = ImageRoots([str(repo)])
    (repo / "link.qcow2").symlink_to(top)
    with pytest.raises(Invalid, match="symbolic link"):
        roots.open_file(str(repo / "link.qcow2"), "qcow2", writable=False)
    os.rename(repo / "ctx", repo / "ctx.real")
    (repo / "ctx").symlink_to(repo / "ctx.real")
    with pytest.raises(Invalid, match="symbolic link"):
        roots.open_file(str(top), "qcow2", writable=False)
    (repo / "ctx").unlink()
    os.rename(repo / "ctx.real", repo / "ctx")
    os.rename(repo, tmp_path / "old-root")
    repo.mkdir()
    with pytest.raises(Invalid, match="replaced"):
        roots.open_file(str(repo / "x.qcow2"), "qcow2", writable=False)
    with pytest.raises(Invalid, match="outside"):
        roots.open_file("/etc/shadow", "raw", writable=False)


def test_a_racing_directory_swap_never_reaches_outside(repo: Path, tmp_path: Path) -> None:
    """A thread exchanges ctx with a symlink to a victim directory (renameat2 RENAME_EXCHANGE) while images are
    opened: each open gets the real image or is refused; the victim (a FIFO of the same name) never."""
    _base, _mid, top = chain(repo)
    victim = tmp_path / "victim"
    victim.mkdir()
    os.mkfifo(victim / top.name)
    (repo / "ctx.link").symlink_to(victim)
    libc = ctypes.CDLL(None, use_errno=True)
    stop = threading.Event()
    flips = [0]

    def flip() -> None:
        while not stop.is_set():
            assert libc.renameat2(-100, bytes(repo / "ctx"), -100, bytes(repo / "ctx.link"), 2) == 0
            flips[0] += 1

    t = threading.Thread(target=flip)
    t.start()
    opened = refused = 0
    roots = ImageRoots([str(repo)])
    try:
        for _ in range(300):
            try:
                with roots.open_file(str(top), "qcow2", writable=False) as image:
                    where = [os.readlink(f"/proc/self/fd/{fd}") for fd in image.fds]
                    assert all(w.startswith(str(repo) + "/") for w in where), where
                    opened += 1
            except (Invalid, NotFound) as e:
                assert "not a regular file" not in e.details, "the victim was reached"
                refused += 1
    finally:
        stop.set()
        t.join()
    assert flips[0] > 100 and opened + refused == 300 and refused > 0
