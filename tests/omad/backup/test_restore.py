"""File-level restore from real backups, through the whole path: omad → restore-mounter → nbd-pool's
read-only attach (fuse-loop here) → read-only mounts; files come back to the user through omad's relay."""

from __future__ import annotations

import hashlib
import io
import signal
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from oma_common import schema
from omad.restore.service import RestoreMount, RestoreMountList
from tests.sim.vma import Inventory

from ...lib.diskimages import File, Pattern, ext4_modify, whole_disk_ext4
from ...restore_mounter.conftest import leaks
from ...rig import Stack
from ..conftest import PASSWORD, USER, VCENTER
from .conftest import TWO_DISK_VM, Rig, open_rig
from .test_restart import start_omad

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.root]

MiB = 1024 * 1024


async def mount(rig: Rig, backup_id: str, disk_index: int = 0) -> dict[str, Any]:
    status, body = await rig.api.post("/restore/mount", {"backup_id": backup_id, "disk_index": disk_index})
    assert status == 201, body
    return body


async def read(rig: Rig, mount_id: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    url = f"{rig.api.base}/api/v1/restore/{mount_id}/download"
    async with rig.api.session.get(url, params={"path": path}, headers={**rig.api._headers(None),
                                                                        **(headers or {})}) as r:
        return r.status, await r.read(), r.headers


async def attachments(rig: Rig) -> list[dict[str, Any]]:
    """nbd-pool's attachments (each mount's image, attached read-only)."""
    pool = rig.pool()
    try:
        return (await pool.call("GET", "/attachments"))["attachments"]  # type: ignore[no-any-return]
    finally:
        await pool.close()


async def test_restore_files_from_a_full_and_an_incremental(rig: Rig) -> None:
    src0 = rig.source(TWO_DISK_VM, 0)
    full = await rig.backup(TWO_DISK_VM, "full")
    image = rig.images[TWO_DISK_VM]
    ext4_modify(src0, image.partition(1).offset, add={"etc/motd": b"changed\n"})
    inc = await rig.backup(TWO_DISK_VM, "incremental")

    old = await mount(rig, full["backup_id"])
    new = await mount(rig, inc["backup_id"])
    for m in (old, new):
        assert m["status"] == "mounted" and m["mount_id"].startswith("rm-") and m["expires_at"]
        assert [(f["type"], f["mounted"]) for f in m["filesystems"]] == [("ext4", True), ("ext4", True)]
    # Two filesystems: the top of the browse tree lists them.
    status, top = await rig.api.get(f"/restore/{new['mount_id']}/files")
    assert status == 200 and [f["name"] for f in top["files"]] == ["part1", "part2"]
    assert (await read(rig, old["mount_id"], "/part1/etc/motd"))[:2] == (200, b"welcome\n")
    # A directory page by page: omad passes limit and cursor through; bad ones are 400.
    seen: list[str] = []
    params: dict[str, str] = {"path": "/part1/etc", "limit": "1"}
    while True:
        status, page = await rig.api.get(f"/restore/{new['mount_id']}/files", params=params)
        assert status == 200 and len(page["files"]) == 1 and page["total_count"] == len(seen) + 1
        seen.append(page["files"][0]["name"])
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    status, whole = await rig.api.get(f"/restore/{new['mount_id']}/files", params={"path": "/part1/etc"})
    assert sorted(seen) == [f["name"] for f in whole["files"]] and len(seen) > 1
    for bad in ({"limit": "10001"}, {"limit": "0"}, {"cursor": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}, {"cursor": "a b"}):
        status, body = await rig.api.get(f"/restore/{new['mount_id']}/files", params={"path": "/part1/etc", **bad})
        assert status == 400, (bad, body)
    assert (await read(rig, new["mount_id"], "/part1/etc/motd"))[:2] == (200, b"changed\n")

    # A file's bytes and a range of them.
    want = b"".join(Pattern(3 * MiB, seed=7).chunks())
    status, data, headers = await read(rig, new["mount_id"], "/part1/var/lib/app/data.bin")
    assert status == 200 and headers["Content-Length"] == str(3 * MiB)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(want).hexdigest()
    status, part, headers = await read(rig, new["mount_id"], "/part1/var/lib/app/data.bin",
                                       {"Range": "bytes=100-199"})
    assert status == 206 and part == data[100:200] and headers["Content-Range"] == f"bytes 100-199/{3 * MiB}"

    status, info = await rig.api.get(f"/restore/{new['mount_id']}/file-info", params={"path": "/part2/db/README"})
    assert status == 200 and info["type"] == "file" and info["size"] == len(b"backup me\n")

    # A directory as a zip, streamed through omad.
    url = f"{rig.api.base}/api/v1/restore/{new['mount_id']}/download-directory"
    async with rig.api.session.get(url, params={"path": "/part2/db", "format": "zip"},
                                   headers=rig.api._headers(None)) as r:
        assert r.status == 200
        archive = zipfile.ZipFile(io.BytesIO(await r.read()))
    names = sorted(n.split("/", 1)[1] for n in archive.namelist() if not n.endswith("/"))
    assert names == ["README", "table1"]

    # Escapes are refused and never return host content.
    for path in ("/../../../../etc/shadow", "/part1/../../../etc/passwd", "/etc/shadow\x00", "/part1/%2e%2e/x"):
        status, body, _ = await read(rig, new["mount_id"], path)
        assert 400 <= status < 500, (path, status)
        assert b"root:" not in body

    status, listing = await rig.api.get("/restore/mounts")
    assert status == 200 and listing["count"] == 2
    status, res = await rig.api.get("/restore/resources")
    assert status == 200 and res["active_mounts"] == 2
    assert (await rig.api.get("/restore/cleanup-status"))[0] == 200

    for m in (old, new):
        status, body = await rig.api.delete(f"/restore/{m['mount_id']}")
        assert status == 200, body
    assert (await rig.api.get("/restore/mounts"))[1]["count"] == 0
    assert (await rig.api.get(f"/restore/{new['mount_id']}/files"))[0] == 404
    assert await attachments(rig) == []
    audit = rig.stack.sql("SELECT actor, action, resource FROM audit_log WHERE action LIKE 'restore.%' ORDER BY id")
    assert audit == [("admin", "restore.mount", f"backup:{full['backup_id']}"),
                     ("admin", "restore.mount", f"backup:{inc['backup_id']}"),
                     ("admin", "restore.unmount", f"mount:{old['mount_id']}"),
                     ("admin", "restore.unmount", f"mount:{new['mount_id']}")], audit


async def test_a_killed_attachment_shows_the_mount_broken_never_a_500(rig: Rig) -> None:
    """The qemu-storage-daemon under a mount is killed (as the OOM killer would): the API says the mount is
    broken and why, /health is degraded, the unmount leaves nothing, and mounting again works."""
    backup = await rig.backup(TWO_DISK_VM, "full")
    m = await mount(rig, backup["backup_id"])
    mount_id = m["mount_id"]
    (att,) = await attachments(rig)
    qsd = psutil.Process(att["pid"])  # only this test's own: a child of its nbd-pool, in its work dir
    assert qsd.ppid() == rig.stack.daemons["nbd-pool"].pid
    assert Path(qsd.cmdline()[0]).name == "qemu-storage-daemon" and str(rig.stack.state) in " ".join(qsd.cmdline())
    qsd.kill()
    qsd.wait(10)

    way_back = {"unmount": {"method": "DELETE", "path": f"/api/v1/restore/{mount_id}"},
                "mount": {"method": "POST", "path": "/api/v1/restore/mount",
                          "body": {"backup_id": backup["backup_id"], "disk_index": 0}}}
    status, body = await rig.api.get(f"/restore/{mount_id}/files", params={"path": "/part2/db"})
    assert status == 503, body
    assert body["code"] == "mount_broken" and body["remount"] == way_back
    assert f"qemu-storage-daemon (pid {qsd.pid})" in body["details"] and "SIGKILL" in body["cause"], body
    # omad wrote down what restore-mounter's 503 told it: from now on its own record says broken.
    assert row(rig, mount_id) == ("broken", body["cause"])
    status, data, _ = await read(rig, mount_id, "/part1/var/lib/app/data.bin")
    assert status == 503 and b"mount_broken" in data
    status, body = await rig.api.get(f"/restore/{mount_id}/file-info", params={"path": "/part1/etc/motd"})
    assert status == 503 and body["code"] == "mount_broken"
    status, listing = await rig.api.get("/restore/mounts")
    (shown,) = listing["mounts"]
    assert shown["status"] == "broken" and shown["remount"] == way_back and "SIGKILL" in shown["error"], shown
    assert await rig.api.get(f"/restore/{mount_id}") == (200, shown)
    assert schema.parse(RestoreMountList, listing).mounts[0].status == "broken"  # the declared shape, exactly

    status, public = await rig.api.get("/health", token="")
    assert public["status"] == "degraded" and public["components"]["restore-mounter"] == {"status": "degraded"}
    assert public["components"]["nbd-pool"]["status"] == "ok"
    status, full = await rig.api.get("/health")
    (broken,) = full["components"]["restore-mounter"]["broken_mounts"]
    assert broken["mount_id"] == mount_id and str(qsd.pid) in broken["error"]

    status, body = await rig.api.delete(f"/restore/{mount_id}")
    assert status == 200, body
    assert row(rig, mount_id)[0] == "unmounted"
    status, ended = await rig.api.get(f"/restore/{mount_id}")
    assert status == 200 and ended["status"] == "unmounted" and ended["ended_at"] and ended["remount"] is None
    schema.parse(RestoreMount, ended)
    assert (await rig.api.get("/restore/mounts"))[1] == {"mounts": [], "count": 0}
    assert leaks(rig.stack.state / "restore", []) == []
    assert list((rig.stack.state / "restore").iterdir()) == []
    assert await attachments(rig) == []
    assert (await rig.api.get("/health", token=""))[1]["status"] == "healthy"

    again = await mount(rig, backup["backup_id"])
    status, top = await rig.api.get(f"/restore/{again['mount_id']}/files", params={"path": "/part2/db"})
    assert status == 200 and [f["name"] for f in top["files"]] == ["README", "table1"]
    assert (await read(rig, again["mount_id"], "/part2/db/README"))[:2] == (200, b"backup me\n")
    assert (await rig.api.delete(f"/restore/{again['mount_id']}"))[0] == 200


def row(rig: Rig, mount_id: str) -> tuple[str, str | None]:
    """omad's own record of a mount: status and error_message."""
    ((status, error),) = rig.stack.sql("SELECT status, error_message FROM restore_mounts WHERE id = ?", (mount_id,))
    return status, error


async def kill_attachment(rig: Rig, mount_id: str) -> psutil.Process:
    """Kill the qemu-storage-daemon under one mount (only this test's own: a child of its nbd-pool)."""
    (att,) = [a for a in await attachments(rig) if a["owner"] == f"restore-mounter:{mount_id}"]
    qsd = psutil.Process(att["pid"])
    assert qsd.ppid() == rig.stack.daemons["nbd-pool"].pid and Path(qsd.cmdline()[0]).name == "qemu-storage-daemon"
    qsd.kill()
    qsd.wait(10)
    return qsd


async def test_omad_records_a_broken_mount_and_still_knows_it_after_a_restart(rig: Rig) -> None:
    """Whichever answer of restore-mounter tells omad a mount broke (its health report, or the mount read on its
    own), omad's record says `broken` from then on: after omad restarts too, and until DELETE ends it."""
    full = await rig.backup(TWO_DISK_VM, "full")
    inc = await rig.backup(TWO_DISK_VM, "incremental")
    by_health, by_read, fine = [(await mount(rig, b["backup_id"]))["mount_id"] for b in (full, inc, inc)]

    qsd = await kill_attachment(rig, by_health)
    assert row(rig, by_health) == ("mounted", None)  # nothing asked yet: omad cannot know
    status, report = await rig.api.get("/health", token="")
    assert status == 200 and report["status"] == "degraded"
    state, cause = row(rig, by_health)
    assert state == "broken" and cause and f"(pid {qsd.pid})" in cause and "SIGKILL" in cause

    await kill_attachment(rig, by_read)
    status, shown = await rig.api.get(f"/restore/{by_read}")
    assert status == 200 and shown["status"] == "broken" and "SIGKILL" in shown["error"], shown
    assert shown["remount"]["mount"]["body"] == {"backup_id": inc["backup_id"], "disk_index": 0}
    assert row(rig, by_read) == ("broken", shown["error"])
    assert row(rig, fine) == ("mounted", None)

    # omad restarts: the rows are the answer (and restore-mounter, which keeps broken mounts, agrees).
    rig.stack.daemons["omad"].stop(sig=signal.SIGKILL)
    await start_omad(rig)
    status, listing = await rig.api.get("/restore/mounts")
    assert status == 200 and listing["count"] == 3
    assert {m["mount_id"]: m["status"] for m in listing["mounts"]} == {by_health: "broken", by_read: "broken",
                                                                       fine: "mounted"}
    for mount_id in (by_health, by_read):
        status, shown = await rig.api.get(f"/restore/{mount_id}")
        assert status == 200 and shown["status"] == "broken" and shown["error"] == row(rig, mount_id)[1]
        status, body = await rig.api.get(f"/restore/{mount_id}/file-info", params={"path": "/part1/etc/motd"})
        assert status == 503 and body["code"] == "mount_broken" and body["cause"] == shown["error"], body
    status, info = await rig.api.get(f"/restore/{fine}/file-info", params={"path": "/part1/etc/motd"})
    assert status == 200 and info["type"] == "file"

    for mount_id in (by_health, by_read, fine):
        status, body = await rig.api.delete(f"/restore/{mount_id}")
        assert status == 200, body
        assert row(rig, mount_id)[0] == "unmounted"
    assert (await rig.api.get("/restore/mounts"))[1]["count"] == 0
    assert list((rig.stack.state / "restore").iterdir()) == []
    assert await attachments(rig) == []
    assert (await rig.api.get("/health", token=""))[1]["status"] == "healthy"


async def test_mounting_a_backup_still_being_written_is_409(rig: Rig) -> None:
    rig.state.faults.hang_job(vm_name=TWO_DISK_VM)
    status, started = await rig.start(TWO_DISK_VM, "full")
    assert status == 200, started
    status, body = await rig.api.post("/restore/mount", {"backup_id": started["backup_id"]})
    assert status == 409 and "only a completed backup" in body["details"]
    assert (await rig.api.post("/restore/mount", {"backup_id": "backup-nope"}))[0] == 404
    assert (await rig.api.post("/restore/mount", {"backup_id": started["backup_id"], "disk_index": -1}))[0] == 400


def proc_io(pid: int) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())}


async def test_a_big_download_is_sent_from_the_handed_over_descriptor(stack_config: Stack, tmp_path: Path) -> None:
    """256 MiB through omad, whole and ranged: the bytes are right, and neither daemon copies them.

    restore-mounter hands omad the open file (SCM_RIGHTS) and omad sendfile(2)s it to the client. So
    restore-mounter reads and writes next to nothing however big the file, and omad causes no reads of
    its own (read_bytes, with the file in the page cache). omad's rchar is no witness: the kernel counts
    sendfile(2) there too (fs/read_write.c, do_sendfile: add_rchar).
    """
    size = 256 * MiB
    big = File(Pattern(size, seed=5))
    image = whole_disk_ext4(tmp_path / "big.raw", {"big.bin": big}, size=size + 64 * MiB)
    inv = Inventory(host=VCENTER, datacenter="DC1", username=USER, password=PASSWORD)
    inv.add_vm("big file", disks=[image.size])
    async with open_rig(stack_config, tmp_path, inv, {"big file": [image.path]}, {"big file": image},
                        change_tracking=False) as rig:
        backup = await rig.backup("big file")
        m = await mount(rig, backup["backup_id"])
        (fs_root,) = Path(m["mount_path"]).iterdir()
        want = hashlib.sha256()
        with open(fs_root / "big.bin", "rb") as f:  # also puts the file in the page cache
            while chunk := f.read(4 * MiB):
                want.update(chunk)
        omad, agent = (rig.stack.daemons[d].pid for d in ("omad", "restore-mounter"))

        async def measured(headers: dict[str, str] | None = None) -> tuple[int, bytes, Any, dict[str, int]]:
            before = {"omad": proc_io(omad), "agent": proc_io(agent)}
            status, body, h = await read(rig, m["mount_id"], "/big.bin", headers)
            after = {"omad": proc_io(omad), "agent": proc_io(agent)}
            used = {"omad_read_bytes": after["omad"]["read_bytes"] - before["omad"]["read_bytes"],
                    "agent_rchar": after["agent"]["rchar"] - before["agent"]["rchar"],
                    "agent_wchar": after["agent"]["wchar"] - before["agent"]["wchar"]}
            return status, body, h, used

        status, body, headers, used = await measured()
        assert status == 200 and headers["Content-Length"] == str(size) and len(body) == size
        assert hashlib.sha256(body).hexdigest() == want.hexdigest()
        assert max(used.values()) < 8 * MiB, used

        first, last = 100 * MiB + 7, 200 * MiB - 3
        status, part, headers, used = await measured({"Range": f"bytes={first}-{last}"})
        assert status == 206 and headers["Content-Range"] == f"bytes {first}-{last}/{size}"
        assert part == body[first:last + 1]
        assert max(used.values()) < 8 * MiB, used

        status, err, headers, _ = await measured({"Range": f"bytes={size}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}" and b"not satisfiable" in err

        # A forced unmount takes the file back from a running download: the download is cut off (never
        # complete-looking) and the mount goes, although omad held the descriptor.
        url = f"{rig.api.base}/api/v1/restore/{m['mount_id']}/download"
        async with rig.api.session.get(url, params={"path": "/big.bin"}, headers=rig.api._headers(None)) as r:
            assert r.status == 200 and len(await r.content.readexactly(MiB)) == MiB
            status, body = await rig.api.delete(f"/restore/{m['mount_id']}", params={"force": "true"})
            assert status == 200, body
            with pytest.raises(aiohttp.ClientError):
                while await r.content.read(4 * MiB):
                    pass
        assert (await rig.api.get("/restore/mounts"))[1]["count"] == 0
