"""VM contexts: the list with its groups and pages, one VM's details, recent jobs of every type."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import pytest

from omad.adapters.memfile import SharedFile
from omad.inventory.contexts import Contexts
from omad.inventory.rendered import KeptList
from omad.inventory.vmspec import DiskSpec, NicSpec, VmSpec
from omad.store import contexts as store_contexts
from omad.store.db import Database

from ..lib.gate import Gate
from ..rig import Api, Stack
from .conftest import ODD_NAMES, manual

pytestmark = pytest.mark.timeout(120)


async def add_all(api: Api) -> dict[str, str]:
    status, added = await api.post("/discovery/add-vms", {**manual(), "vm_names": ODD_NAMES})
    assert status == 200, added
    return {p["vm_name"]: p["context_id"] for p in added["processed_vms"]}


def add_groups(stack: Stack, ids: dict[str, str]) -> None:
    t = "2025-01-01T00:00:00Z"
    stack.sql("INSERT INTO vm_machine_groups (id, name, priority, created_at, updated_at) VALUES "
              "('g-gold', 'Gold', 10, ?, ?), ('g-web', 'Web tier', 50, ?, ?)", (t, t, t, t))
    stack.sql("INSERT INTO vm_group_memberships (group_id, vm_context_id, priority, enabled, added_at) VALUES "
              "('g-gold', ?, 5, 1, ?), ('g-web', ?, 20, 0, ?), ('g-gold', ?, 7, 1, ?)",
              (ids[ODD_NAMES[0]], t, ids[ODD_NAMES[0]], t, ids[ODD_NAMES[1]], t))


async def test_list_carries_groups_and_pages(vstack: Stack, api: Api) -> None:
    ids = await add_all(api)
    add_groups(vstack, ids)
    status, listing = await api.get("/vm-contexts")
    assert status == 200
    items = {i["vm_name"]: i for i in listing["vm_contexts"]}
    web = items[ODD_NAMES[0]]
    assert web["group_count"] == 2
    assert sorted(web["groups"], key=lambda g: g["group_id"]) == [
        {"group_id": "g-gold", "group_name": "Gold", "priority": 5, "enabled": True},
        {"group_id": "g-web", "group_name": "Web tier", "priority": 20, "enabled": False}]
    assert items[ODD_NAMES[1]]["group_count"] == 1 and items[ODD_NAMES[2]]["groups"] == []
    assert [i["vm_name"] for i in listing["vm_contexts"]] == sorted(ODD_NAMES)  # ordered by name

    status, page = await api.get("/vm-contexts", params={"limit": "2", "offset": "1"})
    assert status == 200 and (page["count"], page["total"], page["limit"], page["offset"]) == (2, 3, 2, 1)
    assert [i["vm_name"] for i in page["vm_contexts"]] == sorted(ODD_NAMES)[1:]
    assert (await api.get("/vm-contexts", params={"limit": "0"}))[0] == 400

    status, ungrouped = await api.get("/discovery/ungrouped-vms")
    assert status == 200 and [v["vm_name"] for v in ungrouped["vms"]] == [ODD_NAMES[2]]
    assert set(ungrouped["vms"][0]) == {"context_id", "vm_name", "vm_path", "vcenter_host", "datacenter",
                                        "current_status", "auto_added", "scheduler_enabled", "cpu_count", "memory_mb",
                                        "os_type", "power_state", "created_at", "last_job_at"}
    detail = (await api.get(f"/vm-contexts/{quote(ODD_NAMES[0], safe='')}"))[1]
    assert detail["context"]["group_count"] == 2


def add_job(stack: Stack, job_id: str, context_id: str, job_type: str, status: str, created: str,
            started: str | None = None, completed: str | None = None, **extra: object) -> None:
    stack.sql("INSERT INTO jobs (id, job_type, status, progress, context_id, display_name, current_step, "
              "error_message, started_at, completed_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
              (job_id, job_type, status, extra.get("progress", 0), context_id, f"{job_type} of vm",
               extra.get("step"), extra.get("error"), started, completed, created))


async def test_recent_jobs_of_every_type_and_the_details(vstack: Stack, api: Api) -> None:
    ids = await add_all(api)
    cid = ids[ODD_NAMES[1]]
    other = ids[ODD_NAMES[0]]
    add_job(vstack, "job-1", cid, "replication", "completed", "2025-01-01T10:00:00.000Z",
            "2025-01-01T10:00:01.000Z", "2025-01-01T10:05:31.500Z", progress=100)
    add_job(vstack, "backup-1", cid, "backup", "failed", "2025-01-02T10:00:00.000Z", "2025-01-02T10:00:00.000Z",
            "2025-01-02T10:01:00.000Z", error="NBD write failed")
    add_job(vstack, "tf-1", cid, "test_failover", "running", "2025-01-03T10:00:00.000Z", "2025-01-03T10:00:00.000Z",
            progress=40.5, step="deploy destination VM")
    add_job(vstack, "job-x", other, "replication", "running", "2025-01-04T10:00:00.000Z")
    vstack.sql("INSERT INTO cbt_history (vm_context_id, job_id, disk_id, change_id, sync_type, created_at) "
               "VALUES (?, 'job-1', 'disk-2000', '52 66 8c/5440', 'full', '2025-01-01T10:05:31Z')", (cid,))
    vstack.sql("UPDATE vm_replication_contexts SET last_operation_summary = ? WHERE context_id = ?",
               ('{"operation": "replication", "status": "completed"}', cid))

    status, recent = await api.get(f"/vm-contexts/{cid}/recent-jobs")
    assert status == 200 and recent["count"] == 3 and recent["context_id"] == cid
    assert [(j["job_id"], j["job_type"], j["status"]) for j in recent["jobs"]] == [
        ("tf-1", "test_failover", "running"), ("backup-1", "backup", "failed"), ("job-1", "replication", "completed")]
    tf, backup, repl = recent["jobs"]
    assert (tf["progress"], tf["current_step"], tf["duration_seconds"], tf["completed_at"]) == \
        (40.5, "deploy destination VM", None, None)
    assert (backup["error_message"], backup["duration_seconds"]) == ("NBD write failed", 60.0)
    assert repl["duration_seconds"] == 330.5 and repl["display_name"] == "replication of vm"
    assert (await api.get(f"/vm-contexts/{cid}/recent-jobs", params={"limit": "1"}))[1]["count"] == 1
    assert (await api.get("/vm-contexts/ctx-none/recent-jobs"))[0] == 404

    detail = (await api.get(f"/vm-contexts/{quote(ODD_NAMES[1], safe='')}"))[1]
    assert detail["current_job"]["job_id"] == "tf-1"  # the running one, even without current_job_id
    assert [j["job_id"] for j in detail["job_history"]] == ["tf-1", "backup-1", "job-1"]
    assert detail["cbt_history"] == [{"job_id": "job-1", "disk_id": "disk-2000", "change_id": "52 66 8c/5440",
                                      "previous_change_id": None, "sync_type": "full", "bytes_transferred": None,
                                      "sync_success": True, "created_at": "2025-01-01T10:05:31Z"}]
    assert detail["last_operation"] == {"operation": "replication", "status": "completed"}
    assert detail["context"]["last_operation_summary"] == detail["last_operation"]
    vstack.sql("UPDATE vm_replication_contexts SET current_job_id = 'job-1' WHERE context_id = ?", (cid,))
    detail = (await api.get(f"/vm-contexts/{quote(ODD_NAMES[1], safe='')}"))[1]
    assert detail["current_job"]["job_id"] == "job-1"
    listed = next(i for i in (await api.get("/vm-contexts"))[1]["vm_contexts"] if i["context_id"] == cid)
    assert listed["last_operation_summary"] == {"operation": "replication", "status": "completed"}
    assert listed["current_job_id"] == "job-1"


async def test_unknown_names_are_404_json(vstack: Stack, api: Api) -> None:
    for path in ("/vm-contexts/nobody", f"/vm-contexts/{quote('a/b c ü', safe='')}"):
        status, err = await api.get(path)
        assert status == 404 and err["code"] == "not_found" and err["error"] == "VM context not found"


async def test_the_rendered_list_follows_every_change(vstack: Stack, api: Api) -> None:
    """The whole list is kept rendered between changes; changes from any connection show at once."""
    ids = await add_all(api)

    async def listed() -> dict[str, dict]:
        status, body = await api.get("/vm-contexts")
        assert status == 200 and body["count"] == body["total"] == len(body["vm_contexts"])
        return {i["vm_name"]: i for i in body["vm_contexts"]}

    assert (await listed())[ODD_NAMES[0]]["group_count"] == 0
    add_groups(vstack, ids)  # another connection writes
    assert (await listed())[ODD_NAMES[0]]["group_count"] == 2
    vstack.sql("UPDATE vm_machine_groups SET name = 'Platinum' WHERE id = 'g-gold'")
    assert {g["group_name"] for g in (await listed())[ODD_NAMES[1]]["groups"]} == {"Platinum"}
    vstack.sql("UPDATE vm_replication_contexts SET current_status = 'replicating' WHERE context_id = ?",
               (ids[ODD_NAMES[2]],))
    assert (await listed())[ODD_NAMES[2]]["current_status"] == "replicating"
    page = (await api.get("/vm-contexts", params={"limit": "1", "offset": "2"}))[1]  # served from the rendering
    assert page["vm_contexts"][0]["vm_name"] == sorted(ODD_NAMES)[2]
    vstack.sql("DELETE FROM vm_machine_groups WHERE id = 'g-web'")  # cascades to its memberships
    assert (await listed())[ODD_NAMES[0]]["group_count"] == 1
    vstack.sql("DELETE FROM vm_replication_contexts WHERE context_id = ?", (ids[ODD_NAMES[1]],))
    assert sorted(await listed()) == sorted([ODD_NAMES[0], ODD_NAMES[2]])
    assert (await api.get("/vm-contexts", params={"limit": "5"}))[1]["total"] == 2


async def test_the_kept_list_renders_only_what_changed(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first render, changes from any connection re-render only their contexts, in name order."""
    contexts = Contexts(db)
    async with db.transaction() as tx:
        ids = [await contexts.create(tx, VmSpec(id=f"uuid-{i}", name=f"vm-{i:02d}", disks=[DiskSpec(id="disk-2000")],
                                                networks=[NicSpec(label="nic")]),
                                     vcenter_host="vc", datacenter="DC1", credential_id=None, auto_added=True)
               for i in range(40)]

    async def listing(c: Contexts, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        async with c.listing(limit, offset) as page:
            array = page.array if page.fd is None else os.pread(page.fd, page.size + 1, 0)
            count, total = page.count, page.total
        assert array is not None
        items: list[dict[str, Any]] = json.loads(array)
        assert count == len(items) and total == await db.scalar("SELECT COUNT(*) FROM vm_replication_contexts")
        return items

    assert [i["vm_name"] for i in await listing(contexts)] == [f"vm-{i:02d}" for i in range(40)]
    full_renders = []
    render_all = store_contexts.render_all
    monkeypatch.setattr(store_contexts, "render_all", lambda d: full_renders.append(1) or render_all(d))
    other = sqlite3.connect(db.path, isolation_level=None)  # as an operator's sqlite3 or a job would
    other.execute("PRAGMA foreign_keys=ON")
    t = "2025-01-01T00:00:00Z"
    changes = [
        ("UPDATE vm_replication_contexts SET power_state = 'poweredOff' WHERE context_id = ?", (ids[3],)),
        ("UPDATE vm_replication_contexts SET vm_name = 'aaa first now' WHERE context_id = ?", (ids[30],)),
        ("UPDATE vm_replication_contexts SET vm_name = 'zzz last now' WHERE context_id = ?", (ids[0],)),
        ("DELETE FROM vm_replication_contexts WHERE context_id = ?", (ids[7],)),
        ("INSERT INTO vm_machine_groups (id, name, created_at, updated_at) VALUES ('g1', 'Gold', ?, ?)", (t, t)),
        ("INSERT INTO vm_group_memberships (group_id, vm_context_id, added_at) VALUES ('g1', ?, ?)", (ids[5], t)),
        ("INSERT INTO vm_group_memberships (group_id, vm_context_id, added_at) VALUES ('g1', ?, ?)", (ids[6], t)),
        ("UPDATE vm_machine_groups SET name = 'Platinum' WHERE id = 'g1'", ()),
        ("UPDATE vm_group_memberships SET enabled = 0 WHERE vm_context_id = ?", (ids[6],)),
        ("INSERT INTO vm_group_memberships (group_id, vm_context_id, priority, added_at) VALUES ('g1', ?, 9, ?) "
         "ON CONFLICT (group_id, vm_context_id) DO UPDATE SET priority = excluded.priority", (ids[5], t)),
        ("DELETE FROM vm_machine_groups WHERE id = 'g1'", ()),
    ]
    try:
        for sql, params in changes:
            other.execute(sql, params)
            kept, fresh = await listing(contexts), await listing(Contexts(db))
            assert kept == fresh, sql
            assert await listing(contexts, 5, 2) == fresh[2:7]
            if "Platinum" in sql:
                assert [g["group_name"] for i in kept for g in i["groups"]] == ["Platinum", "Platinum"]
        async with db.transaction() as tx:  # and omad's own writes
            await contexts.create(tx, VmSpec(id="uuid-new", name="vm-05½"), vcenter_host="vc", datacenter="",
                                  credential_id=None, auto_added=False)
        assert await listing(contexts) == await listing(Contexts(db))
    finally:
        other.close()
    assert len(full_renders) == len(changes) + 1  # the fresh instances' only: the kept list never rendered all


async def test_the_list_reads_its_writes_and_revalidates(vstack: Stack, api: Api) -> None:
    """A change through the API shows in the very next list, also while other readers keep the list busy; an
    unchanged list is a 304 for the ETag it was sent with, and a change makes it a 200 with another."""
    ids = await add_all(api)
    status, gold = await api.post("/machine-groups", {"name": "Gold"})
    assert status in (200, 201), gold
    url = f"{vstack.url}/api/v1/vm-contexts"
    auth = {"Authorization": f"Bearer {api.token}"}
    stop = asyncio.Event()

    async def reader() -> None:  # keeps refreshes and whole-list writes in flight around the test's requests
        while not stop.is_set():
            async with api.session.get(url, headers=auth) as r:
                assert r.status == 200 and json.loads(await r.read())["count"] == len(ids)

    readers = [asyncio.ensure_future(reader()) for _ in range(3)]
    try:
        for n in range(12):
            grouped = ODD_NAMES[n % len(ODD_NAMES)]
            status, _ = await api.put(f"/vm-contexts/{quote(ids[grouped], safe='')}/group",
                                      {"group_id": gold["id"] if n % 2 == 0 else None})
            assert status == 200
            listed = {i["vm_name"]: i for i in (await api.get("/vm-contexts"))[1]["vm_contexts"]}
            assert listed[grouped]["group_count"] == (1 if n % 2 == 0 else 0), n
            page = (await api.get("/vm-contexts", params={"limit": "3"}))[1]["vm_contexts"]
            assert {i["vm_name"]: i["group_count"] for i in page} == \
                {name: item["group_count"] for name, item in listed.items()}
    finally:
        stop.set()
        await asyncio.gather(*readers)

    for params in ({}, {"limit": "2", "offset": "1"}):
        async with api.session.get(url, params=params, headers=auth) as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-cache"
            etag, body = r.headers["ETag"], await r.read()
        for tags in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            async with api.session.get(url, params=params, headers={**auth, "If-None-Match": tags}) as r:
                assert r.status == 304 and r.headers["ETag"] == etag and await r.read() == b"", tags
        async with api.session.get(url, params=params, headers={**auth, "If-None-Match": '"other"'}) as r:
            assert r.status == 200 and await r.read() == body
        state = "state " + etag.strip('"')
        vstack.sql("UPDATE vm_replication_contexts SET power_state = ? WHERE context_id = ?", (state, ids[sorted(ODD_NAMES)[1]]))
        async with api.session.get(url, params=params, headers={**auth, "If-None-Match": etag}) as r:
            assert r.status == 200 and r.headers["ETag"] != etag and state.encode() in await r.read()


async def test_a_request_is_not_answered_by_a_refresh_older_than_it(db: Database,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A list request that arrives while a refresh is running, after a change that refresh may not have seen,
    waits for a refresh that has: it never gets the list from before its change."""
    contexts = Contexts(db)
    async with db.transaction() as tx:
        cid = await contexts.create(tx, VmSpec(id="uuid-1", name="vm-1"), vcenter_host="vc", datacenter="DC1",
                                    credential_id=None, auto_added=True)

    async def power(limit: int | None) -> str:
        async with contexts.listing(limit, 0) as page:
            array = page.array if page.fd is None else os.pread(page.fd, page.size, 0)
        assert array is not None
        return str(json.loads(array)[0]["power_state"])

    assert await power(None) == ""
    held = asyncio.Event()
    release = asyncio.Event()
    render_some = store_contexts.render_some

    async def slow_render_some(d: Any, ids: Any) -> Any:
        rendered = await render_some(d, ids)  # what the refresh saw: before the change below
        held.set()
        await release.wait()
        return rendered

    monkeypatch.setattr(store_contexts, "render_some", slow_render_some)
    await db.execute("UPDATE vm_replication_contexts SET power_state = 'poweredOff' WHERE context_id = ?", (cid,))
    first = asyncio.ensure_future(power(None))  # starts a refresh, held once it has rendered the change
    await held.wait()
    monkeypatch.setattr(store_contexts, "render_some", render_some)
    await db.execute("UPDATE vm_replication_contexts SET power_state = 'poweredOn' WHERE context_id = ?", (cid,))
    later = [asyncio.ensure_future(power(limit)) for limit in (None, 1)]
    await asyncio.sleep(0.05)
    release.set()
    assert await first == "poweredOff"
    assert await asyncio.gather(*later) == ["poweredOn", "poweredOn"]


async def test_a_client_leaving_mid_list_leaves_the_list_served(vstack: Stack, api: Api) -> None:
    """The whole list is sent from a file: a client that goes away after a few bytes of 24 MB costs nothing
    but a log line, and the next client gets the whole list."""
    ids = await add_all(api)
    big = "a" * (8 * 1024 * 1024)  # the list: more than twice what the socket buffers between us hold
    vstack.sql("UPDATE vm_replication_contexts SET annotation = ?", (big,))
    host, port = vstack.url.removeprefix("http://").rsplit(":", 1)
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /api/v1/vm-contexts HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api.token}\r\n"
                     "\r\n".encode())
        assert (await reader.readexactly(12)) == b"HTTP/1.1 200"
        writer.transport.abort()  # a reset, mid-body
    status, listing = await api.get("/vm-contexts")
    assert status == 200 and len(listing["vm_contexts"]) == len(ids)
    assert all(i["annotation"] == big for i in listing["vm_contexts"])
    log = (vstack.state / "logs" / "omad.log").read_text(errors="replace")
    assert "unexpected error" not in log and "Traceback" not in log
    assert "the VM list stopped: the client went away" in log


async def test_a_whole_list_file_written_for_nobody_goes_back_to_the_pool(db: Database) -> None:
    """omad stopping while a worker thread writes the whole list's file: the file it then returns is given
    back to the pool at once (the next write reuses its pages), not left for the garbage collector to close."""
    async with db.transaction() as tx:
        await Contexts(db).create(tx, VmSpec(id="uuid-1", name="vm-1"), vcenter_host="vc", datacenter="DC1",
                                  credential_id=None, auto_added=True)
    kept = KeptList(db)
    inodes: list[int] = []

    def write(pieces: Sequence[bytes]) -> SharedFile:
        file = real(pieces)
        with file.held() as fd:
            inodes.append(os.fstat(fd).st_ino)
        return file

    real = kept._files.write
    gate = Gate(write)
    kept._files.write = gate  # type: ignore[method-assign]

    async def whole() -> int:
        async with kept.listing(None, 0) as page:
            assert page.fd is not None
            return os.fstat(page.fd).st_ino

    reader = asyncio.create_task(whole())
    assert await asyncio.to_thread(gate.entered.wait, 30)
    assert kept._writing is not None
    writer = kept._writing[1]
    writer.cancel()  # as at shutdown: the write's task goes, its thread finishes the file for nobody
    gate.release.set()
    for task in (writer, reader):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert gate.returned.is_set() and gate.failed is None
    kept._files.write = real  # type: ignore[method-assign]
    assert await whole() == inodes[0]  # the file written for nobody, reused
