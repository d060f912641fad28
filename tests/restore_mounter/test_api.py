"""restore-mounter's agent API through the real daemon and socket, on raw images built without mounting.

One daemon serves the whole module with eight mounts (one per kind of image: its eight slots); the tests
read them. Tests that change mounts start their own daemon (test_lifecycle.py).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..lib.diskimages import (
    Dir,
    File,
    MiB,
    Pattern,
    Symlink,
    Tree,
    dir_manifest,
    gpt_ntfs,
    gpt_two_ext4,
    gpt_xfs,
    mbr_ext4,
    mbr_fat,
    normalize,
    run,
    tree_manifest,
    tree_sha256,
    whole_disk_ext4,
)
from restore_mounter.api import RestoreApi
from restore_mounter.files import Browser

from ..lib.filetree import file_sha256, materialize
from ..lib.gate import Gate, cancel_inside, open_fds
from .conftest import Agent, module_stack, special_ext4, start_agent
from .test_expiry import Rig, rig  # noqa: F401  (the fixture: a MountManager in-process on a real nbd-pool)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

T0 = 1_500_000_000
LINUX: Tree = {
    "etc/passwd": File(b"root:x:0:0:root:/root:/bin/sh\n", mtime=T0),
    "etc/shadow": File(b"root:$6$guestsecret\n", mode=0o640, mtime=T0 + 1, gid=42),
    "usr/bin/su": File(b"#!suid\n", mode=0o4755, mtime=T0 + 2),
    "usr/lib/libc.so": File(os.urandom(70_000), mtime=T0 + 3),
    "lib": Symlink("usr/lib"),
    "tmp": Dir(mode=0o1777, mtime=T0 + 4),
    "var/empty": Dir(mode=0o700, mtime=T0 + 5),
    "empty.txt": File(b"", mtime=T0 + 6),
    "home/user": Dir(mode=0o750, uid=1000, gid=1000, mtime=T0 + 7),
    "home/user/notes.txt": File(b"line\n" * 1000, uid=1000, gid=1000, mtime=T0 + 8),
    "home/user/with space.txt": File(b"spaces are fine\n", mtime=T0 + 9),
    "home/user/evil": Symlink("/etc/shadow"),
    "home/user/up": Symlink("../.."),
    "home/user/escape": Symlink("../../.."),
    "home/user/hostetc": Symlink("/etc"),
    "home/user/chain": Symlink("chain2"),
    "home/user/chain2": Symlink("../../../../etc/passwd"),
    "home/user/loop1": Symlink("loop2"),
    "home/user/loop2": Symlink("loop1"),
    "home/user/procroot": Symlink("/proc/self/root"),
    "home/user/docs/ünïcode €.txt": File("unicode\n".encode(), mtime=T0 + 10),
}
XFS = {k: v for k, v in LINUX.items() if " " not in k}  # mkfs.xfs protofiles cannot name spaces
SECOND: Tree = {"data/readme": File(b"second partition\n", mtime=T0), "data/blob.bin": os.urandom(300_000)}
MBR: Tree = {"hello.txt": File(b"hello mbr\n", mtime=T0), **{f"many/f{i:04d}": b"%d\n" % i for i in range(1100)}}
BIG = File(Pattern(200 * MiB, seed=7), mtime=T0)
WHOLE: Tree = {"big.bin": BIG, "small.txt": File(b"small\n", mtime=T0)}
WINDOWS: Tree = {
    "Windows/System32/drivers/etc/hosts": File(b"127.0.0.1 localhost\r\n", mtime=T0),
    "Users/Public/Documents/report.docx": File(os.urandom(70_000), mtime=T0 + 60),
    "Users/Public/empty.txt": File(b"", mtime=T0 + 120),
    "Program Files/App/app.exe": File(os.urandom(5000), mtime=T0 + 180),
}
FAT: Tree = {"README.TXT": b"fat readme\r\n", "Documents/Long File Name.txt": os.urandom(9000),
             "DATA/BLOB.BIN": os.urandom(40_000)}
BTRFS: Tree = {"srv/www/index.html": File(b"<html/>\n", mtime=T0), "srv/link": Symlink("www/index.html")}


@dataclass
class Module:
    agent: Agent
    mounts: dict[str, dict[str, Any]]
    images: dict[str, Path]


def btrfs_image(path: Path, tree: Tree) -> Path:
    src = Path(tempfile.mkdtemp(dir=path.parent, prefix=".btrfs-"))
    try:
        os.chmod(src, 0o755)
        materialize(tree, src)
        with open(path, "wb") as f:
            f.truncate(128 * MiB)
        run(["mkfs.btrfs", "-q", "-f", "-L", "btrfs", "--rootdir", src, path])
    finally:
        shutil.rmtree(src)
    return path


@pytest.fixture(scope="module")
def mod() -> Iterator[Module]:
    with module_stack("oma-rm-") as stack:
        imgs = stack.state / "images"
        imgs.mkdir()
        images = {
            "gpt2": gpt_two_ext4(imgs / "gpt2.raw", LINUX, SECOND).path,
            "mbr": mbr_ext4(imgs / "mbr.raw", MBR).path,
            "whole": whole_disk_ext4(imgs / "whole.raw", WHOLE).path,
            "xfs": gpt_xfs(imgs / "xfs.raw", XFS).path,
            "ntfs": gpt_ntfs(imgs / "ntfs.raw", WINDOWS).path,
            "fat": mbr_fat(imgs / "fat.raw", FAT).path,
            "special": special_ext4(imgs / "special.raw", LINUX),
            "btrfs": btrfs_image(imgs / "btrfs.raw", BTRFS),
        }
        agent = start_agent(stack, "list_max_entries = 1000\n")
        mounts = {name: agent.mount(path, name) for name, path in images.items()}
        yield Module(agent, mounts, images)


def expected(tree: Tree, prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}/{p}": n for p, n in normalize(tree).items()}


def check_metadata(listing: dict[str, dict[str, Any]], tree: Tree, prefix: str = "", *, modes: bool = True,
                   owners: bool = True, mtimes: bool = True) -> None:
    want = expected(tree, prefix)
    extra = set(listing) - set(want)
    assert extra <= {f"{prefix}/lost+found"}, extra
    for path, node in want.items():
        e = listing[path]
        kind = {File: "file", Dir: "directory", Symlink: "symlink"}[type(node)]
        assert e["type"] == kind, (path, e)
        if isinstance(node, File):
            assert e["size"] == node.size, path
        if isinstance(node, Symlink):
            assert e["symlink_target"] == node.target, path
        elif modes:
            assert e["mode"] == f"{node.mode:04o}", (path, e["mode"])
        if owners:
            assert (e["uid"], e["gid"]) == (node.uid, node.gid), path
        if mtimes and node.mtime is not None and not isinstance(node, Symlink):
            assert e["mtime"] == node.mtime, path


def check_contents(agent: Agent, mount_id: str, tree: Tree, prefix: str = "") -> None:
    for path, digest in tree_sha256(tree).items():
        r = agent.download(mount_id, f"{prefix}/{path}")
        assert r.status == 200, (path, r.body[:200])
        assert hashlib.sha256(r.body).hexdigest() == digest, path


def test_mount_shape_and_mount_options(mod: Module) -> None:
    m = mod.mounts["gpt2"]
    assert m["status"] == "mounted" and m["backend"] == "fuse-loop" and m["filesystem_type"] == "ext4"
    assert m["device"].startswith("/dev/loop") and m["mount_path"] == str(mod.agent.mount_root / "gpt2")
    fss = [(f["partition"], f["type"], f["label"], f["mounted"], f["path"]) for f in m["filesystems"]]
    assert fss == [(1, "ext4", "root", True, "/part1"), (2, "ext4", "data", True, "/part2")]
    assert m["expires_at"] and m["idle_timeout_seconds"] == 3600
    with open("/proc/self/mountinfo") as f:
        ours = [line.split() for line in f if str(mod.agent.mount_root) in line]
    assert len(ours) == 9  # gpt2 has two filesystems
    for fields in ours:
        opts = set(fields[5].split(","))
        assert {"ro", "nosuid", "nodev", "noexec"} <= opts, fields
    root = mod.agent.files("gpt2")
    assert [(e["name"], e["type"]) for e in root["files"]] == [("part1", "directory"), ("part2", "directory")]


def test_gpt_two_ext4(mod: Module) -> None:
    listing = mod.agent.all_files("gpt2")
    check_metadata({k: v for k, v in listing.items() if k.startswith("/part1/")}, LINUX, "/part1")
    check_metadata({k: v for k, v in listing.items() if k.startswith("/part2/")}, SECOND, "/part2", mtimes=False)
    check_contents(mod.agent, "gpt2", LINUX, "/part1")
    check_contents(mod.agent, "gpt2", SECOND, "/part2")


def test_mbr_ext4_and_paging(mod: Module) -> None:
    top = mod.agent.files("mbr")
    assert [e["name"] for e in top["files"]] == ["hello.txt", "lost+found", "many"]
    assert mod.agent.download("mbr", "hello.txt").body == b"hello mbr\n"
    # Pages of 400 continue by cursor: each sorted, together every entry once; the last one says the size.
    names: list[str] = []
    cursor = None
    for expect_next in (True, True, False):
        page = mod.agent.files("mbr", "/many", limit=400, **({"cursor": cursor} if cursor else {}))
        listed = [e["name"] for e in page["files"]]
        assert listed == sorted(listed) and not page["truncated"]
        names += listed
        assert page["total_count"] == len(names) and bool(page["next_cursor"]) == expect_next
        cursor = page["next_cursor"]
    assert sorted(names) == [f"f{i:04d}" for i in range(1100)]
    # offset skips entries after the cursor (or the start): the same entries, in the same order.
    first = mod.agent.files("mbr", "/many", limit=800)
    skipped = mod.agent.files("mbr", "/many", limit=400, offset=400)
    assert {e["name"] for e in skipped["files"]} == {e["name"] for e in first["files"]} - set(names[:400])
    assert skipped["total_count"] == 800
    deep = mod.agent.files("mbr", "/", recursive="true", limit=10000)
    assert deep["truncated"] and deep["total_count"] == 1000  # list_max_entries
    shallow = mod.agent.files("mbr", "/", recursive="true", depth=1)
    assert shallow["total_count"] == 3


@pytest.mark.parametrize(("mount_id", "path"), [("gpt2", "/part1/home/user"), ("xfs", "/home/user"),
                                                ("btrfs", "/srv"), ("ntfs", "/"), ("fat", "/"), ("mbr", "/many")])
def test_cursor_paging_on_every_filesystem(mod: Module, mount_id: str, path: str) -> None:
    """readdir positions resume where the page ended on each filesystem (FUSE ones too): one entry a page."""
    whole = [e["name"] for e in mod.agent.files(mount_id, path, limit=10000)["files"]]
    seen: list[str] = []
    cursor = None
    while True:
        page = mod.agent.files(mount_id, path, limit=1, **({"cursor": cursor} if cursor else {}))
        seen += [e["name"] for e in page["files"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == whole and len(whole) > 1


def test_whole_disk_ext4_and_a_big_file_handed_over(mod: Module) -> None:
    check_metadata(mod.agent.all_files("whole"), WHOLE)
    with mod.agent.handover("/mounts/whole/open?path=/big.bin") as h:
        reply, fd = h.reply, h.fd
        assert reply.status == 200 and fd is not None
        assert reply.json["size"] == 200 * MiB and reply.json["name"] == "big.bin"
        assert os.fstat(fd).st_size == 200 * MiB
        assert os.get_blocking(fd) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(OSError):
            os.write(fd, b"x")  # handed over read-only
        digest = hashlib.sha256()
        while chunk := os.read(fd, 4 * MiB):
            digest.update(chunk)
    assert digest.hexdigest() == file_sha256(BIG)


def test_xfs(mod: Module) -> None:
    check_metadata(mod.agent.all_files("xfs"), XFS)
    check_contents(mod.agent, "xfs", XFS)
    assert mod.mounts["xfs"]["filesystem_type"] == "xfs"


def test_btrfs(mod: Module) -> None:
    check_metadata(mod.agent.all_files("btrfs"), BTRFS, mtimes=False)
    assert mod.agent.download("btrfs", "srv/link").body == b"<html/>\n"


def test_ntfs(mod: Module) -> None:
    assert mod.mounts["ntfs"]["filesystems"][0]["driver"] == "ntfs-3g"
    listing = mod.agent.all_files("ntfs")
    # NTFS keeps its own metadata files at the root ($MFT... are hidden by ntfs-3g; "System Volume
    # Information" is not); modes and owners do not exist there.
    listing = {k: v for k, v in listing.items() if not k.startswith("/System Volume Information")}
    check_metadata(listing, WINDOWS, modes=False, owners=False)
    check_contents(mod.agent, "ntfs", WINDOWS)


def test_fat(mod: Module) -> None:
    fs = mod.mounts["fat"]["filesystems"][0]
    assert (fs["type"], fs["label"], fs["mounted"]) == ("vfat", "OMAFAT", True)
    listing = mod.agent.all_files("fat")
    if fs["driver"] == "fusefat":
        # fusefat lists the volume label as an empty file, and its mtimes are a month late (it does not
        # subtract 1 from the DOS month); the kernel's vfat (the appliance) has neither quirk.
        assert listing.pop("/OMAFAT")["size"] == 0
    check_metadata(listing, FAT, modes=False, owners=False, mtimes=False)
    check_contents(mod.agent, "fat", FAT)


def test_file_info(mod: Module) -> None:
    r = mod.agent.request("GET", "/mounts/gpt2/file-info", {"path": "/part1/etc/shadow"})
    assert r.status == 200
    info = r.json
    assert (info["type"], info["size"], info["mode"], info["uid"], info["gid"], info["mtime"]) == \
           ("file", 20, "0640", 0, 42, T0 + 1)
    assert info["modified_at"] == "2017-07-14T02:40:01Z" and info["name"] == "shadow"
    link = mod.agent.request("GET", "/mounts/gpt2/file-info", {"path": "/part1/home/user/evil"}).json
    assert (link["type"], link["symlink_target"]) == ("symlink", "/etc/shadow")
    suid = mod.agent.request("GET", "/mounts/gpt2/file-info", {"path": "/part1/usr/bin/su"}).json
    assert suid["mode"] == "4755"


def test_handed_over_files_describe_themselves(mod: Module) -> None:
    """What omad's download headers are made of (Range, ETag, Content-Disposition: oma_common.filestream)."""
    small = mod.agent.download("whole", "small.txt")
    assert small.status == 200 and small.body == b"small\n"
    with mod.agent.handover("/mounts/whole/open?path=small.txt") as h:
        assert h.fd is not None
        st = os.fstat(h.fd)
        meta = h.reply.json
    assert meta == {"name": "small.txt", "size": 6, "mtime": st.st_mtime, "mime_type": "text/plain",
                    "etag": f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'}
    with mod.agent.handover("/mounts/gpt2/open?path=%2Fpart1%2Fhome%2Fuser%2Fdocs%2F%C3%BCn%C3%AFcode%20%E2%82%AC.txt"
                            ) as h:
        assert h.reply.status == 200 and h.reply.json["name"] == "ünïcode €.txt"


def _extract(fmt: str, body: bytes, dest: Path) -> None:
    archive = dest.parent / f"a.{fmt}"
    archive.write_bytes(body)
    if fmt == "zip":
        run(["unzip", "-q", "-K", archive, "-d", dest])  # Info-ZIP restores symlinks and modes (-K: setuid, sticky)
    else:
        dest.mkdir()
        run(["tar", "-xzf", archive, "-C", dest])


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_archive_extracts_to_the_source_tree(mod: Module, fmt: str, tmp_path: Path) -> None:
    r = mod.agent.request("GET", "/mounts/gpt2/download-directory", {"path": "/part1", "format": fmt})
    assert r.status == 200, r.body[:300]
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.headers["content-disposition"].startswith(f'attachment; filename="part1.{fmt}"')
    _extract(fmt, r.body, tmp_path / "out")
    got = dir_manifest(tmp_path / "out" / "part1")
    got.pop("lost+found")
    assert got == tree_manifest(LINUX)
    assert (tmp_path / "out" / "part1" / "home" / "user" / "evil").is_symlink()
    assert not (tmp_path / "out" / "OMA-RESTORE-SKIPPED.json").exists()


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_archive_of_a_subdirectory_and_of_several_filesystems(mod: Module, fmt: str) -> None:
    r = mod.agent.request("GET", "/mounts/gpt2/download-directory", {"path": "/part1/home", "format": fmt})
    names = _members(fmt, r.body)
    assert "home/user/notes.txt" in names and all(n.startswith("home") for n in names)
    r = mod.agent.request("GET", "/mounts/gpt2/download-directory", {"path": "/", "format": fmt})
    names = _members(fmt, r.body)
    assert {"gpt2/part1/etc/passwd", "gpt2/part2/data/readme"} <= names


def _members(fmt: str, body: bytes) -> set[str]:
    if fmt == "zip":
        return {n.rstrip("/") for n in zipfile.ZipFile(io.BytesIO(body)).namelist()}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as t:
        return set(t.getnames())


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_archive_skips_special_files_and_says_so(mod: Module, fmt: str, tmp_path: Path) -> None:
    r = mod.agent.request("GET", "/mounts/special/download-directory", {"path": "/", "format": fmt})
    assert r.status == 200
    _extract(fmt, r.body, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "OMA-RESTORE-SKIPPED.json").read_text())
    skipped = {e["path"]: e["reason"] for e in manifest["skipped"]}
    assert set(skipped) == {"special/dev/fifo", "special/dev/null", "special/dev/sda", "special/dev/sock"}
    assert "never read" in skipped["special/dev/fifo"]
    assert sorted(os.listdir(tmp_path / "out" / "special" / "dev")) == []
    assert (tmp_path / "out" / "special" / "etc" / "shadow").read_bytes() == b"root:$6$guestsecret\n"


def test_special_files_are_listed_never_opened(mod: Module) -> None:
    listing = mod.agent.all_files("special", "/dev")
    assert {e["name"]: e["type"] for e in listing.values()} == {
        "fifo": "fifo", "null": "char_device", "sda": "block_device", "sock": "socket"}
    for name in ("fifo", "null", "sda", "sock"):
        r = mod.agent.download("special", f"/dev/{name}")
        assert (r.status, r.json["code"]) == (403, "special_file"), name


HOST_SECRETS = [Path("/etc/shadow").read_bytes() if os.path.exists("/etc/shadow") else b"\0nothing",
                Path("/etc/hostname").read_bytes() if os.path.exists("/etc/hostname") else b"\0nothing"]

# (how the path is sent, expected status, expected code)
ESCAPES = [
    ("../../../../etc/shadow", 400, "invalid_path"),
    ("/../etc/shadow", 400, "invalid_path"),
    ("etc/../../etc/shadow", 400, "invalid_path"),
    ("home/user/../../..", 400, "invalid_path"),
    ("etc/passwd\0.txt", 400, "invalid_request"),
    ("x" * 4100, 400, "invalid_path"),
    ("d/" + "y" * 256, 400, "invalid_path"),
    ("home/user/evil", 403, "path_escapes_mount"),  # guest symlink to /etc/shadow
    ("home/user/escape/etc/shadow", 403, "path_escapes_mount"),  # ../../.. climbs above the root
    ("home/user/hostetc/shadow", 403, "path_escapes_mount"),  # symlinked directory to /etc
    ("home/user/hostetc/hostname", 403, "path_escapes_mount"),
    ("home/user/chain", 403, "path_escapes_mount"),  # a chain of links that ends outside
    ("home/user/loop1", 403, "path_escapes_mount"),  # a loop
    ("home/user/procroot/etc/shadow", 403, "path_escapes_mount"),  # /proc magic link
    ("home/user/evil/x", 403, "path_escapes_mount"),
    ("dev/null", 403, "special_file"),
    ("dev/sda", 403, "special_file"),
    ("dev/fifo", 403, "special_file"),
    ("%2e%2e/%2e%2e/etc/shadow", 404, "not_found"),  # sent encoded twice: a literal name here
    ("..\\..\\etc\\shadow", 404, "not_found"),  # a backslash is a character on Linux
    ("C:\\Windows\\win.ini", 404, "not_found"),
    ("\uff0e\uff0e/\uff0e\uff0e/etc/shadow", 404, "not_found"),  # fullwidth dots are not dots
    ("/etc/hostname", 404, "not_found"),  # "/" is the backup's root: the host's files are not there
    (f"{Path.cwd()}/etc/passwd", 404, "not_found"),
    ("home/user", 400, "invalid_request"),  # a directory is not downloaded
]


@pytest.mark.parametrize("path,status,code", ESCAPES)
def test_escape_attempts_fail_without_host_content(mod: Module, path: str, status: int, code: str) -> None:
    for route in ("open", "file-info", "files", "download-directory"):
        r = mod.agent.download("special", path) if route == "open" else \
            mod.agent.request("GET", f"/mounts/special/{route}", {"path": path})
        for secret in HOST_SECRETS:
            assert secret not in r.body
        assert r.status != 500, (route, r.body)
        if route == "open":
            assert (r.status, r.json["code"]) == (status, code), r.body
        elif status == 403 and code == "path_escapes_mount" and route != "file-info":
            assert (r.status, r.json["code"]) == (status, code), (route, r.body)


@pytest.mark.parametrize("target,status", [
    ("/mounts/special/open?path=..%2f..%2f..%2fetc%2fshadow", 400),  # encoded separators decode to ".."
    ("/mounts/special/open?path=%2e%2e%2f%2e%2e%2fetc%2fshadow", 400),
    ("/mounts/special/open?path=etc%2Fpasswd%00", 400),
    ("/mounts/..%2f..%2fetc/open?path=passwd", 404),  # a mount id is never a path
    ("/mounts/special/../../etc/open?path=shadow", 404),
    ("/mounts/special/open?path=/home/user/up/etc/passwd", 200),  # a link that stays inside
])
def test_raw_request_targets(mod: Module, target: str, status: int) -> None:
    r = mod.agent.fetch(target)
    assert r.status == status, r.body
    for secret in HOST_SECRETS:
        assert secret not in r.body
    if status == 200:
        assert r.body == b"root:x:0:0:root:/root:/bin/sh\n"  # the guest's passwd, not the host's


def test_listing_shows_links_but_never_follows_them_out(mod: Module) -> None:
    listing = mod.agent.all_files("special", "/home/user")
    assert listing["/home/user/evil"]["symlink_target"] == "/etc/shadow"
    assert "/home/user/hostetc/shadow" not in listing
    r = mod.agent.request("GET", "/mounts/special/files", {"path": "/home/user/hostetc"})
    assert (r.status, r.json["code"]) == (403, "path_escapes_mount")
    inside = mod.agent.files("special", "/home/user/up")  # ../.. is the filesystem's own root
    assert "etc" in [e["name"] for e in inside["files"]]


def test_slots_resources_and_idempotent_mount(mod: Module) -> None:
    res = mod.agent.request("GET", "/resources").json
    assert (res["active_mounts"], res["max_mounts"], res["available_slots"], res["device_utilization"]) == \
           (8, 8, 0, 100.0)
    assert len(res["allocated_devices"]) == 8
    again = mod.agent.mount(mod.images["mbr"], "mbr", expect=200)
    assert again["mount_id"] == "mbr"
    r = mod.agent.request("POST", "/mounts", body={"image": str(mod.agent.image(mod.images["fat"])), "mount_id": "mbr"})
    assert (r.status, r.json["code"]) == (409, "conflict")
    r = mod.agent.request("POST", "/mounts", body={"image": str(mod.agent.image(mod.images["mbr"]))})
    assert (r.status, r.json["code"], r.json["available_slots"]) == (409, "exhausted", 0)
    status = mod.agent.request("GET", "/cleanup-status").json
    assert status["running"] and status["active_mount_count"] == 8 and status["expired_mount_count"] == 0
    assert status["idle_timeout"] == 3600 and status["cleanup_interval"] == 60
    listed = mod.agent.request("GET", "/mounts").json
    assert listed["count"] == 8 and {m["mount_id"] for m in listed["mounts"]} == set(mod.images)


def test_status_reads_are_not_activity(mod: Module) -> None:
    before = mod.agent.request("GET", "/mounts/btrfs").json["last_activity_at"]
    for _ in range(3):
        mod.agent.request("GET", "/mounts/btrfs")
        mod.agent.request("GET", "/mounts")
    assert mod.agent.request("GET", "/mounts/btrfs").json["last_activity_at"] == before
    assert stat.S_ISDIR(os.stat(mod.mounts["btrfs"]["mount_path"]).st_mode)


async def test_an_open_cancelled_in_its_thread_closes_the_descriptor(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """omad hangs up (or times out) while the file is being opened in the mount: the descriptor the thread then
    returns is closed, so the mount is not held open by a file nobody will read."""
    await rig.manager.mount(str(rig.image), "m")
    browser = Browser()
    api = RestoreApi(rig.manager, browser, rig.sweeper, ThreadPoolExecutor(1))  # archives: unused here
    gate = Gate(browser.open)
    monkeypatch.setattr(browser, "open", gate)
    async with rig.manager.use("m") as held:
        before = open_fds()
        task = asyncio.create_task(api._open(held, "/etc/hostname"))
        await cancel_inside(gate, task)
        assert open_fds() == before
    await rig.manager.unmount("m")  # nothing holds the filesystem busy
