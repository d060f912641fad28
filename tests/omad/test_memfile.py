"""omad's anonymous files: written whole, read by holders, reused only once nobody holds them."""

from __future__ import annotations

import os

import pytest

from omad.adapters.memfile import FilePool

pytestmark = pytest.mark.timeout(30)


def read(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


def test_a_held_file_keeps_its_bytes_and_a_retired_one_is_written_over() -> None:
    pool = FilePool("test", keep=1)
    many = [b"x" * 3] * 5000  # more pieces than one writev(2) takes
    first = pool.write(many)
    assert first.size == 15000
    with first.held() as fd:
        assert read(fd) == b"x" * 15000
        first.retire()  # retired while held: not reused yet
        second = pool.write([b"[", b"1", b"]"])
        assert read(fd) == b"x" * 15000
        with second.held() as fd2:
            assert fd2 != fd and read(fd2) == b"[1]"
    third = pool.write([b"{}"])  # first is back in the pool: written over, its old tail cut
    with third.held() as fd3:
        assert fd3 == fd and read(fd3) == b"{}" and third.size == 2
    with pytest.raises(ValueError):
        with first.held():
            pass
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:test")  # anonymous memory, not a disk file
    second.retire()
    third.retire()  # one idle file kept, the other closed
    os.fstat(fd2)  # kept (keep=1)
    with pytest.raises(OSError):
        os.fstat(fd)
    pool.close()
    with pytest.raises(OSError):
        os.fstat(fd2)
