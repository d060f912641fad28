"""A hostile guest directory (a million entries) through the real restore-mounter: listed page by page to the
end and archived, with the root daemon's memory bounded; the paging bounds refused.

The image is an ext4 filesystem filled by the kernel through a loop mount (mkfs.ext4 -d inserts each name
with a linear scan of the directory: hours for a million), with hard links to a few inodes (ext4 allows
65000 links per inode), so only the directory entries cost anything. Built once for the module.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from ..lib.diskimages import MiB, run
from .conftest import DAEMON, Agent, module_stack, start_agent

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]

BIG = 1_000_000  # entries of /big
MID = 100_000  # entries of /mid (archived): before streaming, its names and tarfile's member list took ~50 MB
LINKS_PER_INODE = 60_000
RSS_BOUND = 64 * MiB
ARCHIVE_RSS_BOUND = 16 * MiB


@dataclass
class Big:
    agent: Agent
    pid: int
    build_seconds: float


def names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:07d}" for i in range(count)]


def fill(directory: Path, prefix: str, count: int) -> None:
    d = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = ""
        for i, name in enumerate(names(prefix, count)):
            if i % LINKS_PER_INODE == 0:
                first = name
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=d))
            else:
                os.link(first, name, src_dir_fd=d, dst_dir_fd=d)
    finally:
        os.close(d)


def million_ext4(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(256 * MiB)
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "4096", "-O", "^has_journal", "-L", "million", path])
    mnt = Path(tempfile.mkdtemp(prefix=".fill-", dir=path.parent))
    run(["mount", "-o", "loop", path, mnt])  # the loop device goes with the umount (autoclear)
    try:
        (mnt / "big").mkdir()
        (mnt / "mid").mkdir()
        fill(mnt / "big", "f", BIG)
        fill(mnt / "mid", "m", MID)
    finally:
        subprocess.run(["umount", mnt], check=True)
        mnt.rmdir()
    return path


@pytest.fixture(scope="module")
def big() -> Iterator[Big]:
    with module_stack("oma-rmbig-") as stack:
        started = time.monotonic()
        image = million_ext4(stack.state / "million.raw")
        built = time.monotonic() - started
        agent = start_agent(stack)
        agent.mount(image, "million")
        proc = stack.daemons[DAEMON].proc
        assert proc is not None
        yield Big(agent, proc.pid, built)


class PeakRss:
    """The daemon's peak resident set growth over a block: /proc/PID/clear_refs "5" resets VmHWM
    (proc(5)), which then records the peak reached until read."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self) -> PeakRss:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = self._status("VmHWM") - self.start


def test_a_million_entries_list_page_by_page_in_bounded_memory(big: Big) -> None:
    seen: set[str] = set()
    pages = 0
    cursor: str | None = None
    started = time.monotonic()
    daemon = psutil.Process(big.pid)
    cpu = sum(daemon.cpu_times()[:2])
    with PeakRss(big.pid) as rss:
        while True:
            params: dict[str, Any] = {"path": "/big", "limit": 10000}
            if cursor is not None:
                params["cursor"] = cursor
            page = big.agent.files("million", **params)
            listed = [e["name"] for e in page["files"]]
            assert listed == sorted(listed)
            assert len(listed) == 10000 or page["next_cursor"] is None
            seen.update(listed)
            pages += 1
            assert len(seen) == page["total_count"]  # no name twice
            cursor = page["next_cursor"]
            if cursor is None:
                break
    took = time.monotonic() - started
    cpu = sum(daemon.cpu_times()[:2]) - cpu
    print(f"image built in {big.build_seconds:.1f} s; {pages} pages listed in {took:.1f} s "
          f"(restore-mounter's CPU {cpu:.1f} s); its peak RSS growth {rss.growth / MiB:.1f} MiB; "
          f"load {os.getloadavg()}")
    assert seen == set(names("f", BIG))
    assert rss.growth < RSS_BOUND
    # The first page of the default size is sorted and says where to go on.
    first = big.agent.files("million", "/big")
    assert len(first["files"]) == 1000 and first["next_cursor"] and first["total_count"] == 1000


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_an_archive_of_a_huge_directory_streams_in_bounded_memory(big: Big, fmt: str) -> None:
    started = time.monotonic()
    with PeakRss(big.pid) as rss:
        conn, resp = big.agent.open("GET", "/mounts/million/download-directory", {"path": "/mid", "format": fmt})
        try:
            assert resp.status == 200
            body = resp.read()
        finally:
            conn.close()
    print(f"{fmt} of {MID} entries: {len(body)} bytes in {time.monotonic() - started:.1f} s; "
          f"peak RSS growth {rss.growth / MiB:.1f} MiB")
    assert rss.growth < ARCHIVE_RSS_BOUND
    if fmt == "tar.gz":
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as t:
            members = t.getnames()
    else:
        members = [n.rstrip("/") for n in zipfile.ZipFile(io.BytesIO(body)).namelist()]
    assert len(members) == MID + 1 and set(members) == {"mid"} | {f"mid/{n}" for n in names("m", MID)}


@pytest.mark.parametrize("params", [
    {"limit": "0"}, {"limit": "10001"}, {"limit": "-1"}, {"limit": "many"},
    {"cursor": ""}, {"cursor": "not/base64"}, {"cursor": "x" * 65}, {"cursor": "AAAA"},
    {"cursor": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},  # well-formed, but no directory of this inode
    {"offset": "-1"}, {"recursive": "true", "cursor": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
])
def test_paging_bounds_are_enforced(big: Big, params: dict[str, str]) -> None:
    r = big.agent.request("GET", "/mounts/million/files", {"path": "/big", **params})
    assert r.status == 400, r.body
    assert r.json["code"] in ("invalid_request", "invalid_cursor")


def test_a_cursor_of_another_directory_is_refused(big: Big) -> None:
    cursor = big.agent.files("million", "/mid", limit=5)["next_cursor"]
    r = big.agent.request("GET", "/mounts/million/files", {"path": "/big", "cursor": cursor})
    assert (r.status, r.json["code"]) == (400, "invalid_cursor")
    following = big.agent.files("million", "/mid", limit=5, cursor=cursor)
    assert following["total_count"] == 10 and len(following["files"]) == 5


def test_a_recursive_listing_stops_at_its_entry_limit_without_reading_the_rest(big: Big) -> None:
    with PeakRss(big.pid) as rss:
        deep = big.agent.files("million", "/", recursive="true", limit=10000)
    # list_max_entries (10000) bounds what is collected, names read but not yet listed included.
    assert deep["truncated"] and 9000 < deep["total_count"] <= 10000 and deep["next_cursor"] is None
    assert deep["files"][0]["path"] == "/big" and all(e["path"].startswith("/big/") for e in deep["files"][1:])
    assert rss.growth < RSS_BOUND
